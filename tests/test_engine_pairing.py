"""Negative prompts of another length (paired requests, `guidance.pairing`) against transformers'
unbatched guidance, which runs the negative prompt with its own cache at its own length.

Engines on the tiny guided Llama (grouped queries):
- `guided`: guidance, no speculation, both branches in each sequence (the folder's "stacked"
  layout: each member of a pair runs both);
- `tight`: guidance and SJD++ with a 16-token budget per step (prompts prefill in chunks, pairs
  are split by the budget) and a KV cache of 12 blocks of 32 tokens (requests are preempted), one
  branch per sequence (the "paired" layout, Emu3's and Lumina-mGPT's);
- `guided_sjdpp`: guidance and SJD++, paired layout (created last: metrics are read from the
  newest engine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_engine import ENGINE, VOCAB, hf_greedy, params, run, tokens
from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues
from tiny_llama import GUIDED_PAD

SJDPP = {"method": "sjdpp", "num_speculative_tokens": 6}
PAIRED_LAYOUT = {"hf_overrides": {"sjdpp_guidance_layout": "paired"}}
PROMPTS = [[0, 5, 6, 7, 8], [0, 9, 10], [0, 20, 21, 22, 23, 24, 25], [0, 30]]
# Shorter and longer than their prompts.
NEGATIVES = [[0, 3], [0, 3, 4, 11, 12, 13, 14], [0, 40, 41], [0, 2, 2, 2, 2, 2]]


def guided_params(scale, negative, **kw):
    return params(extra_args={"guidance_scale": scale, "negative_prompt_token_ids": negative}, **kw)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@pytest.fixture(scope="module")
def guided(make_engine, tiny_guided_path):
    return make_engine(tiny_guided_path, **ENGINE)


@pytest.fixture(scope="module")
def tight(make_engine, tiny_guided_path, guided):
    return make_engine(
        tiny_guided_path, speculative_config=SJDPP, max_num_batched_tokens=16, num_gpu_blocks_override=12,
        block_size=32, **PAIRED_LAYOUT, **ENGINE,
    )


@pytest.fixture(scope="module")
def guided_sjdpp(make_engine, tiny_guided_path, guided, tight):
    return make_engine(tiny_guided_path, speculative_config=SJDPP, **PAIRED_LAYOUT, **ENGINE)


def test_engines_run_the_paired_scheduler(guided):
    from vllm_sjdpp.patches.scheduler import PairedScheduler

    assert isinstance(scheduler_of(guided), PairedScheduler)


def kv_heads(llm) -> int:
    return scheduler_of(llm).kv_cache_config.kv_cache_groups[0].kv_cache_spec.num_kv_heads


def test_the_paired_layout_runs_one_branch_per_sequence(guided, guided_sjdpp, hf_guided, monkeypatch):
    """One branch per sequence: the checkpoint's KV heads (the stacked layout holds twice as many),
    and every guided request pairs, its equal-length negative prompt (the folder's rule) too,
    giving transformers' guidance; at scale 1 nothing pairs (the conditional model alone)."""
    from vllm_sjdpp.patches import scheduler as scheduler_module

    assert kv_heads(guided) == 2 * kv_heads(guided_sjdpp) == 2 * hf_guided.config.num_key_value_heads
    companions = []
    companion_id = scheduler_module.companion_id
    monkeypatch.setattr(scheduler_module, "companion_id", lambda r: companions.append(r) or companion_id(r))
    for scale in (3.0, 1.0):
        expected = [hf_greedy(hf_guided, p, scale) for p in PROMPTS]
        sampling = params(temperature=0, max_tokens=12, extra_args={"guidance_scale": scale})
        companions.clear()
        assert tokens(run(guided_sjdpp, PROMPTS, sampling)) == expected
        assert len(companions) == (len(PROMPTS) if scale != 1 else 0)


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_greedy_equals_transformers_unbatched_guidance(guided, guided_sjdpp, hf_guided, scale):
    expected = [hf_greedy(hf_guided, p, scale, negative=n) for p, n in zip(PROMPTS, NEGATIVES)]
    sampling = [guided_params(scale, n, temperature=0, max_tokens=12) for n in NEGATIVES]
    assert tokens(run(guided, PROMPTS, sampling)) == expected
    assert tokens(run(guided_sjdpp, PROMPTS, sampling)) == expected
    # Broken variant (what Emu3 users reported degrading images): the negative prompt padded to
    # the prompt's length, which the equal-length path then runs at the prompt's positions.
    padded = [n[:len(p)] + [GUIDED_PAD] * (len(p) - len(n)) for p, n in zip(PROMPTS, NEGATIVES)]
    shorter = [i for i, (p, n) in enumerate(zip(PROMPTS, NEGATIVES)) if len(n) < len(p)]
    got = tokens(run(guided_sjdpp, PROMPTS, [guided_params(scale, n, temperature=0, max_tokens=12) for n in padded]))
    assert all(got[i] != expected[i] for i in shorter)


def test_rows_without_their_companion_are_caught(guided_sjdpp, hf_guided, monkeypatch):
    """Broken variant: the paired rows combined with their own sequence's second branch instead
    of the companion's rows (the conditional model alone)."""
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    monkeypatch.setattr(GuidanceBatch, "partner_rows", lambda self, rows: (rows[:0], rows[:0]))
    expected = [hf_greedy(hf_guided, p, 3.0, negative=n) for p, n in zip(PROMPTS, NEGATIVES)]
    got = tokens(run(guided_sjdpp, PROMPTS, [guided_params(3.0, n, temperature=0, max_tokens=12) for n in NEGATIVES]))
    assert all(g != e for g, e in zip(got, expected))


def test_chunked_prefill_preemption_and_split_pairs(tight, hf_guided, monkeypatch):
    """Long prompts and negative prompts prefilled in 16-token chunks, 12 requests in a KV cache
    that holds a few of them: requests are preempted (a pair whose member is preempted runs apart,
    is discarded and rolled back), and every output still equals transformers'.  A mixed batch: equal-length negative
    prompts and the rule's default run beside the paired requests."""
    from vllm_sjdpp.patches.scheduler import PairedScheduler

    scheduler = scheduler_of(tight)
    preempted, split = [], []
    preempt, update = PairedScheduler._preempt_request, PairedScheduler.update_from_output

    def count_preempt(self, request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(self, request, *args, **kwargs)

    def count_split(self, *args, **kwargs):
        before = set(self.split_pairs)
        out = update(self, *args, **kwargs)
        split.extend(self.split_pairs - before)
        return out

    monkeypatch.setattr(PairedScheduler, "_preempt_request", count_preempt)
    monkeypatch.setattr(PairedScheduler, "update_from_output", count_split)
    rng = np.random.default_rng(0)
    prompts, negatives = [], []
    for i in range(12):
        prompts.append([0] + rng.integers(2, 40, size=int(rng.integers(20, 45))).tolist())
        negatives.append(
            [0] + rng.integers(2, 40, size=int(rng.integers(5, 50))).tolist() if i % 4 != 3 else None
        )
    sampling = [
        guided_params(3.0, n, temperature=0, max_tokens=40) if n is not None
        else params(temperature=0, max_tokens=40, extra_args={"guidance_scale": 3.0})
        for n in negatives
    ]
    expected = [hf_greedy(hf_guided, p, 3.0, negative=n, n=40) for p, n in zip(prompts, negatives)]
    assert tokens(run(tight, prompts, sampling)) == expected
    assert preempted  # (a pair runs apart only where vLLM preempts one member)
    assert not scheduler.requests and not scheduler.partners  # every companion ended with its request
    # Where the budget splits pairs (each member takes what vLLM offers it, as before the pair
    # shared it), the runner's discard and the rollback keep the outputs exact.  Broken variant:
    # a member that runs without its partner keeps what it sampled.
    from vllm.v1.request import RequestStatus

    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    def budget_splits_pairs(self, request, num_computed_tokens, num_new_tokens):
        if request.request_id not in self.partners:
            return num_new_tokens
        partner = self._alive(self.partners[request.request_id])
        hold = request.num_tokens - 1
        if request.status == RequestStatus.RUNNING and num_computed_tokens + num_new_tokens > hold:
            if partner is None or not self._ready(partner):
                return max(hold - num_computed_tokens, 0)
        return num_new_tokens

    monkeypatch.setattr(PairedScheduler, "_paired_tokens", budget_splits_pairs)
    split.clear()
    assert tokens(run(tight, prompts, sampling)) == expected  # split, discarded, rolled back
    assert split
    monkeypatch.setattr(GuidanceBatch, "_discard", staticmethod(lambda runner, rows: None))
    got = tokens(run(tight, prompts, sampling))
    assert sum(g != e for g, e in zip(got, expected)) >= 3


def test_prefix_caching_shares_prompts_and_negative_prompts(guided_sjdpp, hf_guided, monkeypatch):
    """Two requests sharing a negative prompt: the second's companion is served from the cache;
    two sharing a prompt with different negative prompts: the second's own sequence is.  Each
    still equals transformers (a block holds one branch's KV for whichever request uses it)."""
    from vllm_sjdpp.patches.scheduler import PairedScheduler

    block = guided_sjdpp.llm_engine.vllm_config.cache_config.block_size
    hits = {}
    lookup = PairedScheduler._get_local_prefix_cache_hit

    def record(self, request):
        out = lookup(self, request)
        hits[request.request_id] = out[1]
        return out

    monkeypatch.setattr(PairedScheduler, "_get_local_prefix_cache_hit", record)
    rng = np.random.default_rng(1)
    shared_negative = [0] + rng.integers(2, 40, size=block + 5).tolist()
    shared_prompt = [0] + rng.integers(2, 40, size=block + 9).tolist()
    cases = [
        ([0, 7, 8, 9], shared_negative),
        ([0, 11, 12], shared_negative),
        (shared_prompt, [0, 3, 4]),
        (shared_prompt, [0, 5, 6, 7, 8, 9]),
    ]
    for prompt, negative in cases:
        out = run(guided_sjdpp, [prompt], guided_params(3.0, negative, temperature=0, max_tokens=10))[0]
        assert list(out.outputs[0].token_ids) == hf_greedy(hf_guided, prompt, 3.0, negative=negative, n=10)
    companions = [r for r in hits if r.endswith("::uncond")]
    requests = [r for r in hits if not r.endswith("::uncond")]
    assert hits[companions[1]] >= block  # the shared negative prompt
    assert hits[requests[3]] >= block  # the shared prompt


def test_seeds_and_n(guided, guided_sjdpp):
    """A seed names one output, paired or not on every server: n = 2 seeded requests repeat,
    and SJD++ gives what plain guided decoding gives."""
    sampling = [guided_params(2.0, n, temperature=1.0, top_k=12, max_tokens=24, seed=s, n=2)
                for s, n in enumerate(NEGATIVES)]

    def outputs(llm):
        return [[list(c.token_ids) for c in o.outputs] for o in run(llm, PROMPTS, sampling)]

    first = outputs(guided_sjdpp)
    assert outputs(guided_sjdpp) == first == outputs(guided)
    assert all(len(o) == 2 and len(o[0]) == 24 for o in first)


def test_abort_ends_the_companion(guided_sjdpp):
    engine = guided_sjdpp.llm_engine
    scheduler = scheduler_of(guided_sjdpp)
    engine.add_request("aborted", {"prompt_token_ids": PROMPTS[0]}, guided_params(3.0, NEGATIVES[1], max_tokens=200))
    for _ in range(3):
        engine.step()
    assert len(scheduler.requests) == 2 and scheduler.partners
    engine.abort_request(["aborted"], internal=False)
    assert not scheduler.requests and not scheduler.partners
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "sampling, match",
    [
        (dict(prompt_logprobs=2), "prompt_logprobs"),
        (dict(max_tokens=250), "maximum context length"),
    ],
)
def test_bad_paired_requests_are_refused(guided_sjdpp, sampling, match):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=match):
        run(guided_sjdpp, [PROMPTS[0]], guided_params(3.0, NEGATIVES[1], **sampling))
    assert len(tokens(run(guided_sjdpp, [PROMPTS[0]], guided_params(3.0, NEGATIVES[1], max_tokens=3)))[0]) == 3


def test_the_companion_key_is_refused_as_a_request_option(guided_sjdpp):
    """Only the scheduler marks companions: a request marked so would be taken for a companion
    whose request never comes (its tokens discarded every step, never finished)."""
    from vllm.exceptions import VLLMValidationError

    from vllm_sjdpp.config import COMPANION_OF_KEY

    engine = guided_sjdpp.llm_engine
    try:  # added, not generated: where it is let in, the test fails instead of waiting for it
        with pytest.raises(VLLMValidationError, match=COMPANION_OF_KEY):
            engine.add_request(
                "companion-key", {"prompt_token_ids": PROMPTS[0]}, params(max_tokens=3, extra_args={COMPANION_OF_KEY: "x"})
            )
    finally:
        engine.abort_request(["companion-key"])
    assert len(tokens(run(guided_sjdpp, [PROMPTS[0]], params(max_tokens=3)))[0]) == 3


def test_a_livelock_fails_within_the_suite_s_step_bound(guided_sjdpp, monkeypatch):
    """The bound on every test engine (tests/stall_guard.py), on the livelock the companion key
    made before it was refused: a request taken for a companion whose request never comes.
    `LLM.generate` fails within STALL_STEPS steps instead of hanging, the stuck request is
    aborted, and the engine serves on."""
    from stall_guard import STALL_STEPS

    from vllm_sjdpp.config import COMPANION_OF_KEY
    from vllm_sjdpp.patches import input_processor

    check = input_processor.check_request

    def lets_the_key_in(facts, prompt, sampling):
        key = sampling.extra_args.pop(COMPANION_OF_KEY)
        try:
            return check(facts, prompt, sampling)
        finally:
            sampling.extra_args[COMPANION_OF_KEY] = key

    monkeypatch.setattr(input_processor, "check_request", lets_the_key_in)
    engine = guided_sjdpp.llm_engine
    steps, step = [], engine.step
    monkeypatch.setattr(engine, "step", lambda: (steps.append(1), step())[1])
    with pytest.raises(AssertionError, match=f"engine stalled: {STALL_STEPS} steps without progress"):
        run(guided_sjdpp, [PROMPTS[0]], params(max_tokens=3, extra_args={COMPANION_OF_KEY: "x"}))
    assert len(steps) <= STALL_STEPS + 5 and not engine.has_unfinished_requests()
    monkeypatch.undo()
    assert len(tokens(run(guided_sjdpp, [PROMPTS[0]], params(max_tokens=3)))[0]) == 3


def test_a_pair_the_kv_cache_cannot_hold_is_refused(tight):
    """The 12-block cache holds either sequence at full length but not both: such a pair could
    never run (each member would wait for the other's blocks), so it is a 400, and the engine
    goes on serving."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="KV blocks"):
        run(tight, [PROMPTS[0]], guided_params(3.0, NEGATIVES[1], temperature=0, max_tokens=240))
    assert len(tokens(run(tight, [PROMPTS[0]], guided_params(3.0, NEGATIVES[1], temperature=0, max_tokens=100)))[0]) == 100


# Sampled: per-position and adjacent-pair chi-square, Bonferroni over the comparisons.
SAMPLES, LENGTH = 2000, 5
SAMPLE_PROMPT, SAMPLE_NEGATIVE = [0, 5, 6, 7], [0, 3, 4, 11, 12, 13, 14]


def hf_samples(hf_guided, scale, negative, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    out = hf_guided.generate(
        torch.tensor([SAMPLE_PROMPT] * SAMPLES), do_sample=True, temperature=1.0, top_k=0, max_new_tokens=LENGTH,
        guidance_scale=scale, negative_prompt_ids=torch.tensor([negative] * SAMPLES),
    )
    return out[:, len(SAMPLE_PROMPT):].numpy()


def accepted_drafts(llm) -> float:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


@pytest.fixture
def drafting_everywhere(guided_sjdpp):
    """No draft-token budget: every request drafts, however many run (the goodput controller
    would stop drafting at this batch size)."""
    from vllm_sjdpp.engine.runtime import runtime_of

    runtime = runtime_of(guided_sjdpp)
    budget = runtime.config.draft_token_budget
    runtime.set_draft_token_budget(None)
    yield
    runtime.set_draft_token_budget(budget)


def test_sampling_matches_transformers(guided_sjdpp, hf_guided, drafting_everywhere):
    before = accepted_drafts(guided_sjdpp)
    sampling = guided_params(3.0, SAMPLE_NEGATIVE, temperature=1.0, max_tokens=LENGTH)
    got = np.array(tokens(run(guided_sjdpp, [SAMPLE_PROMPT] * SAMPLES, sampling)))
    # Drafts accepted (the companions' are not counted): about one per 5-token sample.
    assert accepted_drafts(guided_sjdpp) - before > SAMPLES // 2
    pvalues = position_pair_pvalues(got, hf_samples(hf_guided, 3.0, SAMPLE_NEGATIVE), VOCAB)
    assert min(pvalues) > ALPHA / len(pvalues)
    # Broken variants: the negative prompt cut to the prompt's length (run in its sequence), and
    # the cond model alone.
    padded = SAMPLE_NEGATIVE[: len(SAMPLE_PROMPT)]
    broken = np.array(tokens(run(guided_sjdpp, [SAMPLE_PROMPT] * SAMPLES, guided_params(3.0, padded, temperature=1.0, max_tokens=LENGTH))))
    assert min(position_pair_pvalues(got, broken, VOCAB)) < BROKEN_ALPHA
    assert min(position_pair_pvalues(got, hf_samples(hf_guided, 1.0, SAMPLE_NEGATIVE), VOCAB)) < BROKEN_ALPHA
