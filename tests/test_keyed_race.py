"""The race over keyed noise where a token can win (kernels/keyed_race.py) returns the dense race's
winners: against the dense noise of the NumPy reference raced as vLLM draws (`probs / E`,
argmax) and as the step's row pass does, on rows cut by top-k, by a token range and by top-p
(zeros), with ties; broken variants that key the wrong tokens, drop small probabilities or break
ties the other way are told apart on the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_sjdpp.kernels import keyed_race, noise
from vllm_sjdpp.kernels.keyed_race import KeyedRows
from vllm_sjdpp.kernels.row_pass_torch import masked_race

VOCAB = 274  # the digit model's


def rows_keyed(num_rows: int, seed: int) -> KeyedRows:
    keys = np.full(num_rows, noise.request_key(seed), dtype=np.uint64)
    return KeyedRows(*noise.row_keys(keys, 40 + np.arange(num_rows)), VOCAB, torch.device("cpu"))


def cut_rows(num_rows: int, seed: int) -> torch.Tensor:
    """Softmax rows with zeros as vLLM's processing leaves them: top-k 1, 11 and 20 (-inf outside
    the k largest), a token range (an allowed-token constraint), and top-p 0.5."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, VOCAB, generator=g) * 3
    kind = torch.arange(num_rows) % 5
    for i, k in ((0, 1), (1, 11), (2, 20)):
        kth = logits.topk(k, -1).values[:, -1:]
        logits = torch.where((kind == i)[:, None] & (logits < kth), -torch.inf, logits)
    logits[kind == 3, : VOCAB - VOCAB // 8] = -torch.inf
    sorted_p, order = logits.softmax(-1).sort(-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > 0.5
    top_p = torch.zeros_like(outside).scatter(-1, order, outside)
    logits = torch.where((kind == 4)[:, None] & top_p, -torch.inf, logits)
    return logits.softmax(-1)


def tied_rows(keyed: KeyedRows) -> torch.Tensor:
    """Rows whose best score is shared: p(v) = c E(v) on a few tokens (p / E rounds back to c), so
    the race's winner is its tie-break's choice."""
    e = torch.from_numpy(noise.keyed_exponentials_numpy(keyed.a, keyed.b, VOCAB))
    g = torch.Generator().manual_seed(1)
    p = torch.zeros(keyed.a.size, VOCAB)
    for r in range(keyed.a.size):
        tokens = torch.randperm(VOCAB, generator=g)[:6]
        p[r, tokens] = 0.01 * e[r, tokens]
    return p


def dense_vllm(probs: torch.Tensor, keyed: KeyedRows) -> np.ndarray:
    """vLLM's draw (`sample_with_exponential_noise`) over the dense reference noise."""
    e = torch.from_numpy(noise.keyed_exponentials_numpy(keyed.a, keyed.b, VOCAB))
    return (probs / e).argmax(-1).numpy()


def dense_row_pass(probs: torch.Tensor, keyed: KeyedRows) -> np.ndarray:
    """The step's row pass (PyTorch) over the dense reference noise."""
    e = torch.from_numpy(noise.keyed_exponentials_numpy(keyed.a, keyed.b, VOCAB))
    rows = torch.arange(probs.shape[0])
    return masked_race(probs, e, rows, torch.full_like(rows, -1))[1].numpy()


def shifted_keys(keyed, probs):
    """Broken: the noise of the token next to each one."""
    p = probs.numpy()
    rows, tokens = np.nonzero(p > 0)
    score = p[rows, tokens] / noise.exponentials_at(keyed.a[rows], keyed.b[rows], tokens + 1)
    return _first_best(rows, tokens, score, p.shape[0])


def small_dropped(keyed, probs):
    """Broken: a support that leaves out probabilities below 1e-3."""
    p = probs.numpy()
    rows, tokens = np.nonzero(p > 1e-3)
    score = p[rows, tokens] / noise.exponentials_at(keyed.a[rows], keyed.b[rows], tokens)
    return _first_best(rows, tokens, score, p.shape[0])


def last_of_ties(keyed, probs):
    """Broken: ties go to the highest token."""
    p = probs.numpy()[:, ::-1]
    rows, tokens = np.nonzero(p > 0)
    score = p[rows, tokens] / noise.exponentials_at(keyed.a[rows], keyed.b[rows], VOCAB - 1 - tokens)
    return VOCAB - 1 - _first_best(rows, tokens, score, p.shape[0])


def _first_best(rows, tokens, score, num_rows):
    best = np.full(num_rows, -1.0, dtype=np.float32)
    np.maximum.at(best, rows, score)
    winners = np.full(num_rows, VOCAB)
    np.minimum.at(winners, rows, np.where(score == best[rows], tokens, VOCAB))
    return winners


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_race_where_a_token_can_win_gives_the_dense_races_winners(seed):
    keyed = rows_keyed(200, seed)
    probs = cut_rows(200, seed)
    assert (probs > 0).float().mean() <= keyed_race.MAX_SUPPORT  # the sparse race runs
    winners = keyed.race(probs)
    assert winners is not None and winners.dtype == np.int64
    assert np.array_equal(winners, dense_vllm(probs, keyed))
    assert np.array_equal(winners, dense_row_pass(probs, keyed))
    # Rows of one, eleven, twenty tokens, a range, top-p: every kind of row is raced here.
    assert (probs[:5] > 0).sum(-1).tolist()[:3] == [1, 11, 20]


@pytest.mark.parametrize("chunk", [1, 40, 100])
def test_rows_raced_in_chunks_give_the_same_winners(monkeypatch, chunk):
    """Chunks of at most 1, 40 or 100 supported elements (a row each where a row holds more)
    race as the whole batch does."""
    keyed, probs = rows_keyed(200, 4), cut_rows(200, 4)
    whole = keyed.race(probs)
    monkeypatch.setattr(keyed_race, "CHUNK_SUPPORT", chunk)
    assert np.array_equal(keyed.race(probs), whole)
    assert np.array_equal(whole, dense_vllm(probs, keyed))


def test_ties_go_to_the_lowest_token_as_in_the_dense_race():
    keyed = rows_keyed(64, 5)
    probs = tied_rows(keyed)
    e = torch.from_numpy(noise.keyed_exponentials_numpy(keyed.a, keyed.b, VOCAB))
    scores = probs / e
    tied = ((scores == scores.max(-1, keepdim=True).values).sum(-1) > 1).sum()
    assert tied >= 32  # most rows have a tie at the top
    assert np.array_equal(keyed.race(probs), dense_vllm(probs, keyed))
    assert np.array_equal(keyed.race(probs), dense_row_pass(probs, keyed))


@pytest.mark.parametrize("broken", [shifted_keys, small_dropped, last_of_ties])
def test_broken_races_are_told_apart(broken):
    """Each broken variant differs from the dense race on the rows above (cut rows of three seeds
    and tied rows), while the race under test equals it on all of them."""
    differ = 0
    for keyed, probs in [(rows_keyed(200, s), cut_rows(200, s)) for s in range(3)] + [(rows_keyed(64, 5), tied_rows(rows_keyed(64, 5)))]:
        differ += int((broken(keyed, probs) != dense_vllm(probs, keyed)).sum())
    assert differ > 0


def test_dense_where_the_race_cannot_run_here():
    """None (the caller races densely): a row of NaN, a row with no positive probability, rows
    more than MAX_SUPPORT positive, another dtype, rows of another shape."""
    keyed = rows_keyed(8, 0)
    probs = cut_rows(8, 0)
    assert keyed.race(probs) is not None
    nan_row, zero_row = probs.clone(), probs.clone()
    nan_row[3] = torch.nan
    zero_row[5] = 0.0
    assert keyed.race(nan_row) is None and keyed.race(zero_row) is None
    assert keyed.race(torch.full((8, VOCAB), 1 / VOCAB)) is None
    assert keyed.race(probs.double()) is None
    assert keyed.race(probs[:7]) is None


def test_a_keyed_step_on_cpu_races_without_the_dense_noise(monkeypatch):
    """`StepNoise.sample_per_request` keys every row of an all-keyed batch without computing its
    rows on CPU, and the step never computes them; it commits what it commits over the dense
    noise (request 2 drafts the race's winners: all accepted)."""
    from vllm_sjdpp.kernels import FreshTokens, StepBatch, StepNoise, sjdpp_step

    counts = [3, 0, 5]
    rows = sum(counts) + len(counts)
    probs = cut_rows(rows, 7)
    keys = {i: (100 + i, 20) for i in range(3)}
    keyed = StepNoise.sample_per_request([c + 1 for c in counts], [4, 4, 4], VOCAB, {}, keys=keys)
    assert keyed.exponentials is None and keyed.shape == (rows, VOCAB)
    dense = StepNoise(keyed.uniforms, keyed.race_noise(), keyed.fresh_uniforms)
    winners = (probs / dense.exponentials).argmax(-1).numpy()
    drafts = np.concatenate([np.random.default_rng(0).integers(0, VOCAB, 3), winners[5:10]])
    batch = StepBatch(
        cu_num_draft_tokens=np.cumsum(counts), target_probs=probs, draft_token_ids=drafts, draft_probs=None,
        draft_is_onehot=np.ones(sum(counts), bool), greedy=np.zeros(3, bool), reuse=np.ones(3, np.int64),
        threshold=np.zeros(3, np.float32), next_window_len=np.full(3, 4), gumbel=np.ones(3, bool),
    )
    fresh = FreshTokens.build(["random"] * 3, [range(VOCAB)] * 3, np.zeros((3, 1), np.int64))
    ref = sjdpp_step(batch, dense, fresh, backend="torch")

    def computed(self):
        raise AssertionError("the keyed step computed its dense noise")

    monkeypatch.setattr(KeyedRows, "exponentials", computed)
    out = sjdpp_step(batch, keyed, fresh, backend="torch")
    assert out.num_accepted.tolist()[2] == 5
    assert torch.equal(out.output_token_ids, ref.output_token_ids)
    assert torch.equal(out.next_draft_token_ids, ref.next_draft_token_ids)


def test_the_race_sampler_draws_the_dense_races_tokens_where_every_row_is_keyed(monkeypatch):
    """vLLM's draw with every row keyed (the race sampler of a windowless step): top-k 11 over the
    digit model's vocabulary, the race where a token can win against the same call forced dense
    (MAX_SUPPORT 0: vLLM's `sample_with_exponential_noise` over the dense rows) and against the
    reference race; the processed logprobs are the same either way."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from vllm_sjdpp.engine.race_sampler import KeyedRaceTopKTopP

    logits = torch.randn(12, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    keys = {i: (50 + i, 9 + 3 * i) for i in range(12)}
    inner = TopKTopPSampler(logprobs_mode="processed_logprobs")
    sampler = KeyedRaceTopKTopP(inner, lambda n: keys)
    k = torch.full((12,), 11)
    tokens, processed = sampler(logits.clone(), {}, k, None)
    monkeypatch.setattr(keyed_race, "MAX_SUPPORT", 0.0)
    dense_tokens, dense_processed = sampler(logits.clone(), {}, k, None)
    assert torch.equal(tokens, dense_tokens) and tokens.dtype == dense_tokens.dtype == torch.int64
    assert torch.equal(processed, dense_processed)
    rows = KeyedRows(*noise.row_keys(np.array([noise.request_key(50 + i) for i in range(12)], dtype=np.uint64),
                                     9 + 3 * np.arange(12)), VOCAB, torch.device("cpu"))
    kth = logits.topk(11, -1).values[:, -1:]
    assert np.array_equal(tokens.numpy(), dense_vllm(logits.masked_fill(logits < kth, -torch.inf).softmax(-1), rows))
