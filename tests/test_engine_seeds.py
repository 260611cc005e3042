"""A seed names one output: with SJD++ drafting at any window, under any draft-token budget,
among other running requests, the tokens are those of the same request with `sjdpp_disable`
(plain decoding, one token per pass).  Both race the same position-keyed noise
(kernels/noise.py): SJD++ by Gumbel-coupled verification, plain steps by `engine.race_sampler`.

One engine, the tiny Llama with SJD++ at k = 32 (the windows the test asks for are per request).
The broken variants key the step's noise by the request's step count, or share one key across
requests, and must make the identity fail.
"""

from __future__ import annotations

import pytest

from vllm_sjdpp.engine import sampler as sampler_module
from vllm_sjdpp.engine.runtime import runtime_of

SEEDS = range(200)
MAX_TOKENS = 40
PROMPTS = [[2 + i % 40, 3 + i % 37, 4] for i in SEEDS]
OTHERS = 16  # unseeded requests in flight beside the seeded ones
SAMPLING = {
    "top-k": dict(temperature=1.0, top_k=8),
    "top-p": dict(temperature=0.9, top_p=0.8),
}


@pytest.fixture(scope="module")
def sjdpp(make_engine, tiny_llama_path):
    return make_engine(tiny_llama_path, max_model_len=128, speculative_config={
        "method": "sjdpp", "num_speculative_tokens": 32, "draft_token_budget": None,
    })


def params(seed=None, extra_args=None, max_tokens=MAX_TOKENS, **kw):
    from vllm import SamplingParams

    return SamplingParams(ignore_eos=True, detokenize=False, max_tokens=max_tokens, seed=seed, extra_args=extra_args, **kw)


def seeded_outputs(llm, sampling: dict, extra_args=None, others: int = 0) -> list[list[int]]:
    """The 200 seeded requests' tokens, generated together with `others` unseeded requests twice
    as long (so they run from first step to last)."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS] + [{"prompt_token_ids": [5, 6]}] * others
    sampling_params = [params(seed, extra_args, **sampling) for seed in SEEDS]
    sampling_params += [params(None, None, 2 * MAX_TOKENS, **sampling)] * others
    outs = llm.generate(prompts, sampling_params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs[: len(SEEDS)]]


def accepted_tokens(llm) -> float:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


@pytest.fixture(scope="module")
def plain(sjdpp):
    return {name: seeded_outputs(sjdpp, s, {"sjdpp_disable": True}) for name, s in SAMPLING.items()}


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("k", [4, 16, 32])
@pytest.mark.parametrize("budget", [None, 0, "auto"], ids=["full", "budget0", "auto"])
def test_seeded_tokens_equal_plain_decoding(sjdpp, plain, sampling, k, budget):
    runtime = runtime_of(sjdpp)
    before = accepted_tokens(sjdpp)
    runtime.set_draft_token_budget(budget)
    try:
        got = seeded_outputs(sjdpp, SAMPLING[sampling], {"sjdpp_num_speculative_tokens": k}, others=OTHERS)
    finally:
        runtime.set_draft_token_budget(None)
    mismatched = [s for s, (a, b) in enumerate(zip(got, plain[sampling])) if a != b]
    assert not mismatched, f"seeds {mismatched[:10]} differ from plain decoding"
    assert len(set(map(tuple, got))) > 150  # the seeds matter
    if budget is None:
        assert accepted_tokens(sjdpp) > before + 1000  # drafts were verified and accepted


def test_a_seed_is_the_same_on_every_call(sjdpp):
    first = seeded_outputs(sjdpp, SAMPLING["top-k"])[:20]
    assert seeded_outputs(sjdpp, SAMPLING["top-k"], others=OTHERS)[:20] == first


def _rekeyed(monkeypatch, rekey):
    """Run the step with its noise keys rewritten by `rekey(keys, step)`."""
    real = sampler_module.StepNoise.sample_per_request
    steps = [0]

    def sample_per_request(*args, keys=None, **kwargs):
        steps[0] += 1
        if len(args) > 5:
            args, keys = args[:5], args[5]
        return real(*args, keys=rekey(keys or {}, steps[0]), **kwargs)

    monkeypatch.setattr(sampler_module.StepNoise, "sample_per_request", sample_per_request)


@pytest.mark.parametrize("broken", ["noise by step", "noise shared across requests"])
def test_broken_noise_keys_are_caught(sjdpp, plain, monkeypatch, broken):
    if broken == "noise by step":
        _rekeyed(monkeypatch, lambda keys, step: {i: (key, step) for i, (key, _) in keys.items()})
    else:
        _rekeyed(monkeypatch, lambda keys, step: {i: (next(iter(keys.values()))[0], pos) for i, (_, pos) in keys.items()})
    got = seeded_outputs(sjdpp, SAMPLING["top-k"], {"sjdpp_num_speculative_tokens": 16})
    differ = sum(a != b for a, b in zip(got, plain["top-k"]))
    assert differ > 100, differ


def test_rows_left_out_of_the_draw_keep_the_others_tokens(monkeypatch):
    """Guidance companions' rows are left out of the draw (their tokens are replaced by their
    requests'): the other rows, seeded by key or by generator, draw what they draw with every
    row in; the rows left out are 0 and never reach top-k."""
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from vllm_sjdpp.engine import race_sampler
    from vllm_sjdpp.engine.race_sampler import KeyedRaceTopKTopP

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    k = torch.full((6,), 5)
    keyed = {0: (11, 3), 2: (12, 4), 5: (13, 7)}

    top_k_top_p = race_sampler.apply_top_k_top_p
    rows = []
    monkeypatch.setattr(race_sampler, "apply_top_k_top_p", lambda x, *a: rows.append(x.shape[0]) or top_k_top_p(x, *a))

    def draw(left_out):
        generators = {1: torch.Generator().manual_seed(1), 4: torch.Generator().manual_seed(4)}
        sampler = KeyedRaceTopKTopP(TopKTopPSampler(), lambda n: keyed, lambda n: left_out)
        rows.clear()
        return sampler(logits.clone(), generators, k, None)[0], list(rows)

    every, rows_every = draw([])
    without, rows_without = draw([3])
    kept = [0, 1, 2, 4, 5]
    assert torch.equal(without[kept], every[kept]) and without[3] == 0
    assert rows_every == [6] and rows_without == [5]
