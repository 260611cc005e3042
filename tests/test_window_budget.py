"""Sharing a per-pass draft-token budget among the requests of a batch."""

from __future__ import annotations

import random

import pytest

from vllm_sjdpp.engine.window_budget import share_draft_budget


@pytest.mark.parametrize(
    "wanted, budget, expected",
    [
        ([16, 16, 16, 16], 32, [8, 8, 8, 8]),
        ([16, 2, 16, 0], 20, [9, 2, 9, 0]),  # a short window leaves its share to the others
        ([16, 16, 16], 40, [14, 13, 13]),  # the remainder goes to the first requests
        ([16] * 6, 4, [1, 1, 1, 1, 0, 0]),  # fewer drafts than requests
        ([3, 16], 100, [3, 16]),
        ([5, 5], None, [5, 5]),
        ([5, 5], 0, [0, 0]),
    ],
)
def test_examples(wanted, budget, expected):
    assert share_draft_budget(wanted, budget) == expected


def test_water_filling_properties():
    rng = random.Random(0)
    for _ in range(2000):
        wanted = [rng.choice([0, rng.randint(0, 32), 32]) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(0, 600)
        got = share_draft_budget(wanted, budget)
        assert all(0 <= g <= w for g, w in zip(got, wanted))
        assert sum(got) == min(budget, sum(wanted))  # the budget is used when it can be
        # Max-min fair: a request below another by two or more got all it wanted.
        low = min((g for g, w in zip(got, wanted) if g < w), default=None)
        if low is not None:
            assert max(got) <= low + 1
