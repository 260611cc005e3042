"""Property-based scheduling of paired and unpaired guided requests (hypothesis, derandomized).

Each example sends a mix of requests to one engine on the tiny guided Llama: paired (a negative
prompt of another length) and not, of two priorities, some with a structured-output field, and
runs a script of events at given steps: aborts, and pauses that let running requests drain
(vLLM admits no one until they are lifted).  The engines cover token budgets below one SJD++
window and large ones, prefill chunks, the priority policy, and a KV cache small enough to
preempt.  Within a step bound:
- every request finishes, or is refused (a structured-output field, a pair the cache cannot
  hold) with vLLM's validation error, or was aborted;
- a pause drains (no running request is left unfinished by it) before it is lifted;
- no companion's output leaves the engine, and no scheduler state outlives its request;
- every KV block returns to the pool;
- every greedy request that finished equals transformers' unbatched guidance.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from guided_engine import ENGINE, hf_greedy, params

K = 6
SJDPP = {"method": "sjdpp", "num_speculative_tokens": K, "draft_token_budget": None}
ENGINES = {
    # A pair's two windows never fit one step.
    "budget-below-a-window": dict(speculative_config=SJDPP, max_num_batched_tokens=K + 1),
    # Prefill in 16-token chunks, the priority policy, 12 blocks of 32 tokens: preemption.
    "priority-small-cache": dict(
        speculative_config=SJDPP, max_num_batched_tokens=16, scheduling_policy="priority",
        num_gpu_blocks_override=12, block_size=32,
    ),
    # vLLM's default budget, three sequences at a time: companions wait for a seat.
    "three-seqs": dict(speculative_config=SJDPP, max_num_seqs=3),
}
MAX_STEPS = 1500


@dataclass(frozen=True)
class Sent:
    prompt: tuple[int, ...]
    negative: tuple[int, ...] | None  # None: the rule's unconditional prompt (same length)
    max_tokens: int
    priority: int
    structured: bool


@dataclass(frozen=True)
class Script:
    requests: tuple[Sent, ...]
    aborts: tuple[tuple[int, int], ...]  # (step, request index)
    pause: tuple[int, int] | None  # (step, steps held after draining), None: no pause


tokens_of = st.lists(st.integers(2, 46), min_size=1, max_size=40).map(lambda t: (0, *t))
sent = st.builds(
    Sent,
    prompt=tokens_of,
    negative=st.none() | tokens_of,
    max_tokens=st.integers(1, 24),
    priority=st.integers(0, 1),
    structured=st.integers(0, 9).map(lambda i: i == 0),
)
scripts = st.builds(
    Script,
    requests=st.lists(sent, min_size=1, max_size=7).map(tuple),
    aborts=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 6)), max_size=2).map(tuple),
    pause=st.none() | st.tuples(st.integers(0, 20), st.integers(0, 3)),
)


_ENGINES: dict = {}  # name -> engine, while this module runs (hypothesis never holds one)


@pytest.fixture(scope="module", autouse=True)
def engines(make_engine, tiny_guided_path):
    """All of ENGINES, alive for the module, let go at its end and collected there: an engine
    collected later, while another module's runs, tears down vLLM's process-wide state under it."""
    _ENGINES.update({name: make_engine(tiny_guided_path, **ENGINE, **overrides) for name, overrides in ENGINES.items()})
    yield
    _ENGINES.clear()
    gc.collect()


def run_script(llm, script: Script) -> tuple[dict[int, list[int]], set[int], list[str]]:
    """The tokens of each request that finished, the indices refused, and every request id
    that left the engine."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.v1.core.sched.interface import PauseState

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    refused, ids = set(), {}
    for i, r in enumerate(script.requests):
        extra = {"guidance_scale": 3.0}
        if r.negative is not None:
            extra["negative_prompt_token_ids"] = list(r.negative)
        sampling = params(
            temperature=0, max_tokens=r.max_tokens, extra_args=extra,
            structured_outputs=StructuredOutputsParams(regex="[0-9]+") if r.structured else None,
        )
        try:
            engine.add_request(f"r{i}", {"prompt_token_ids": list(r.prompt)}, sampling, priority=r.priority)
            ids[f"r{i}"] = i
        except VLLMValidationError:
            refused.add(i)
    finished, left = {}, []
    paused_at = None
    for step in range(MAX_STEPS):
        for at, index in script.aborts:
            if at == step and f"r{index}" in ids:
                engine.abort_request([f"r{index}"], internal=False)
        if script.pause is not None and step == script.pause[0]:
            scheduler.set_pause_state(PauseState.PAUSED_NEW)
            paused_at = step
        if paused_at is not None and scheduler.get_num_unfinished_requests() == 0:
            if step - paused_at >= script.pause[1]:  # drained, held a few steps more
                scheduler.set_pause_state(PauseState.UNPAUSED)
                paused_at = None
        for out in engine.step():
            left.append(out.request_id)
            if out.finished and out.outputs[0].finish_reason == "length":
                finished[ids[out.request_id.rsplit("-", 1)[0]]] = list(out.outputs[0].token_ids)
        if not scheduler.requests and paused_at is None:
            return finished, refused, left
    raise AssertionError(
        f"not done within {MAX_STEPS} steps (paused since {paused_at}): {sorted(scheduler.requests)}"
    )


@settings(
    max_examples=10, derandomize=True, deadline=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(script=scripts)
@pytest.mark.parametrize("name", list(ENGINES))
def test_every_request_ends_and_its_blocks_return(name, hf_guided, script):
    engine = _ENGINES[name]
    scheduler = engine.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()
    finished, refused, left = run_script(engine, script)
    aborted = {i for _, i in script.aborts}
    assert not any(r.endswith("::uncond") for r in left)
    assert not scheduler.requests and not scheduler.partners and not scheduler.companions
    assert pool.get_num_free_blocks() == free
    for i, r in enumerate(script.requests):
        assert (i in refused) == r.structured or (i in refused and r.negative is not None), (i, r)
        if i in refused:
            continue
        assert i in finished or i in aborted, (i, r)
        if i in finished:
            negative = list(r.negative) if r.negative is not None else None
            assert finished[i] == hf_greedy(hf_guided, list(r.prompt), 3.0, negative=negative, n=r.max_tokens), (i, r)
