"""The configuration side of the vLLM patches, without an engine."""

import argparse

import pytest
import torch

from vllm_sjdpp.patches import internals, is_supported, unsupported_message
from vllm_sjdpp.patches.arg_utils import PROPOSER_PATH, parse_speculative_config, sjdpp_speculative_config


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.1", "0.33.0rc1"])
def test_supported_versions(version):
    assert is_supported(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "dev"])
def test_unsupported_versions_are_refused_clearly(version):
    assert not is_supported(version)
    assert unsupported_message(version) == f"vllm-sjdpp supports vLLM 0.32 and 0.33; the installed vLLM is {version}"


def test_installed_vllm_is_supported_and_patched():
    """The plugin's entry point, found as every vLLM process finds it, patched what it patches;
    and nothing it relies on is missing from the installed vLLM."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.plugins import load_general_plugins
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert is_supported(vllm.__version__)
    load_general_plugins()
    patched = {  # the wrappers keep the originals' names (functools.wraps), not their code
        GPUModelRunner.__init__: "gpu_model_runner.py",
        GPUModelRunner._on_request_state_removed: "gpu_model_runner.py",
        GPUModelRunner._preprocess: "gpu_model_runner.py",
        EngineArgs.create_speculative_config: "arg_utils.py",
        InputProcessor.process_inputs: "input_processor.py",
    }
    for wrapper, module in patched.items():
        assert wrapper.__code__.co_filename.endswith(f"vllm_sjdpp/patches/{module}"), wrapper.__qualname__
    assert "GuidedLlamaForCausalLM" in MODELS_CONFIG_MAP and "JanusForConditionalGeneration" in MODELS_CONFIG_MAP
    assert internals.missing() == []


def test_the_seam_names_what_a_vllm_lacks(monkeypatch):
    """A relied-on method gone, or with other parameters, is named; so is a runner attribute."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    member = next(m for m in internals.CLASS_MEMBERS if m.name == "_on_request_state_removed")
    monkeypatch.setattr(GPUModelRunner, "_on_request_state_removed", lambda self, request_id, state: None)
    assert internals.missing() == [f"{member}: its parameters are (self, request_id, state)"]
    monkeypatch.delattr(GPUModelRunner, "_on_request_state_removed")
    assert internals.missing() == [f"{member}: no '_on_request_state_removed'"]
    runner = SimpleNamespace()
    for attribute in internals.RUNNER_ATTRIBUTES:  # dotted names as nested objects
        *path, leaf = attribute.split(".")
        owner = runner
        for name in path:
            if not isinstance(getattr(owner, name, None), SimpleNamespace):
                setattr(owner, name, SimpleNamespace())
            owner = getattr(owner, name)
        if not hasattr(owner, leaf):
            setattr(owner, leaf, 0)
    runner.input_batch = SimpleNamespace(**{a: 0 for a in internals.INPUT_BATCH_ATTRIBUTES})
    internals.check_runner(runner)
    del runner.input_batch.num_prompt_tokens
    with pytest.raises(RuntimeError, match="the model runner lacks InputBatch.num_prompt_tokens"):
        internals.check_runner(runner)


def test_speculative_config_accepts_a_method_name_or_json():
    assert parse_speculative_config("sjdpp") == {"method": "sjdpp"}
    assert parse_speculative_config(' {"method": "ngram", "num_speculative_tokens": 3} ') == {
        "method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_speculative_config("{not json")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_speculative_config("[1, 2]")


def test_sjdpp_becomes_vllm_custom_class():
    spec, options, config = sjdpp_speculative_config(
        {"method": "sjdpp", "reuse": "none", "num_speculative_tokens": 8, "enforce_eager": True}
    )
    assert spec == {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": 8,
                    "enforce_eager": True}
    assert options == {"reuse": "none", "num_speculative_tokens": 8}
    assert (config.reuse, config.num_speculative_tokens) == ("none", 8)
    with pytest.raises(ValueError, match="'reuze'"):
        sjdpp_speculative_config({"method": "sjdpp", "reuze": "none"})
    with pytest.raises(ValueError, match="'init'"):
        sjdpp_speculative_config({"method": "sjdpp", "init": "diagonal"})


def test_model_defaults_yield_to_server_options():
    defaults = {"fresh_token_range": [0, 17], "row_width": 33}
    _, options, config = sjdpp_speculative_config({"method": "sjdpp", "init": "above"}, defaults)
    assert (config.fresh_token_range, config.row_width, config.init) == ((0, 17), 33, "above")
    _, _, config = sjdpp_speculative_config({"method": "sjdpp", "fresh_token_ids": [3], "row_width": 5}, defaults)
    assert (config.fresh_token_range, config.fresh_token_ids, config.row_width) == (None, (3,), 5)
    with pytest.raises(ValueError, match="config.json"):
        sjdpp_speculative_config({"method": "sjdpp"}, {"colour": 1})


def test_options_the_model_makes_impossible_are_refused_at_start_up_naming_their_source():
    """Limits (64 logits, a 128-token context, 16-token images): a row wider than the image or
    fresh tokens past the logits are refused, and a folder default is named as the folder's."""
    limits = (64, 128, 16)
    sjdpp_speculative_config({"method": "sjdpp", "row_width": 16, "init": "above"}, None, limits)  # the edge
    folder = r"\(the model folder's default"
    with pytest.raises(ValueError, match=rf"'row_width': got 17; allowed: a positive integer <= 16 \(the image's tokens\) {folder}"):
        sjdpp_speculative_config({"method": "sjdpp"}, {"row_width": 17, "init": "above"}, limits)
    with pytest.raises(ValueError, match=rf"'fresh_token_range'.*hi <= 64 {folder}"):
        sjdpp_speculative_config({"method": "sjdpp"}, {"fresh_token_range": [0, 65]}, limits)
    with pytest.raises(ValueError, match=r"'row_width': got 17; allowed: a positive integer <= 16 \(the image's tokens\)$"):
        sjdpp_speculative_config({"method": "sjdpp", "row_width": 17}, {"row_width": 4}, limits)  # the server's own
    with pytest.raises(ValueError, match=r"<= 128 \(max_model_len\)"):
        sjdpp_speculative_config({"method": "sjdpp", "row_width": 129}, None, (64, 128, None))  # no images


PLUGIN_PROBE = """
import sys, vllm
vllm.__version__ = sys.argv[2]  # what the plugin sees; the CPU build is what runs
import vllm.platforms
if sys.argv[3] == "gpu":
    type(vllm.platforms.current_platform).is_cpu = lambda self: False
exec(sys.argv[4])  # what the test changes in vLLM before the plugin loads
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm.utils.cpu_triton_utils as cpu_utils
from vllm.engine.arg_utils import EngineArgs
print("expand patched:", cpu_utils._expand_kernel_impl.__module__ == "vllm_sjdpp.patches.cpu_triton_utils")
args = dict(model=sys.argv[1], skip_tokenizer_init=True, max_model_len=64)
EngineArgs(**args).create_engine_config()
print("plain config: ok")
try:
    EngineArgs(speculative_config={"method": "sjdpp"}, **args).create_engine_config()
    print("sjdpp config: ok")
except RuntimeError as e:
    print("sjdpp config:", e)
"""


def _probe(model_path, version, platform="cpu", change=""):
    import subprocess
    import sys

    from tiny_llama import ENGINE_ENV

    result = subprocess.run(
        [sys.executable, "-c", PLUGIN_PROBE, model_path, version, platform, change], capture_output=True, text=True,
        timeout=300, env={**__import__("os").environ, **ENGINE_ENV},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def test_unsupported_vllm_leaves_plain_vllm_working_and_refuses_sjdpp(tiny_llama_path):
    out, err = _probe(tiny_llama_path, "0.40.0")
    assert "expand patched: False" in out  # nothing patched
    assert "plain config: ok" in out
    assert "sjdpp config: vllm-sjdpp supports vLLM 0.32 and 0.33; the installed vLLM is 0.40.0" in out
    assert "the plugin stays inactive" in err


def test_a_vllm_lacking_a_relied_on_internal_refuses_sjdpp_naming_it(tiny_llama_path):
    """vLLM without GPUModelRunner._preprocess: nothing patched, plain vLLM works, and sjdpp is
    refused at start-up naming the missing method."""
    remove = "from vllm.v1.worker.gpu_model_runner import GPUModelRunner; del GPUModelRunner._preprocess"
    out, err = _probe(tiny_llama_path, "0.32.0", change=remove)
    assert "expand patched: False" in out and "plain config: ok" in out
    assert "sjdpp config: vllm-sjdpp cannot patch vLLM 0.32.0: it lacks " in out
    assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner._preprocess(self, scheduler_output, num_input_tokens, ...): no '_preprocess'" in out
    assert "the plugin stays inactive" in err


def test_cpu_patches_apply_only_on_the_cpu_platform(tiny_llama_path):
    assert "expand patched: True" in _probe(tiny_llama_path, "0.32.0")[0]
    out, _ = _probe(tiny_llama_path, "0.32.0", platform="gpu")
    assert "expand patched: False" in out and "sjdpp config: ok" in out


@pytest.mark.parametrize("counts", [[1, 1, 1, 1], [0, 2, 1], [3, 0, 1, 2], [1, 2, 1], []])
@pytest.mark.parametrize("values, replace, output_dtype", [
    ([-1.0, 2.0, 3.0, 4.0], (-1, 7), torch.float32),
    ([0.0, 0.5, 1.25, 0.0], (0, 1), torch.float32),  # temperature: greedy (0) replaced by 1
    ([0, 11, 274, 3], (0, 0), torch.int32),  # top-k
], ids=["float", "temperature", "top-k"])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_cpu_expand_kernel_repeats_each_value_by_its_count(counts, values, replace, output_dtype, offsets_dtype):
    """The CPU expand kernel (vLLM's expand_kernel, in NumPy) against PyTorch's where and
    repeat_interleave, in the output's dtype: values replaced, repeated by their counts, nothing
    written past the last (an empty batch writes nothing)."""
    from vllm_sjdpp.patches.cpu_triton_utils import expand_kernel_impl

    values = torch.tensor(values[: len(counts)], dtype=output_dtype)
    cu = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(offsets_dtype)
    output = torch.full((sum(counts) + 2,), 99, dtype=output_dtype)
    expand_kernel_impl(output, values, cu, *replace)
    expected = torch.repeat_interleave(torch.where(values == replace[0], replace[1], values), torch.tensor(counts, dtype=torch.int64))
    assert torch.equal(output[: sum(counts)], expected.to(output_dtype)) and output[sum(counts):].eq(99).all()


def _runner_for_spec_metadata():
    """The attributes GPUModelRunner._calc_spec_decode_metadata reads, with vLLM's own methods."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = SimpleNamespace(
        arange_np=np.arange(256, dtype=np.int64), _arange_scratch=np.empty(256, dtype=np.int64), device="cpu",
        max_num_reqs=16,
        input_ids=SimpleNamespace(gpu=torch.arange(100, 356, dtype=torch.int32)),
        query_start_loc=SimpleNamespace(gpu=torch.full((17,), -7, dtype=torch.int32)),
    )
    runner._get_cumsum_and_arange = GPUModelRunner._get_cumsum_and_arange.__get__(runner)
    runner._calc_spec_decode_metadata = GPUModelRunner._calc_spec_decode_metadata.__get__(runner)
    return runner


@pytest.mark.parametrize("scheduled", [[1], [1, 1, 1, 1, 1, 1, 1, 1], [5, 1, 17, 1], [1, 30, 2]])
def test_spec_metadata_without_drafts_equals_vllms(scheduled):
    """Field for field (values, dtypes) what vLLM builds for a step without drafts, prompt chunks
    included; a step with drafts still gets vLLM's own."""
    import numpy as np

    runner = _runner_for_spec_metadata()
    general = runner._calc_spec_decode_metadata
    cu = np.cumsum(np.array(scheduled, dtype=np.int32))
    no_drafts = np.zeros(len(scheduled), dtype=np.int32)
    expected = general(no_drafts, cu)
    from vllm_sjdpp.patches.gpu_model_runner import _patch_spec_metadata_without_drafts

    _patch_spec_metadata_without_drafts(runner)

    def prepared(num_draft_tokens, cu):  # _prepare_inputs fills query_start_loc before it asks
        runner.query_start_loc.gpu[1 : len(cu) + 1] = torch.from_numpy(np.asarray(cu, dtype=np.int32))
        return runner._calc_spec_decode_metadata(num_draft_tokens, cu)

    prepared(np.zeros(16, dtype=np.int32), np.arange(1, 17))  # a larger batch first
    got = prepared(no_drafts, cu)
    again = prepared(no_drafts, cu + 3)  # the same batch size, the next step's positions
    assert again.logits_indices.tolist() == (cu + 2).tolist()
    got = prepared(no_drafts, cu)
    assert got.num_draft_tokens == expected.num_draft_tokens
    assert got.max_spec_len == expected.max_spec_len == 0
    for field in ("draft_token_ids", "cu_num_draft_tokens", "cu_num_sampled_tokens", "target_logits_indices",
                  "bonus_logits_indices", "logits_indices"):
        a, b = getattr(got, field), getattr(expected, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field

    drafts = np.array([min(n - 1, 3) for n in scheduled], dtype=np.int32)
    if drafts.any():
        with_drafts = prepared(drafts, cu)
        assert with_drafts.num_draft_tokens == drafts.tolist()
        assert torch.equal(with_drafts.logits_indices, general(drafts, cu).logits_indices)


def test_vllm_fills_query_start_loc_before_it_asks_for_spec_metadata():
    """`MetadataWithoutDrafts` takes the step's logits indices from `query_start_loc` on the
    device, which vLLM's `_prepare_inputs` copies there before it asks for the spec-decode
    metadata.  A vLLM that asked first would have the sampler read the previous step's rows
    without any error, so the order is checked in its source."""
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    source = inspect.getsource(inspect.unwrap(GPUModelRunner._prepare_inputs))
    assert source.index("self.query_start_loc.copy_to_gpu()") < source.index("self._calc_spec_decode_metadata(")


@pytest.mark.parametrize("proposal, companions, handed", [
    ([[], [], []], False, False),
    ([[], [5, 6], []], False, True),
    ([[4], [], [9, 9]], False, True),
    ([[], [], []], True, True),  # PairedScheduler hands drafts to companions as well
    ("tensor", False, True),  # vLLM's zeros when the input does not fit the drafter
    (None, False, True),
])
def test_a_proposal_without_drafts_is_not_handed_to_the_scheduler(proposal, companions, handed):
    """Steps where drafting does not pay hand the scheduler nothing (it would only set every
    request's spec_token_ids to the [] that scheduling left there); one draft anywhere, a
    batch with guidance companions or a proposal that is not a list, and vLLM's handover is
    the one without the patch."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sjdpp.patches.gpu_model_runner import _patch_no_empty_draft_handover

    req_ids = ["a", "b", "c"]
    if proposal == "tensor":
        proposal = torch.zeros(1, dtype=torch.int32).expand(3, 4)
    handed_over = []
    batch = SimpleNamespace(has_companions=companions)
    runner = SimpleNamespace(_draft_token_ids=proposal, sjdpp=SimpleNamespace(batch=batch))
    runner.take_draft_token_ids = lambda: handed_over.append(runner._draft_token_ids) or "vLLM's handover"
    _patch_no_empty_draft_handover(runner)
    got = runner.take_draft_token_ids()
    assert (got == "vLLM's handover") == handed and len(handed_over) == int(handed)
    if not handed:
        assert got is None
