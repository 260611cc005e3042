"""SJD++ inside a real vLLM engine (CPU), against the same engine without speculation.

Two in-process engines share this module: `plain` (no speculative decoding, the independent
reference) and `sjdpp` (`speculative_config="sjdpp"`); reuse modes are chosen per request.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from stats import ALPHA, BROKEN_ALPHA, position_pair_pvalues
from vllm_sjdpp.engine.runtime import runtime_of


@pytest.fixture(scope="module")
def plain(make_engine, tiny_llama_path):
    return make_engine(tiny_llama_path)


@pytest.fixture(scope="module")
def sjdpp(make_engine, tiny_llama_path, plain):  # created after `plain`: metrics are read from the newest engine
    # Full windows (no budget) unless a test says otherwise: these tests are about verification,
    # and the default budget ("auto") would cut windows by timings measured on a busy machine.
    return make_engine(tiny_llama_path, speculative_config={"method": "sjdpp", "num_speculative_tokens": 6,
                                                            "draft_token_budget": None})


def params(**kw):
    from vllm import SamplingParams

    return SamplingParams(ignore_eos=True, detokenize=False, **kw)


def generate(llm, prompts, sampling):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def accepted_tokens(llm) -> int:
    return next(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")


PROMPTS = [[2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14], [20]]


# Gumbel coupling (the default), and the ratio test with each reuse mode.
VERIFICATIONS = [{}, *({"sjdpp_verification": "ratio", "sjdpp_reuse": r} for r in ("none", "coupled", "confidence"))]
VERIFICATION_IDS = ["gumbel", "ratio-none", "ratio-coupled", "ratio-confidence"]


@pytest.mark.parametrize("verification", VERIFICATIONS, ids=VERIFICATION_IDS)
def test_greedy_is_identical(plain, sjdpp, verification):
    before = accepted_tokens(sjdpp)
    expected = generate(plain, PROMPTS, params(temperature=0, max_tokens=48))
    got = generate(sjdpp, PROMPTS, params(temperature=0, max_tokens=48, extra_args=verification))
    assert got == expected
    assert accepted_tokens(sjdpp) > before  # drafts were really verified and accepted


LENGTH = 5
SAMPLES = 3000


@pytest.fixture(scope="module")
def plain_samples(plain):
    return np.array(generate(plain, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))


@pytest.mark.parametrize("verification", VERIFICATIONS, ids=VERIFICATION_IDS)
def test_sampling_distribution_matches_plain(plain_samples, sjdpp, verification):
    """Unseeded requests (under Gumbel coupling each draws a random noise key) against plain sampling."""
    before = accepted_tokens(sjdpp)
    sampling = params(temperature=1.0, top_k=8, max_tokens=LENGTH, extra_args=verification)
    got = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, sampling))
    pvalues = position_pair_pvalues(plain_samples, got, 48)
    assert min(pvalues) > ALPHA / len(pvalues), pvalues  # Bonferroni over the 9 comparisons
    assert accepted_tokens(sjdpp) > before


def test_distribution_test_catches_one_noise_key_for_all_requests(plain_samples, sjdpp, monkeypatch):
    """Broken: every unseeded request races the same noise tape (one key), so their drafted
    tokens are one sample repeated, not draws."""
    from vllm_sjdpp.engine import jacobi_state

    monkeypatch.setattr(jacobi_state, "noise_key", lambda seed: 12345 if seed is None else seed)
    got = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))
    pvalues = position_pair_pvalues(plain_samples, got, 48)
    assert min(pvalues) < BROKEN_ALPHA


@pytest.mark.expect_fallback
def test_a_failing_step_falls_back_to_exact_plain_sampling(plain, plain_samples, sjdpp, monkeypatch, caplog):
    """Defence in depth: every third SJD++ step raises; the engine logs it with the request ids,
    samples those steps plainly and keeps serving, and the outputs keep their distribution."""
    import logging

    import vllm_sjdpp.engine.sampler as sampler_module

    real, calls = sampler_module.sjdpp_step, []

    def flaky_step(*args, **kwargs):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler_module, "sjdpp_step", flaky_step)
    from vllm_sjdpp.engine.runtime import fallbacks_total

    fallbacks, counted = runtime_of(sjdpp).fallbacks.count, fallbacks_total()
    with caplog.at_level(logging.ERROR, logger="vllm.sjdpp"):
        assert generate(sjdpp, PROMPTS, params(temperature=0, max_tokens=48)) == generate(
            plain, PROMPTS, params(temperature=0, max_tokens=48)
        )
        got = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))
    assert len(calls) >= 6
    failures = [r for r in caplog.records if "SJD++ step failed for requests" in r.getMessage()]
    assert len(failures) == len(calls) // 3 and "(RuntimeError: injected fault)" in caplog.text
    assert runtime_of(sjdpp).fallbacks.count - fallbacks == len(calls) // 3
    assert fallbacks_total() - counted == len(calls) // 3  # the Prometheus counter
    pvalues = position_pair_pvalues(plain_samples, got, 48)
    assert min(pvalues) > ALPHA / len(pvalues), pvalues

    # Broken variant the same comparison must reject: a fallback that takes the most likely token.
    from vllm_sjdpp.engine.sampler import SJDPPSampler

    def greedy_fallback(self, metadata, first_rows, sampling_metadata):
        out = torch.full((first_rows.shape[0], max(metadata.num_draft_tokens, default=0) + 1), -1, dtype=torch.long)
        out[:, 0] = first_rows.argmax(-1)
        self.runtime.drop_windows(self.runner.input_batch.req_ids[: first_rows.shape[0]])
        return out

    monkeypatch.setattr(SJDPPSampler, "_plain_step", greedy_fallback)
    broken = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))
    assert min(position_pair_pvalues(plain_samples, broken, 48)) < BROKEN_ALPHA


def test_kv_cache_leaves_room_for_the_step(plain, sjdpp):
    """The step's worst-case buffers come out of the KV cache (1 GiB here): the SJD++ engine
    reports fewer blocks than the plain one, by the reserve."""
    from vllm_sjdpp.patches.gpu_worker import step_reserve

    config = sjdpp.llm_engine.vllm_config
    reserve, _ = step_reserve(config)
    assert reserve > 0 and step_reserve(plain.llm_engine.vllm_config) == (0, 0)
    plain_blocks, sjdpp_blocks = plain.llm_engine.vllm_config.cache_config.num_gpu_blocks, config.cache_config.num_gpu_blocks
    block_bytes = 2**30 / plain_blocks  # VLLM_CPU_KVCACHE_SPACE=1 (GiB)
    assert plain_blocks - sjdpp_blocks == pytest.approx(reserve / block_bytes, abs=1)


def accepted_per_position(llm) -> list[float]:
    return list(next(m.values for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens_per_pos"))


def test_draft_token_budget_shrinks_windows_and_stays_exact(plain, plain_samples, sjdpp):
    runtime = runtime_of(sjdpp)
    default = runtime.config.draft_token_budget
    runtime.set_draft_token_budget(4)  # k = 6: at most 4 drafts per pass over all requests
    try:
        expected = generate(plain, PROMPTS, params(temperature=0, max_tokens=48))
        assert generate(sjdpp, PROMPTS, params(temperature=0, max_tokens=48)) == expected
        before = accepted_per_position(sjdpp)
        got = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))
        pvalues = position_pair_pvalues(plain_samples, got, 48)
        assert min(pvalues) > ALPHA / len(pvalues), pvalues
        accepted = [a - b for a, b in zip(accepted_per_position(sjdpp), before)]
        assert accepted[0] > 0 and not any(accepted[4:]), accepted  # no window was longer than 4
    finally:
        runtime.set_draft_token_budget(default)


def test_the_memory_cap_holds_a_pass_to_its_drafts(plain, sjdpp):
    """`step_memory_gib`'s cap on a pass's drafts (engine/step_memory.py), set here to 2: no
    window longer than 2 is verified whatever the budget, and the tokens stay plain decoding's."""
    runtime = runtime_of(sjdpp)
    default_cap, default_budget = runtime.max_drafts, runtime.config.draft_token_budget
    runtime.max_drafts = 2
    runtime.set_draft_token_budget(None)  # every window its k = 6, but for the cap
    try:
        before = accepted_per_position(sjdpp)
        assert generate(sjdpp, PROMPTS, params(temperature=0, max_tokens=48)) == generate(
            plain, PROMPTS, params(temperature=0, max_tokens=48))
        accepted = [a - b for a, b in zip(accepted_per_position(sjdpp), before)]
        assert accepted[0] > 0 and not any(accepted[2:]), accepted
    finally:
        runtime.max_drafts = default_cap
        runtime.set_draft_token_budget(default_budget)


def test_budget_zero_unseeded_is_plain_decoding(plain, plain_samples, sjdpp):
    """With no drafts and no seeds a step is plain decoding, handed to vLLM's own sampler: greedy
    tokens under a repetition penalty, their logprobs and the sampled law equal plain's."""
    runtime = runtime_of(sjdpp)
    runtime.set_draft_token_budget(0)
    drafts_before = runtime.stats.drafts
    try:
        greedy = params(temperature=0, max_tokens=24, repetition_penalty=1.3, logprobs=3)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        got = [o.outputs[0] for o in sjdpp.generate(prompts, greedy, use_tqdm=False)]
        expected = [o.outputs[0] for o in plain.generate(prompts, greedy, use_tqdm=False)]
        sampled = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))
        drafts_verified = runtime.stats.drafts - drafts_before
    finally:
        runtime.set_draft_token_budget(None)
    assert drafts_verified == 0  # no window made, none verified
    assert [list(o.token_ids) for o in got] == [list(o.token_ids) for o in expected]
    for g, e in zip(got, expected):
        for step_g, step_e in zip(g.logprobs, e.logprobs):
            assert step_g.keys() == step_e.keys()
            assert all(abs(step_g[t].logprob - step_e[t].logprob) < 1e-5 for t in step_e)
    pvalues = position_pair_pvalues(plain_samples, sampled, 48)
    assert min(pvalues) > ALPHA / len(pvalues), pvalues


@pytest.mark.parametrize("broken", [False, True], ids=["", "windows-not-handed-over"])
def test_a_step_without_drafts_takes_vllms_path_without_speculation(plain, sjdpp, monkeypatch, broken):
    """A step that verifies no drafts runs as vLLM runs without a speculative config
    (patches/gpu_model_runner.py): under a budget of 0, vLLM never builds spec-decode metadata nor
    calls its drafter, while the SJD++ sampler still takes every step and the tokens are plain
    decoding's.  Under full windows each request's first window is made in such a step (its
    prefill verifies none) and must reach the next pass: drafts are verified, tokens unchanged.
    Broken variant: the windows a step without drafts makes are not handed to the scheduler, so
    no step ever has drafts."""
    runtime = runtime_of(sjdpp)
    runner = runtime.runner
    calls = {"metadata": 0, "drafter": 0, "sampler": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(runner, "_calc_spec_decode_metadata", counted("metadata", runner._calc_spec_decode_metadata))
    monkeypatch.setattr(runner, "propose_draft_token_ids", counted("drafter", runner.propose_draft_token_ids))
    monkeypatch.setattr(runner.rejection_sampler, "forward", counted("sampler", runner.rejection_sampler.forward))
    if broken:
        real_propose = runner.drafter.propose
        monkeypatch.setattr(runner.drafter, "propose", lambda *args, **kwargs: (
            real_propose(*args, **kwargs) if calls["drafter"] else [[] for _ in runner.input_batch.req_ids]))
    greedy = params(temperature=0, max_tokens=24)
    expected = generate(plain, PROMPTS, greedy)
    runtime.set_draft_token_budget(0)
    try:
        assert generate(sjdpp, PROMPTS, greedy) == expected
    finally:
        runtime.set_draft_token_budget(None)
    assert calls["metadata"] == calls["drafter"] == 0 and calls["sampler"] >= 24, calls
    assert runner.speculative_config is not None  # set aside for a step only
    drafts_before = runtime.stats.drafts
    assert generate(sjdpp, PROMPTS, greedy) == expected
    assert runner.speculative_config is not None
    if broken:
        assert runtime.stats.drafts == drafts_before and calls["metadata"] == 0, calls
    else:
        assert runtime.stats.drafts > drafts_before and calls["metadata"] > 0 and calls["drafter"] > 0, calls


def test_goodput_controller_stays_exact(plain, plain_samples, sjdpp, monkeypatch):
    """draft_token_budget="auto": windows chosen by the goodput controller, here fed a synthetic
    pass cost (flat to 600 positions, then steep) so that its choices are reproducible and span
    no drafts to full windows as the batch drains; the outputs keep plain sampling's law."""
    from vllm_sjdpp.engine.goodput import GoodputController

    runtime = runtime_of(sjdpp)
    controller = GoodputController(6, clock=lambda: synthetic_time[0])
    synthetic_time = [0.0]
    real_observe, real_windows, chosen = controller.observe_step, controller.windows, []

    def observe_step(positions, *args):
        synthetic_time[0] += 0.01 * (1 + max(0, positions - 600) / 50)  # any batch size
        real_observe(positions, *args)

    def windows(wanted, pinned):
        lengths = real_windows(wanted, pinned)
        chosen.append(max(lengths, default=0))
        return lengths

    monkeypatch.setattr(controller, "observe_step", observe_step)
    monkeypatch.setattr(controller, "windows", windows)
    monkeypatch.setattr(runtime, "goodput", controller)
    runtime.set_draft_token_budget("auto")
    try:
        expected = generate(plain, PROMPTS, params(temperature=0, max_tokens=48))
        assert generate(sjdpp, PROMPTS, params(temperature=0, max_tokens=48)) == expected
        got = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, params(temperature=1.0, top_k=8, max_tokens=LENGTH)))
    finally:
        runtime.set_draft_token_budget(None)
    pvalues = position_pair_pvalues(plain_samples, got, 48)
    assert min(pvalues) > ALPHA / len(pvalues), pvalues
    partial = [c for c in chosen if 0 < c < 6]
    assert partial and 0 in chosen and 6 in chosen, sorted(set(chosen))


@pytest.mark.parametrize("verification", ["gumbel", "ratio"])
def test_auto_budget_keeps_seeded_tokens(sjdpp, monkeypatch, verification):
    """With a pass cost that makes the controller cut windows to nothing, seeded requests sampled
    among unseeded ones equal the same requests with full windows.  Under Gumbel coupling (the
    default) because their tokens are plain decoding's whatever the windows, and their windows
    are cut like everyone's; under the ratio test because their windows are pinned."""
    from vllm_sjdpp.engine.goodput import GoodputController

    runtime = runtime_of(sjdpp)
    synthetic_time = [0.0]
    controller = GoodputController(6, clock=lambda: synthetic_time[0])
    real_observe, real_windows, cut, pinned_seen = controller.observe_step, controller.windows, [], []

    def observe_step(positions, *args):
        synthetic_time[0] += 0.01 * positions  # drafts cost what they weigh: never worth it
        real_observe(positions, *args)

    def windows(wanted, pinned):
        lengths = real_windows(wanted, pinned)
        cut.extend(1 for w, n in zip(wanted, lengths) if n < w)
        pinned_seen.extend(pinned)
        return lengths

    monkeypatch.setattr(controller, "observe_step", observe_step)
    monkeypatch.setattr(controller, "windows", windows)
    monkeypatch.setattr(runtime, "goodput", controller)
    extra = {"sjdpp_verification": verification}
    seeded = [params(temperature=1.0, top_k=8, max_tokens=40, seed=s, extra_args=extra) for s in range(6)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:3] * 2]
    full = [list(o.outputs[0].token_ids) for o in sjdpp.generate(prompts, seeded, use_tqdm=False)]
    runtime.set_draft_token_budget("auto")
    try:
        unseeded = params(temperature=1.0, top_k=8, max_tokens=40)
        mixed = sjdpp.generate(prompts + [{"prompt_token_ids": [5, 6]}] * 30, seeded + [unseeded] * 30, use_tqdm=False)
        alone = sjdpp.generate(prompts, seeded, use_tqdm=False)  # every window adapts
    finally:
        runtime.set_draft_token_budget(None)
    assert [list(o.outputs[0].token_ids) for o in mixed[:6]] == full
    assert cut, "the controller never cut a window: the test would not see a request adapt"
    if verification == "gumbel":
        assert not pinned_seen  # nothing pinned: the seeded windows were cut too
        assert [list(o.outputs[0].token_ids) for o in alone] == full
    else:
        assert pinned_seen


def test_distribution_test_catches_vllm_cpu_expand_bug(plain, sjdpp):
    """The same comparison must fail with vLLM's own CPU expand kernel (vLLM issue 55005).

    Temperature only: with top-k too, the garbage top-k crashes the engine instead.
    """
    import vllm.utils.cpu_triton_utils as cpu_triton_utils
    from vllm.v1.sample import rejection_sampler

    from vllm_sjdpp.patches import cpu_triton_utils as vllm_patches

    sampling = params(temperature=0.8, max_tokens=LENGTH)
    expected = np.array(generate(plain, [[2, 3, 4]] * SAMPLES, sampling))
    original = importlib.reload(cpu_triton_utils)._expand_kernel_impl
    assert original is not vllm_patches.expand_kernel_impl
    rejection_sampler.expand_kernel._impl = original
    try:
        got = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, sampling))
    finally:
        cpu_triton_utils._expand_kernel_impl = vllm_patches.expand_kernel_impl
        rejection_sampler.expand_kernel._impl = vllm_patches.expand_kernel_impl
    assert min(position_pair_pvalues(expected, got, 48)) < BROKEN_ALPHA
    fixed = np.array(generate(sjdpp, [[2, 3, 4]] * SAMPLES, sampling))
    assert min(position_pair_pvalues(expected, fixed, 48)) > ALPHA / 9


def test_cpu_expand_kernel_is_fixed():
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([2, 2, 5], dtype=torch.int32)
    temperature = torch.tensor([0.5, 7.0, 1.25])
    assert expand_batch_to_tokens(temperature, cu, 5).tolist() == [0.5, 0.5, 1.25, 1.25, 1.25]
    top_k = torch.tensor([3, 9, 0], dtype=torch.int32)
    assert expand_batch_to_tokens(top_k, cu, 5, replace_from=0, replace_to=48).tolist() == [3, 3, 48, 48, 48]


def test_seeded_requests_repeat(sjdpp):
    sampling = params(temperature=1.0, top_k=8, max_tokens=30, seed=1234)
    first = generate(sjdpp, PROMPTS, sampling)
    assert generate(sjdpp, PROMPTS, sampling) == first
    assert generate(sjdpp, PROMPTS, params(temperature=1.0, top_k=8, max_tokens=30, seed=99)) != first


def test_mixed_batch(plain, sjdpp):
    """SJD++ requests beside plain, greedy, seeded and differently truncated ones, in one batch."""
    requests = [
        ([2, 3], params(temperature=0, max_tokens=33)),
        ([4, 5], params(temperature=1.0, max_tokens=21)),
        ([6], params(temperature=1.0, top_k=3, max_tokens=17, extra_args={"sjdpp_disable": True})),
        ([7, 8, 9], params(temperature=0.7, top_k=5, max_tokens=40, seed=7)),
        ([10], params(temperature=1.0, top_p=0.8, max_tokens=1)),
        ([11, 12], params(temperature=1.0, max_tokens=26, extra_args={"sjdpp_reuse": "none", "sjdpp_num_speculative_tokens": 2})),
        ([13], params(temperature=0, max_tokens=29, extra_args={"sjdpp_init": "above", "sjdpp_row_width": 5})),
    ]
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    outs = sjdpp.generate(prompts, [s for _, s in requests], use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert [len(t) for t in tokens] == [s.max_tokens for _, s in requests]
    for i in (0, 6):  # greedy requests equal plain greedy, whatever their neighbours
        assert tokens[i] == generate(plain, [requests[i][0]], requests[i][1])[0]
    # a seeded request repeats in the same batch
    again = sjdpp.generate(prompts, [s for _, s in requests], use_tqdm=False)
    assert list(again[3].outputs[0].token_ids) == tokens[3]


def test_bad_request_option_is_rejected(sjdpp):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="sjdpp_reuse"):
        generate(sjdpp, [[2, 3]], params(temperature=1.0, max_tokens=4, extra_args={"sjdpp_reuse": "sometimes"}))
    # the engine is still serving
    assert len(generate(sjdpp, [[2, 3]], params(temperature=1.0, max_tokens=4))[0]) == 4


def test_state_is_released(sjdpp):
    outs = sjdpp.generate([{"prompt_token_ids": p} for p in PROMPTS], params(temperature=1.0, max_tokens=20), use_tqdm=False)
    states = runtime_of(sjdpp).states

    def held(outs):  # the engine's request ids extend the ones LLM returns
        return {r for r in states.requests for o in outs if r.startswith(o.request_id + "-")}

    assert held(outs), "the requests of the last step are dropped only at the next one"
    # vLLM tells the runner about finished requests at its next step: run one more request.
    last = sjdpp.generate([{"prompt_token_ids": [3]}], params(temperature=1.0, max_tokens=2), use_tqdm=False)
    assert not held(outs)
    assert set(states.requests) <= held(last)


def test_windows_shrink_at_max_model_len(plain, sjdpp):
    """Near max_model_len the window shrinks, and vLLM stops asking the drafter altogether
    (it schedules k drafts of token 0 instead): the output is still exact."""
    prompt = [(7 * i) % 46 + 2 for i in range(200)]
    greedy = params(temperature=0, max_tokens=56)  # 200 + 56 = max_model_len
    assert generate(sjdpp, [prompt], greedy) == generate(plain, [prompt], greedy)
    assert len(generate(sjdpp, [prompt], params(temperature=1.0, max_tokens=56))[0]) == 56


def test_logprobs_of_committed_tokens(plain, sjdpp):
    """Every committed token's logprobs (its own and the top 3) equal plain decoding's, whether
    it was an accepted draft, a recovery or a bonus token: the rows are aligned per position."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = params(temperature=0, max_tokens=40, logprobs=3)
    before = accepted_tokens(sjdpp)
    got = [o.outputs[0] for o in sjdpp.generate(prompts, greedy, use_tqdm=False)]
    expected = [o.outputs[0] for o in plain.generate(prompts, greedy, use_tqdm=False)]
    assert accepted_tokens(sjdpp) > before  # drafts were committed, with their rows' logprobs
    for g, e in zip(got, expected):
        assert list(g.token_ids) == list(e.token_ids) and len(g.logprobs) == 40
        for token, step_g, step_e in zip(g.token_ids, g.logprobs, e.logprobs):
            assert token in step_g and step_g.keys() == step_e.keys()
            assert all(abs(step_g[t].logprob - step_e[t].logprob) < 1e-5 for t in step_e)
