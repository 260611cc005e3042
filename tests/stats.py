"""Statistics shared by the exactness tests: chi-square tests, and the reference streams drawn
with transformers' own `generate`."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import torch
from scipy import stats

# Every exactness test passes when p > ALPHA and every deliberately broken variant must give
# p < BROKEN_ALPHA: with fixed seeds both outcomes are reproducible, not flaky.
ALPHA = 1e-3
BROKEN_ALPHA = 1e-6


def goodness_of_fit(samples: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of `samples` (token ids) against the exact distribution `probs`.

    Categories with expected count below `min_expected` are pooled into one.
    """
    probs = probs.double().cpu().numpy()
    probs = probs / probs.sum()
    counts = np.bincount(samples.cpu().numpy(), minlength=probs.size).astype(float)
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    if obs.size < 2:
        return 1.0
    return float(stats.chisquare(obs, exp).pvalue)


def same_distribution(a: torch.Tensor, b: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value that two sets of sequences ([N, L] and [M, L]) come from one distribution.

    A chi-square test of homogeneity over the distinct sequences; sequences with a pooled
    expected count below `min_expected` in either sample share one cell.
    """
    keys, inverse = torch.unique(torch.cat([a, b]), dim=0, return_inverse=True)
    counts = np.zeros((2, keys.shape[0]))
    np.add.at(counts[0], inverse[: a.shape[0]].numpy(), 1)
    np.add.at(counts[1], inverse[a.shape[0] :].numpy(), 1)
    total = counts.sum(1, keepdims=True)
    expected = counts.sum(0, keepdims=True) * total / total.sum()
    big = expected.min(0) >= min_expected
    table = np.concatenate([counts[:, big], counts[:, ~big].sum(1, keepdims=True)], 1)
    table = table[:, table.sum(0) > 0]
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def position_pair_pvalues(a: np.ndarray, b: np.ndarray, vocab: int) -> list[float]:
    """Chi-square homogeneity of per-position and adjacent-pair token frequencies of two sets of
    sequences ([N, L] and [M, L]); compare the smallest with ALPHA / len (Bonferroni)."""
    pvalues = []
    columns = [(a[:, i], b[:, i]) for i in range(a.shape[1])]
    columns += [(a[:, i] * vocab + a[:, i + 1], b[:, i] * vocab + b[:, i + 1]) for i in range(a.shape[1] - 1)]
    for x, y in columns:
        keys, inverse = np.unique(np.concatenate([x, y]), return_inverse=True)
        table = np.zeros((2, keys.size))
        np.add.at(table[0], inverse[: x.size], 1)
        np.add.at(table[1], inverse[x.size :], 1)
        rare = table.sum(0) < 10  # pooled: expected counts >= 5 per sample in every cell
        table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], 1)
        table = table[:, table.sum(0) > 0]
        pvalues.append(float(stats.chi2_contingency(table, correction=False).pvalue))
    return pvalues


@contextlib.contextmanager
def inverse_cdf_multinomial():
    """Inside the block, `torch.multinomial(probs, 1)` draws by inverse-CDF sampling (a float64
    cumulative sum and a binary search per row): the same law up to float64 rounding, for
    transformers' `generate` to sample its reference streams with.  torch's CPU multinomial took
    0.49 s per draw from [100, 184622] probabilities, 42% of transformers' time on Emu3's
    vocabulary (2-core EPYC); this, 0.12 s.  A category of probability 0 is never drawn (its step
    of the CDF is empty); a row without a positive finite total goes to torch, which refuses it."""
    original = torch.multinomial

    def draw(probs, num_samples, replacement=False, *, generator=None, out=None):
        if num_samples != 1 or out is not None or probs.dim() != 2:
            return original(probs, num_samples, replacement, generator=generator, out=out)
        cdf = probs.double().cumsum(-1)
        total = cdf[:, -1:]
        if not (torch.isfinite(total).all() and (total > 0).all() and (probs >= 0).all()):
            return original(probs, num_samples, replacement, generator=generator)
        u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator) * total
        return torch.searchsorted(cdf, u, right=True)

    with mock.patch("torch.multinomial", draw):
        yield


def reference_samples(model, prompt: list[int], negative: list[int], samples: int, chunk: int,
                      **generate_kwargs) -> np.ndarray:
    """[samples, tokens generated] after `prompt` from transformers' own guided `generate`
    (`negative` as `negative_prompt_ids`, `do_sample=True`, the rest of `generate_kwargs` as
    given: `guidance_scale`, without which `negative` is ignored, and `max_new_tokens`, which
    every chunk must generate in full, as the chunks are concatenated), in chunks of `chunk`
    streams (unbatched guidance computes the negative prompt's logits at every position: a chunk
    holds [chunk, len(negative), vocabulary] floats).  Seeds torch's global generator with 0 and
    draws under `inverse_cdf_multinomial`.  AssertionError where `chunk` does not divide
    `samples`."""
    assert samples % chunk == 0, (samples, chunk)
    torch.manual_seed(0)
    out = []
    with inverse_cdf_multinomial():
        for _ in range(samples // chunk):
            ids = model.generate(torch.tensor([prompt] * chunk), do_sample=True,
                                 negative_prompt_ids=torch.tensor([negative] * chunk), **generate_kwargs)
            out.append(ids[:, len(prompt):].numpy())
    return np.concatenate(out)
