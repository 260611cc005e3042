"""The goodput controller on synthetic measurements: what it learns and what it chooses.

The exactness of the windows it picks is tested in a real engine (`test_engine.py`); here the
pass cost and the acceptance are known functions, so the best window is known too.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_sjdpp.goodput import EXPLORE_EVERY, AcceptanceByPosition, GoodputController, PassCost


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_pass_cost_interpolates_and_extrapolates():
    cost = PassCost(decay=1.0)  # keep the latest measurement per bucket
    for n in (1, 9, 33):
        cost.observe(n, 0.010 + 0.001 * n)
    predicted = cost.predict(np.array([1.0, 5.0, 20.0, 33.0, 65.0]))
    assert predicted == pytest.approx(0.010 + 0.001 * np.array([1, 5, 20, 33, 65]))


def test_pass_cost_never_falls_beyond_what_was_measured():
    cost = PassCost(decay=1.0)
    cost.observe(2, 0.05)
    cost.observe(40, 0.04)  # noise: a bigger pass measured faster
    assert cost.predict(np.array([100.0]))[0] == pytest.approx(0.04)


def test_acceptance_by_position_learns_a_geometric_profile():
    rng = np.random.default_rng(0)
    acceptance = AcceptanceByPosition(max_window=8)
    alpha = 0.7
    for _ in range(200):
        lengths = rng.integers(0, 9, size=32)
        accepted = np.minimum(rng.geometric(1 - alpha, size=32) - 1, lengths)  # P(>= j) = alpha^j
        acceptance.observe(lengths, accepted)
    expected = acceptance.expected_accepted()
    exact = np.concatenate([[0.0], np.cumsum(alpha ** np.arange(1, 9))])
    assert expected == pytest.approx(exact, abs=0.06)


def drive(controller, clock, cost_of, accept_prob, batch, k, steps, rng):
    """Run the controller as the sampler does: choose windows, pay for the pass, report it."""
    ids = [f"r{i}" for i in range(batch)]
    lengths = [0] * batch
    chosen = []
    for _ in range(steps):
        accepted = [min(rng.geometric(1 - accept_prob) - 1, n) for n in lengths]
        clock.now += cost_of(batch + sum(lengths))
        controller.observe_step(batch + sum(lengths), ids, lengths, accepted)
        lengths = controller.windows([k] * batch, [])
        chosen.append(max(lengths))
    return chosen


def best_cap(cost_of, accept_prob, batch, k):
    expected = np.concatenate([[0.0], np.cumsum(accept_prob ** np.arange(1, k + 1))])
    goodput = [batch * (1 + expected[c]) / cost_of(batch * (1 + c)) for c in range(k + 1)]
    return int(np.argmax(goodput)), goodput


@pytest.mark.parametrize(
    "name, cost_of, batch",
    [
        ("flat, as a GPU below its roofline", lambda n: 0.020, 4),
        ("linear, as a busy CPU", lambda n: 0.020 * n, 8),
        ("fixed cost plus a slope", lambda n: 0.020 + 0.002 * n, 4),
    ],
)
def test_the_controller_finds_the_best_window(name, cost_of, batch):
    k, accept_prob = 16, 0.8
    clock, rng = Clock(), np.random.default_rng(1)
    controller = GoodputController(k, clock=clock)
    chosen = drive(controller, clock, cost_of, accept_prob, batch, k, 400, rng)
    best, goodput = best_cap(cost_of, accept_prob, batch, k)
    settled = [c for i, c in enumerate(chosen[200:], 201) if i % EXPLORE_EVERY]
    got = max(set(settled), key=settled.count)
    # Within 3% of the best goodput (the estimates are noisy; the optimum is often flat).
    assert goodput[got] >= 0.97 * goodput[best], (name, got, best, goodput)


def test_explores_and_waits_for_measurements():
    clock = Clock()
    controller = GoodputController(8, clock=clock)
    assert controller.windows([8, 8], []) == [8, 8]  # nothing measured: full windows
    for step in range(1, 3 * EXPLORE_EVERY):
        clock.now += 0.01 * (2 + 16 * (step % 2))  # drafts cost 9x: never worth it
        controller.observe_step(2 + 16 * (step % 2), ["a", "b"], [8 * (step % 2)] * 2, [0, 0])
    chosen = [controller.windows([8, 8], []) for _ in range(4 * EXPLORE_EVERY)]
    drafting = [i for i, c in enumerate(chosen, 2) if c != [0, 0]]
    assert drafting == [2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY]  # only every other exploring step
    assert controller.windows([0, 0], []) == [0, 0]


def test_pinned_windows_count_in_the_cost():
    """A request whose window is pinned (seeded) still makes the pass bigger."""
    clock = Clock()
    controller = GoodputController(8, clock=clock)
    for n in (2, 18, 34, 66):
        controller.cost.observe(n, 0.010 + 0.001 * n)
    controller.acceptance.observe(np.full(100, 8), np.full(100, 8))  # everything accepted
    assert controller.windows([8], []) == [8]
    slow = GoodputController(8, clock=clock)
    for n in (2, 18, 34, 66):
        slow.cost.observe(n, 0.010 + 0.001 * max(0, n - 30) ** 2)  # cheap until 30 positions
    slow.acceptance.observe(np.full(100, 8), np.full(100, 8))
    assert slow.windows([8], []) == [8]
    assert slow.windows([8], [8, 8, 8]) < [8]  # three pinned windows already fill the cheap part


def test_an_idle_gap_is_not_a_pass():
    clock = Clock()
    controller = GoodputController(4, clock=clock)
    controller.observe_step(1, ["a"], [0], [0])
    clock.now += 30.0  # the engine waited for work; "b" is a new request
    controller.observe_step(1, ["b"], [0], [0])
    clock.now += 0.01
    controller.observe_step(1, ["b"], [0], [0])
    assert [t for _, t in controller.cost.buckets.values()] == [pytest.approx(0.01)]
