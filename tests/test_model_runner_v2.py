"""Guided architectures never run on vLLM's Model Runner V2 (patches.vllm_config), which this plugin
does not patch.  On CPU, Triton has no backend and vLLM always picks V1, so these tests make vLLM
believe Triton is there (`HAS_TRITON`), as on a CUDA machine, and read the choice from the config
(no engine is built)."""

import pytest


@pytest.fixture
def triton_present(monkeypatch):
    import vllm.config.vllm as vllm_config_module
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    return monkeypatch


def engine_config(folder, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(folder), skip_tokenizer_init=True, max_model_len=256, **kwargs).create_engine_config()


@pytest.fixture(scope="module")
def digit_model():
    from vllm_sjdpp.digits.train import DEFAULT_OUT

    return DEFAULT_OUT


@pytest.mark.parametrize("speculative", [None, "sjdpp"])
def test_guided_models_stay_on_v1(triton_present, digit_model, speculative):
    """With and without --speculative-config: V1, whose runner the plugin patches."""
    config = engine_config(digit_model, speculative_config=speculative)
    assert config.use_v2_model_runner is False
    assert any("GuidedLlamaForCausalLM" in f for f in config._get_v2_model_runner_unsupported_features())


def test_janus_and_emu3_stay_on_v1(triton_present, tiny_janus_path, tiny_emu3_path):
    for folder in (tiny_janus_path, tiny_emu3_path):
        assert engine_config(folder, max_num_seqs=8).use_v2_model_runner is False


def test_other_models_keep_vllms_choice(triton_present, tiny_llama_path):
    """The broken variant the patch guards against: a plain model gets V2 where Triton is."""
    assert engine_config(tiny_llama_path).use_v2_model_runner is True


def test_v2_forced_on_a_guided_model_is_refused(triton_present, digit_model):
    import vllm.envs as envs

    triton_present.setattr(envs, "VLLM_USE_V2_MODEL_RUNNER", True, raising=False)
    with pytest.raises(Exception, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        engine_config(digit_model)


def test_without_the_patch_a_plain_guided_server_is_refused_not_run_on_v2(triton_present, digit_model):
    """vLLM's own rule alone puts a guided model without --speculative-config on V2; the config
    hook's check then refuses it instead of letting it run unpatched (with sjdpp, custom_class
    keeps it on V1)."""
    from vllm.config import VllmConfig

    patched = VllmConfig._get_v2_model_runner_unsupported_features
    triton_present.setattr(VllmConfig, "_get_v2_model_runner_unsupported_features", patched.__wrapped__)
    with pytest.raises(Exception, match="would run on Model Runner V2: set VLLM_USE_V2_MODEL_RUNNER=0"):
        engine_config(digit_model)
    assert engine_config(digit_model, speculative_config="sjdpp").use_v2_model_runner is False
