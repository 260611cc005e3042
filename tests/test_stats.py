"""The shared statistics helpers (`stats.py`) that the exactness tests rely on."""

from __future__ import annotations

import pytest
import torch

from stats import ALPHA, BROKEN_ALPHA, goodness_of_fit, inverse_cdf_multinomial


def test_inverse_cdf_multinomial_draws_torch_multinomials_law():
    """Rows of unnormalised probabilities with zeros at both ends and inside: 20000 draws per row
    fit the exact law (chi-square, p > ALPHA), never a zero-probability category, and the same
    draws reject a law with a tenth of one category's mass moved to another (p < BROKEN_ALPHA)."""
    probs = torch.tensor([[0.0, 0.4, 0.0, 1.0, 0.6, 0.0], [0.0, 0.0, 3.0, 0.5, 0.0, 0.5]])
    generator = torch.Generator().manual_seed(0)
    with inverse_cdf_multinomial():
        draws = torch.multinomial(probs.repeat_interleave(20000, 0), 1, generator=generator)
    assert draws.shape == (40000, 1) and draws.dtype == torch.int64
    for row, samples, (top, other) in zip(probs, draws.view(2, 20000), ((3, 1), (2, 3))):
        assert (row[samples] > 0).all()
        assert goodness_of_fit(samples, row) > ALPHA
        wrong = row.clone()
        wrong[top], wrong[other] = 0.9 * row[top], row[other] + 0.1 * row[top]
        assert goodness_of_fit(samples, wrong) < BROKEN_ALPHA


def test_inverse_cdf_multinomial_leaves_invalid_rows_to_torch():
    with inverse_cdf_multinomial(), pytest.raises(RuntimeError):
        torch.multinomial(torch.tensor([[0.2, 0.8], [0.0, 0.0]]), 1)
