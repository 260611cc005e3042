"""The guided models on vLLM's GPU compilation path (`VLLM_COMPILE`: Dynamo traces the model's
compiled module, vLLM splits the graph at attention into pieces and compiles them per range of
batch sizes), run on CPU.

vLLM's CPU platform replaces VLLM_COMPILE with DYNAMO_TRACE_ONCE (vllm/platforms/cpu.py,
`check_and_update_config`) and, having no static graphs, never completes the compile sizes.  The
fixture `compiled` keeps the mode, with Dynamo's "eager" backend (no Inductor: seconds to compile,
and eager mode's kernels) and no CUDA graphs, which a CPU cannot capture, and completes the sizes
as vLLM's CUDA path does (`post_init_cudagraph_sizes`).  What CUDA graphs need is then checked
where vLLM decides it:
- every piece's runtime batch size lies in vLLM's compile ranges, [1, max_num_batched_tokens]
  (vLLM asserts it; the calls are recorded too, so no test passes without the compiled path);
- every tensor the compiled graph receives is the same storage at every call (`data_ptr`): a
  CUDA graph replays the input addresses it was captured with.
Each check has a broken variant that it rejects: the branches stacked before the compiled module
(the design this replaced) and guidance inputs reallocated at each step.

A restart is checked with Inductor (vLLM's AOT compile cache takes no "eager" artifacts): the
engine started a second time over the same cache loads the compiled forward from it and gives
the tokens of the first start and of an eager engine.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from guided_engine import ENGINE, assert_branch, branch_logprobs, params, run, tokens

MAX_BATCH = 64  # below the long prompt: its prefill comes in chunks
SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6, "draft_token_budget": None}
PROMPTS = [[0, 5, 6, 7, 8], [0, 9, 10], [0] + [11 + i % 30 for i in range(99)], [0, 30]]


class GraphCalls:
    """What the compiled graphs received: per piece, (runtime batch size, its compile ranges);
    per compiled graph, the data_ptr of each tensor input at each call."""

    def __init__(self):
        self.pieces: list[tuple[int, list]] = []
        self.inputs: dict[int, list[list[int | None]]] = defaultdict(list)

    def clear(self) -> None:
        self.pieces.clear()
        self.inputs.clear()

    def moved_inputs(self) -> list[str]:
        """The graph inputs whose storage changed between calls (empty: replay-safe)."""
        moved = []
        for graph, calls in self.inputs.items():
            for index, ptrs in enumerate(zip(*calls)):
                if ptrs[0] is not None and len(set(ptrs)) > 1:
                    moved.append(f"graph {graph} input {index}: {len(set(ptrs))} addresses over {len(ptrs)} calls")
        return moved


@pytest.fixture(scope="module")
def calls():
    """vLLM's VLLM_COMPILE mode kept on CPU while this module's engines start, and the compiled
    graphs' calls recorded while its tests run."""
    from vllm.compilation.caching import VllmSerializableFunction
    from vllm.compilation.piecewise_backend import PiecewiseBackend
    from vllm.config import CompilationMode, CUDAGraphMode
    from vllm.platforms.cpu import CpuPlatform

    record = GraphCalls()
    record.backend = "eager"
    check_and_update = CpuPlatform.check_and_update_config.__func__
    piece_call = PiecewiseBackend.__call__
    graph_call = VllmSerializableFunction.__call__

    def keep_vllm_compile(cls, vllm_config):
        mode = vllm_config.compilation_config.mode
        check_and_update(cls, vllm_config)
        if mode == CompilationMode.VLLM_COMPILE:
            config = vllm_config.compilation_config
            config.mode, config.backend, config.cudagraph_mode = mode, record.backend, CUDAGraphMode.NONE
            config.post_init_cudagraph_sizes()

    def recorded_piece(self, *args):
        if self.sym_shape_indices:
            record.pieces.append((args[self.sym_shape_indices[0]], list(self.compile_ranges)))
        return piece_call(self, *args)

    def recorded_graph(self, *args, **kwargs):
        record.inputs[id(self)].append([a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args])
        return graph_call(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CpuPlatform, "check_and_update_config", classmethod(keep_vllm_compile))
        mp.setattr(PiecewiseBackend, "__call__", recorded_piece)
        mp.setattr(VllmSerializableFunction, "__call__", recorded_graph)
        yield record


def compiled_engine(make_engine, folder, **overrides):
    from vllm.config import CompilationMode

    llm = make_engine(folder, enforce_eager=False, max_num_batched_tokens=MAX_BATCH, **overrides)
    assert llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.VLLM_COMPILE
    return llm


@pytest.fixture(scope="module")
def guided_sjdpp(make_engine, tiny_guided_path, calls):
    return compiled_engine(make_engine, tiny_guided_path, speculative_config=SJDPP, **ENGINE)


@pytest.fixture(scope="module")
def guided_eager(make_engine, tiny_guided_path, guided_sjdpp):
    return make_engine(tiny_guided_path, speculative_config=SJDPP, max_num_batched_tokens=MAX_BATCH, **ENGINE)


def requests(disable: bool, seeds=range(4)):
    extra = {"sjdpp_disable": True} if disable else None
    greedy = [params(temperature=0, max_tokens=24, extra_args=extra) for _ in PROMPTS]
    seeded = [params(temperature=1.0, top_k=20, seed=s, max_tokens=24, extra_args=extra) for s in seeds]
    return greedy + seeded


def generate(llm, disable: bool) -> list[list[int]]:
    sampling = requests(disable)
    prompts = PROMPTS + [PROMPTS[i % len(PROMPTS)] for i in range(len(sampling) - len(PROMPTS))]
    return tokens(run(llm, prompts, sampling))


def assert_batch_units(calls: GraphCalls) -> None:
    sizes = {size for size, _ in calls.pieces}
    assert len(sizes) > 1, f"the compiled path did not run over several batch sizes: {sizes}"
    for size, ranges in calls.pieces:
        assert [(r.start, r.end) for r in ranges] == [(1, MAX_BATCH)]
        assert 1 <= size <= MAX_BATCH, f"a piece ran {size} rows: outside vLLM's compile ranges {ranges}"


def test_guided_llama_compiles_in_batch_units_with_fixed_inputs(guided_sjdpp, calls):
    """SJD++ windows, plain steps and a prompt prefilled in chunks: the pieces run on the batch's
    T tokens (not 2T), and the graph's inputs never move."""
    calls.clear()
    generate(guided_sjdpp, disable=False)
    generate(guided_sjdpp, disable=True)
    assert calls.inputs, "no compiled graph ran"
    assert_batch_units(calls)
    assert calls.moved_inputs() == []


def test_compiled_tokens_equal_eager_and_plain_decoding(guided_sjdpp, guided_eager):
    """The compiled engine's tokens (greedy, and seeded: a seed names one image) equal an eager
    engine's, with SJD++ and with `sjdpp_disable`."""
    compiled = generate(guided_sjdpp, disable=False)
    assert compiled == generate(guided_sjdpp, disable=True)
    assert compiled == generate(guided_eager, disable=False)


def test_guidance_inputs_reallocated_each_step_are_caught(guided_sjdpp, calls, monkeypatch):
    """Broken variant: guidance buffers replaced at each step (what `GuidanceBatch` did when a
    batch outgrew them), the model's buffer with them, move a graph input, which a CUDA graph
    replay would not see."""
    from vllm_sjdpp.engine.runtime import runtime_of
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    prepare = GuidanceBatch.prepare
    module = runtime_of(guided_sjdpp).runner.get_model().model

    def prepare_into_new_buffers(self, runner, num_tokens):
        self.uncond_override, self.token_scale = self.uncond_override.clone(), self.token_scale.clone()
        module.uncond_override = self.uncond_override
        prepare(self, runner, num_tokens)

    monkeypatch.setattr(GuidanceBatch, "prepare", prepare_into_new_buffers)
    calls.clear()
    generate(guided_sjdpp, disable=False)
    assert calls.moved_inputs() != []


def test_branches_stacked_before_the_compiled_module_fail_at_start_up(make_engine, tiny_guided_path, calls, monkeypatch):
    """Broken variant, the design this replaced: both branches stacked before vLLM's compiled
    Llama, which then runs 2T rows; vLLM's start-up profile run (T = max_num_batched_tokens)
    leaves its compile ranges."""
    from vllm.model_executor.models.llama import LlamaModel

    from vllm_sjdpp.guidance.llama import GuidedLlamaForCausalLM, GuidedLlamaModel, run_branches

    def stacked_outside(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return run_branches(self.model, self.model.uncond_override, input_ids, positions, intermediate_tensors)

    monkeypatch.setattr(GuidedLlamaModel, "forward", LlamaModel.forward)
    monkeypatch.setattr(GuidedLlamaForCausalLM, "forward", stacked_outside)
    with pytest.raises(AssertionError, match=f"Shape: {2 * MAX_BATCH} out of considered ranges"):
        compiled_engine(make_engine, tiny_guided_path, **ENGINE)


def test_the_paired_layout_compiles_in_batch_units_with_fixed_inputs(make_engine, tiny_guided_path, hf_guided, calls):
    """One branch per sequence: every guided request a pair, the pieces on the batch's T tokens,
    inputs that never move, and transformers' guided greedy tokens."""
    from guided_engine import hf_greedy

    llm = compiled_engine(
        make_engine, tiny_guided_path, speculative_config=SJDPP, hf_overrides={"sjdpp_guidance_layout": "paired"}, **ENGINE
    )
    calls.clear()
    for disable in (False, True):
        extra = {"guidance_scale": 3.0, "sjdpp_disable": disable}
        got = tokens(run(llm, PROMPTS, [params(temperature=0, max_tokens=24, extra_args=extra) for _ in PROMPTS]))
        assert got == [hf_greedy(hf_guided, p, 3.0, n=24) for p in PROMPTS]
    assert calls.inputs, "no compiled graph ran"
    assert_batch_units(calls)
    assert calls.moved_inputs() == []


@pytest.fixture(scope="module")
def janus_sjdpp(make_engine, janus_pro_path, calls, guided_eager):
    from tiny_janus import JANUS_PRO

    return compiled_engine(
        make_engine, janus_pro_path, speculative_config=SJDPP, max_model_len=64 + JANUS_PRO.tokens, max_num_seqs=16
    ), JANUS_PRO


def test_janus_compiles_in_batch_units_with_fixed_inputs(janus_sjdpp, calls):
    """A Janus-Pro-shaped folder: the same checks, and a seed's codes equal with and without
    SJD++ under compilation."""
    from vllm_sjdpp import families

    llm, shape = janus_sjdpp
    family = families.load(llm.llm_engine.model_config.model)
    prompts = [family.prompt_ids(t) for t in ("a red dog", "the big green tree under the sun")]
    calls.clear()
    codes = {}
    for disable in (False, True):
        extra = {"sjdpp_disable": True} if disable else None
        sampling = [params(temperature=1.0, seed=s, max_tokens=2 * shape.grid, extra_args=extra) for s in range(4)]
        codes[disable] = tokens(run(llm, [prompts[s % 2] for s in range(4)], sampling))
    assert codes[False] == codes[True]
    assert calls.inputs, "no compiled graph ran"
    sizes = {size for size, _ in calls.pieces}
    assert len(sizes) > 1 and max(sizes) <= MAX_BATCH, sizes
    assert calls.moved_inputs() == []


@pytest.fixture
def inductor_compile_cache(calls, tmp_path, monkeypatch):
    """Engines started in the test compile with Inductor into a compile cache of their own."""
    import os

    import vllm.envs as envs
    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass

    monkeypatch.setattr(calls, "backend", "inductor")
    # It names CUDA-only ops (torch.ops._C.*_fp8_quant) on CPU; it only saves copies.
    monkeypatch.setattr(FixFunctionalizationPass, "__call__", lambda self, graph: None)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # vLLM sets it for the process
    if inductor_dir is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_dir)
    envs.disable_envs_cache()  # an engine's start froze the environment it read
    yield
    envs.disable_envs_cache()


def test_a_restart_loads_the_compiled_forward_and_gives_the_same_logits(
    make_engine, tiny_guided_path, inductor_compile_cache, guided_eager
):
    """The guided Llama started twice over one compile cache: the second start loads vLLM's AOT
    artifact instead of compiling, its forward reads the guidance inputs as the model's buffer,
    which the guidance writes in place, and both starts give the eager engine's tokens and
    guided logprobs (scale 3).  Broken variant, a third start: a buffer that is a copy of the
    guidance's input (unguided logits) is caught."""
    from vllm.compilation.counter import compilation_counter

    from vllm_sjdpp.engine.runtime import runtime_of
    from vllm_sjdpp.guidance.llama import BranchForward

    def outputs(llm):
        return generate(llm, disable=False), branch_logprobs(llm, PROMPTS, scales=[3.0] * len(PROMPTS))

    def start():
        """(AOT compiles, AOT loads) of a start, whether its buffer is the guidance's, its outputs."""
        compiles, loads = compilation_counter.num_aot_compiles, compilation_counter.num_aot_artifacts_loaded
        llm = compiled_engine(make_engine, tiny_guided_path, speculative_config=SJDPP, **ENGINE)
        counts = compilation_counter.num_aot_compiles - compiles, compilation_counter.num_aot_artifacts_loaded - loads
        model = runtime_of(llm).runner.get_model().model
        shared = dict(model.named_buffers())["uncond_override"].data_ptr() == model.guidance.uncond_override.data_ptr()
        return counts, shared, outputs(llm)

    tokens, logprobs = outputs(guided_eager)
    for expected_counts in [(1, 0), (0, 1)]:
        counts, shared, (got_tokens, got_logprobs) = start()
        assert counts == expected_counts and shared
        assert got_tokens == tokens
        assert_branch(got_logprobs, logprobs)

    hold = BranchForward.hold_guidance

    def hold_a_copy(self, guidance):
        hold(self, guidance)
        self.uncond_override = guidance.uncond_override.clone()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BranchForward, "hold_guidance", hold_a_copy)
        counts, shared, (_, broken) = start()
    assert counts == (0, 1) and not shared
    with pytest.raises(AssertionError):
        assert_branch(broken, logprobs)
