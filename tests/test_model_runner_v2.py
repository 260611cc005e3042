"""A guided server's configuration as on a CUDA machine, read from the config (no engine is built).

- Guided architectures never run on vLLM's Model Runner V2 (patches.vllm_config), which this plugin
  does not patch.  On CPU, Triton has no backend and vLLM always picks V1, so these tests make vLLM
  believe Triton is there (`HAS_TRITON`).
- The paired scheduler (synchronous) only where pairs come or cost nothing (patches.scheduler
  `install`); on CPU vLLM never schedules asynchronously, so these tests make the plugin believe
  the platform does."""

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

    kwargs.setdefault("max_model_len", 256)
    return EngineArgs(model=str(folder), skip_tokenizer_init=True, **kwargs).create_engine_config()


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


@pytest.fixture
def async_platform(monkeypatch):
    from vllm.plugins import load_general_plugins

    from vllm_sjdpp.patches import scheduler

    load_general_plugins()
    monkeypatch.setattr(scheduler, "platform_schedules_asynchronously", lambda: True)


@pytest.mark.parametrize("options, paired", [
    ({}, False),  # never pairs by its own rule: vLLM's scheduler, asynchronous where the platform is
    ({"async_scheduling": False}, True),  # opted in to negative prompts of another length
    ({"speculative_config": "sjdpp"}, True),  # synchronous anyway
])
def test_the_paired_scheduler_only_where_pairs_come_or_cost_nothing(async_platform, digit_model, options, paired):
    from vllm_sjdpp.patches.scheduler import SCHEDULER_CLS, pairs_supported

    config = engine_config(digit_model, **options)
    assert pairs_supported(config) == paired
    assert config.scheduler_config.scheduler_cls == (SCHEDULER_CLS if paired else None)


def test_every_emu3_request_pairs_so_emu3_keeps_the_paired_scheduler(async_platform, tiny_janus_path, tiny_emu3_path):
    from vllm_sjdpp.patches.scheduler import pairs_supported

    assert pairs_supported(engine_config(tiny_emu3_path, max_num_seqs=8))
    assert not pairs_supported(engine_config(tiny_janus_path, max_num_seqs=8))


@pytest.mark.parametrize("options, given", [
    ({"async_scheduling": True}, "--async-scheduling"),
    ({"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}, "--scheduler-cls"),
])
def test_the_paired_layout_without_the_paired_scheduler_is_refused_at_start_up(tiny_emu3_path, digit_model, options, given):
    """Every guided request pairs in the paired layout (Emu3's default; the digit model's when
    asked): a scheduler that cannot pair would refuse them all, so the server does not start."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    paired = {"hf_overrides": {"sjdpp_guidance_layout": "paired"}}
    for folder, extra in ((tiny_emu3_path, {"max_num_seqs": 8}), (digit_model, paired)):
        with pytest.raises(ValueError, match=f"{given}.*sjdpp_guidance_layout 'paired'"):
            engine_config(folder, **extra, **options)
    engine_config(digit_model, **options)  # the stacked layout keeps the user's scheduling


def test_on_cpu_guided_servers_pair(digit_model):
    """The broken variant of the rule above on a platform without asynchronous scheduling: vLLM's
    scheduler there would refuse negative prompts of another length for nothing."""
    from vllm.plugins import load_general_plugins

    from vllm_sjdpp.patches.scheduler import pairs_supported

    load_general_plugins()
    assert pairs_supported(engine_config(digit_model))


def test_a_server_that_cannot_pair_refuses_a_negative_prompt_of_another_length(async_platform, digit_model):
    from vllm_sjdpp.patches.input_processor import ModelFacts, check_request

    from vllm import SamplingParams

    from vllm_sjdpp.digits.tokens import GENERATED_LENGTH

    facts = ModelFacts.of(engine_config(digit_model, max_model_len=GENERATED_LENGTH + 64))
    prompt = [0, 1, 2, 3]
    params = SamplingParams(max_tokens=4, extra_args={"negative_prompt_token_ids": [0, 1]})
    with pytest.raises(Exception, match="negative_prompt_token_ids.*--no-async-scheduling"):
        check_request(facts, prompt, params)


@pytest.mark.parametrize("runner_class, refused", [("v2", True), ("v1", False)])
def test_a_guided_model_on_another_runner_fails_at_start_up(digit_model, runner_class, refused):
    """The live check behind the config rule: a worker that built Model Runner V2 for a guided
    model fails naming the variable; V1 (here a subclass stands in, built without a device) passes."""
    from types import SimpleNamespace

    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sjdpp.patches.models import check_live_runner

    load_general_plugins()
    config = engine_config(digit_model)
    runner = SimpleNamespace() if runner_class == "v2" else GPUModelRunner.__new__(GPUModelRunner)
    if refused:
        with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
            check_live_runner(config, runner)
    else:
        check_live_runner(config, runner)


def test_the_worker_checks_the_runner_it_built(digit_model, monkeypatch):
    """`Worker._make_model_runner` (patched): on a guided model, V2's runner class is refused."""
    from types import SimpleNamespace

    import vllm.v1.worker.gpu.model_runner as v2
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.gpu_worker import Worker

    load_general_plugins()
    monkeypatch.setattr(v2, "GPUModelRunner", lambda *args: SimpleNamespace())
    worker = SimpleNamespace(vllm_config=engine_config(digit_model), use_v2_model_runner=True, device="cpu")
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        Worker._make_model_runner(worker)
    assert Worker._make_model_runner.__wrapped__(worker) is not None  # unpatched: it would run on V2
