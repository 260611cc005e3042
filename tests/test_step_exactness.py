"""Statistical exactness of the SJD++ step against exact distributions and plain AR sampling.

Each property is tested on the real step and on a deliberately broken variant, which the same
test must reject: that is what shows the test can fail.  Seeds are fixed; thresholds in stats.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy import stats

from stats import ALPHA, BROKEN_ALPHA, goodness_of_fit, same_distribution
from vllm_sjdpp import SJDPPConfig
from vllm_sjdpp.kernels import REUSE_CODES, FreshTokens, StepBatch, StepNoise, sjdpp_step
from toy_ar import TableARModel, sample_plain, sample_sjdpp

VOCAB = 8
N = 60_000


def _dist(g: torch.Generator, rows: int, sharpness: float = 1.5) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, VOCAB, generator=g) * sharpness, -1)


def _replicated_window(k: int, onehot_slots: tuple[int, ...], reuse: str, next_len: int, seed: int):
    """N copies of one request: fixed rows p (k + 1) and q (k), drafts d_j ~ q_j per copy."""
    g = torch.Generator().manual_seed(seed)
    p, q = _dist(g, k + 1), _dist(g, k)
    for j in onehot_slots:  # a fresh token: fixed, one-hot proposal
        q[j] = torch.nn.functional.one_hot(torch.tensor(j % VOCAB), VOCAB).float()
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], 1)
    onehot = torch.zeros(k, dtype=torch.bool)
    onehot[list(onehot_slots)] = True
    batch = StepBatch(
        cu_num_draft_tokens=torch.arange(1, N + 1) * k,
        target_probs=p.repeat(N, 1),
        draft_token_ids=drafts.reshape(-1),
        draft_probs=q.repeat(N, 1),
        draft_is_onehot=onehot.repeat(N),
        greedy=torch.zeros(N, dtype=torch.bool),
        reuse=torch.full((N,), REUSE_CODES[reuse]),
        threshold=torch.full((N,), 0.2),
        next_window_len=torch.full((N,), next_len),
    )
    noise = StepNoise.sample(batch.target_probs.shape[0], VOCAB, N * next_len, generator=g)
    fresh = FreshTokens.build(["random"] * N, [range(VOCAB)] * N, torch.full((N, 1), 0))
    return p, drafts, batch, noise, fresh


def accepts_with_p(batch, noise, fresh, **kw):
    """Broken: accepts d with probability p(d) instead of min(1, p(d) / q(d)).

    The step accepts iff u * q(d) < p(d); feeding it u / q(d) makes that u < p(d).
    """
    cu = batch.cu_num_draft_tokens
    k = torch.diff(cu, prepend=cu.new_zeros(1))
    req = torch.repeat_interleave(torch.arange(cu.numel()), k)
    rows = torch.arange(batch.draft_token_ids.numel()) + req
    onehot = batch.draft_is_onehot
    q_rows = torch.arange(onehot.numel()) if batch.draft_prob_rows is None else batch.draft_prob_rows
    q_d = torch.ones(onehot.shape)
    if batch.draft_probs.shape[0]:
        q_d[~onehot] = batch.draft_probs[q_rows[~onehot], batch.draft_token_ids[~onehot]]
    uniforms = noise.uniforms.clone()
    uniforms[rows] /= q_d
    return sjdpp_step(batch, dataclasses.replace(noise, uniforms=uniforms), fresh, **kw)


def recovers_from_p(batch, noise, fresh, **kw):
    """Broken: after a rejection, draws the token from p instead of the residual max(0, p - q)."""
    out = sjdpp_step(batch, noise, fresh, **kw)
    cu = batch.cu_num_draft_tokens
    k = torch.diff(cu, prepend=cu.new_zeros(1))
    rejected = (out.num_accepted < k).nonzero().squeeze(1)
    rows = (cu - k + torch.arange(cu.numel()))[rejected] + out.num_accepted[rejected]
    redrawn = torch.multinomial(batch.target_probs[rows].float(), 1).squeeze(1)
    out.output_token_ids[rejected, out.num_accepted[rejected]] = redrawn
    return out


def keeps_old_drafts(batch, noise, fresh, **kw):
    """Broken: SJD++ reuse without the coupling test: every old draft is kept as it is."""
    out = sjdpp_step(batch, noise, fresh, **kw)
    cu, n = batch.cu_num_draft_tokens, batch.next_window_len
    k = torch.diff(cu, prepend=cu.new_zeros(1))
    for m in range(int(n.max())):
        j = out.num_accepted + 1 + m
        ok = (j < k) & (m < n)
        out.next_draft_token_ids[(torch.cumsum(n, 0) - n + m)[ok]] = batch.draft_token_ids[(cu - k + j)[ok]]
    return out


@pytest.mark.parametrize("onehot_slots", [(), (0,), (0, 1, 2)], ids=["q-rows", "fresh-first", "all-fresh"])
@pytest.mark.parametrize("step, broken", [(sjdpp_step, False), (accepts_with_p, True), (recovers_from_p, True)])
def test_committed_tokens_follow_p(onehot_slots, step, broken):
    if broken and step is accepts_with_p and len(onehot_slots) == 3:
        pytest.skip("with one-hot proposals p(d) / q(d) = p(d): nothing is broken")
    k = 3
    p, _, batch, noise, fresh = _replicated_window(k, onehot_slots, "coupled", 0, seed=1)
    out = step(batch, noise, fresh)
    first = goodness_of_fit(out.output_token_ids[:, 0], p[0])
    # Given d_0 accepted, the second token is distributed as p_1.
    second = goodness_of_fit(out.output_token_ids[out.num_accepted >= 1, 1], p[1])
    if broken:
        assert min(first, second) < BROKEN_ALPHA
    else:
        assert first > ALPHA and second > ALPHA, (first, second)


@pytest.mark.parametrize("verification", ["ratio", "gumbel", "greedy"])
def test_placeholder_drafts_are_never_accepted(verification):
    """vLLM pads a batch's drafts with -1 placeholders (uniform decode); such a row verifies
    nothing and samples from p.  Ratio rows read p and q at the draft, and -1 indexes the last
    column: with p(V - 1) = 0.9 there, a placeholder taken for a token would be committed about
    90% of the time (it was, before placeholders were ruled out)."""
    k = 2
    _, _, batch, noise, fresh = _replicated_window(k, (), "coupled", 0, seed=4)
    p = batch.target_probs.view(N, k + 1, VOCAB)
    p[:, 0] = 0.1 / (VOCAB - 1)
    p[:, 0, VOCAB - 1] = 0.9
    drafts = batch.draft_token_ids.view(N, k)
    drafts[:, 0] = -1
    if verification == "gumbel":
        batch = dataclasses.replace(batch, gumbel=torch.ones(N, dtype=torch.bool))
    elif verification == "greedy":
        batch = dataclasses.replace(batch, greedy=torch.ones(N, dtype=torch.bool))
    out = sjdpp_step(batch, noise, fresh)
    assert (out.num_accepted == 0).all()
    first = out.output_token_ids[:, 0]
    assert (first >= 0).all()
    if verification == "greedy":
        assert (first == VOCAB - 1).all()
    else:
        assert goodness_of_fit(first, p[0, 0]) > ALPHA


@pytest.mark.parametrize(
    "reuse, step, broken",
    [
        ("none", sjdpp_step, False),
        ("coupled", sjdpp_step, False),
        ("confidence", sjdpp_step, False),
        ("coupled", keeps_old_drafts, True),
    ],
)
def test_next_window_follows_recorded_q(reuse, step, broken):
    """At every slot of the next window the token is distributed as the q recorded for it."""
    k = 4
    p, drafts, batch, noise, fresh = _replicated_window(k, (2,), reuse, k, seed=2)
    out = step(batch, noise, fresh)
    tokens = out.next_draft_token_ids.view(N, k)
    onehot = out.next_draft_is_onehot.view(N, k)
    q_rows = out.next_draft_probs[out.next_draft_prob_rows.clamp_min(0)].view(N, k, VOCAB)
    assert torch.equal(out.next_draft_prob_rows < 0, out.next_draft_is_onehot)
    pvalues = []
    for a in range(k):
        for m in range(k - a):  # slot m came from row a + 1 + m
            group = (out.num_accepted == a) & ~onehot[:, m]
            if int(group.sum()) < 2000:
                continue
            assert torch.equal(q_rows[group, m], p[a + 1 + m].expand(int(group.sum()), -1))
            pvalues.append(goodness_of_fit(tokens[group, m], p[a + 1 + m]))
            kept = (out.num_accepted == a) & onehot[:, m]
            if a + 1 + m < k and reuse == "confidence":  # kept drafts: one-hot on the old token
                assert torch.equal(tokens[kept, m], drafts[kept, a + 1 + m])
                assert bool((p[a + 1 + m][tokens[kept, m]] >= 0.2).all())
    assert len(pvalues) >= 4
    if broken:
        assert min(pvalues) < BROKEN_ALPHA
    else:
        assert min(pvalues) > ALPHA / len(pvalues), pvalues


SEQ_VOCAB, SEQ_LEN, SEQ_N = 5, 5, 40_000
MODES = [(reuse, init) for reuse in ("none", "coupled", "confidence") for init in ("random", "left", "above")]


@pytest.fixture(scope="module")
def toy_model():
    return TableARModel.random(SEQ_VOCAB, sharpness=2.5, seed=3)


@pytest.fixture(scope="module")
def plain_sequences(toy_model):
    return sample_plain(toy_model, SEQ_N, SEQ_LEN, seed=4)


@pytest.mark.parametrize("reuse, init", MODES)
def test_whole_sequences_match_plain_sampling(toy_model, plain_sequences, reuse, init):
    config = SJDPPConfig(num_speculative_tokens=3, reuse=reuse, init=init, row_width=2, threshold=0.3)
    seqs, steps = sample_sjdpp(toy_model, SEQ_N, SEQ_LEN, config, seed=5)
    pvalue = same_distribution(plain_sequences, seqs)
    print(f"reuse={reuse} init={init}: {steps.float().mean():.3f} steps for {SEQ_LEN} tokens, p={pvalue:.3g}")
    assert pvalue > ALPHA
    assert bool((steps <= SEQ_LEN).all())


@pytest.mark.parametrize("broken_step", [accepts_with_p, recovers_from_p])
def test_whole_sequence_test_rejects_broken_step(toy_model, plain_sequences, broken_step):
    config = SJDPPConfig(num_speculative_tokens=3, reuse="coupled")
    seqs, _ = sample_sjdpp(toy_model, SEQ_N, SEQ_LEN, config, seed=5, step=broken_step)
    assert same_distribution(plain_sequences, seqs) < BROKEN_ALPHA


@pytest.mark.parametrize("reuse", ["none", "coupled", "confidence"])
def test_greedy_equals_plain_greedy(reuse):
    config = SJDPPConfig(num_speculative_tokens=4, reuse=reuse, init="left")
    table = TableARModel.random(12, sharpness=1.0, seed=6)
    for prompt in [(0, 1), (3, 7), (11, 2)]:
        model = dataclasses.replace(table, prompt=prompt)
        seqs, _ = sample_sjdpp(model, 4, 6, config, seed=7, greedy=True)
        assert torch.equal(seqs, sample_plain(model, 4, 6, greedy=True))


def test_race_noise_is_exponential():
    """The races are exact only with Exp(1) noise; -log(1 - U) must be that, and never 0."""
    g = torch.Generator().manual_seed(3)
    noise = StepNoise.sample(200, 1000, 4, generator=g)
    e = noise.exponentials.flatten().double().numpy()
    assert e.min() > 0
    pvalue = stats.kstest(e, "expon").pvalue
    assert pvalue > ALPHA, pvalue
    assert stats.kstest(e * 1.05, "expon").pvalue < BROKEN_ALPHA  # a 5% scale error is caught
