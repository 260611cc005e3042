"""The goodput controller on synthetic measurements: what it learns and what it chooses.

The exactness of the windows it picks is tested in a real engine (`test_engine.py`); here the
pass cost and the acceptance are known functions, so the best window is known too.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_sjdpp.engine.goodput import EXPLORE_EVERY, EXPLORE_RUN, Acceptance, GoodputController, MeasuredCurve


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_measured_curve_averages_interpolates_and_extrapolates():
    curve = MeasuredCurve(lambda x: np.asarray(x, dtype=np.int64))
    rng = np.random.default_rng(0)
    for n in (1, 9, 33):
        for _ in range(200):
            curve.observe(n, 0.010 + 0.001 * n + rng.normal(0, 0.001))
    predicted = curve(np.array([1.0, 5.0, 20.0, 33.0, 65.0]))
    assert predicted == pytest.approx(0.010 + 0.001 * np.array([1, 5, 20, 33, 65]), abs=5e-4)


def test_a_measured_curve_never_falls():
    """Noise that makes a bigger pass look faster is pooled away (isotonic), and the cost
    beyond the largest measurement does not fall either."""
    curve = MeasuredCurve(lambda x: np.asarray(x, dtype=np.int64))
    for n, t in ((2, 0.05), (20, 0.09), (40, 0.04)):
        curve.observe(n, t)
    xs, ys = curve.points()
    assert list(xs) == [2, 20, 40] and np.all(np.diff(ys) >= 0)
    assert curve(np.array([100.0]))[0] == pytest.approx(0.065)


def test_a_measured_curve_forgets():
    curve = MeasuredCurve(lambda x: np.zeros(len(x), dtype=np.int64), forget=0.9)
    for _ in range(100):
        curve.observe(1, 1.0)
    for _ in range(60):
        curve.observe(1, 2.0)  # the machine got slower
    assert curve(np.array([1.0]))[0] == pytest.approx(2.0, abs=0.01)


def test_a_measured_curve_drops_hiccups_but_follows_a_new_level():
    """Costs drop a time over 1.5 times their bucket's mean (a hiccup: one among five rare
    samples would set the mean), and a time that low restarts the bucket (the first sample was
    the hiccup); three high in a row are a new level and are kept."""
    curve = MeasuredCurve(lambda x: np.zeros(len(x), dtype=np.int64), outlier=1.5)
    for y in (8.0, 3.0, 3.1, 8.0, 3.0, 3.2):
        curve.observe(1, y)
    assert curve(np.array([1.0]))[0] == pytest.approx(3.07, abs=0.02)
    for _ in range(200):
        curve.observe(1, 9.0)  # the machine got three times slower
    assert curve(np.array([1.0]))[0] == pytest.approx(9.0, abs=0.1)


def test_acceptance_is_measured_per_window_length():
    rng = np.random.default_rng(0)
    acceptance = Acceptance()
    alpha = 0.7
    for _ in range(100):
        lengths = rng.integers(0, 9, size=32)
        accepted = np.minimum(rng.geometric(1 - alpha, size=32) - 1, lengths)  # P(>= j) = alpha^j
        acceptance.observe(lengths, accepted)
    exact = np.concatenate([[0.0], np.cumsum(alpha ** np.arange(1, 9))])
    # About 200 windows count per length (forgetting), so the standard error is about 0.1.
    assert acceptance.expected(8) == pytest.approx(exact, abs=0.3)
    # Beyond the longest window measured, every further draft is assumed accepted (optimism).
    assert acceptance.expected(12)[9:] == pytest.approx(acceptance.expected(8)[8] + np.arange(1, 5))


def test_acceptance_counts_windows_as_a_run_of_them_refines_them():
    """Drafts beyond the last window's length plus one have not been refined by any pass; here
    they are never accepted, the refined ones with probability 0.9 each (geometric).  After a
    run of full windows, every 8th window is a full one after windows of 4 (the controller's far
    probe): A(32) stays what a run of full windows accepts, sum_j 0.9^j = 8.69 (tolerance 2,
    about 3 standard errors of the ~200 windows the forgetting keeps); counting the probes would
    pull it towards 3.7."""
    rng = np.random.default_rng(0)
    controller = GoodputController(32, clock=Clock())
    ids = [f"r{i}" for i in range(16)]
    last = 0
    for step in range(600):
        length = 32 if step < 200 or step % 8 == 7 else 4
        accepted = np.minimum(rng.geometric(0.1, size=16) - 1, min(length, last + 1))
        controller.observe_step(16 * (length + 1), ids, True, [length] * 16, accepted)
        last = length
    steady = 0.9 * (1 - 0.9**32) / 0.1
    gain = controller.acceptance.expected(32)
    assert gain[32] == pytest.approx(steady, abs=2.0)
    assert gain[4] == pytest.approx(0.9 * (1 - 0.9**4) / 0.1, abs=0.5)


def drive(controller, clock, cost_of, accept_prob, batch, k, steps, rng):
    """Run the controller as the sampler does: choose windows, pay for the pass, report it.
    Acceptance is geometric: each draft is accepted with probability accept_prob."""
    ids = [f"r{i}" for i in range(batch)]
    lengths = [0] * batch
    chosen = []
    for _ in range(steps):
        accepted = [min(rng.geometric(1 - accept_prob) - 1, n) for n in lengths]
        clock.now += cost_of(batch + sum(lengths), sum(lengths) > 0)
        controller.observe_step(batch + sum(lengths), ids, sum(lengths) > 0, lengths, accepted)
        lengths = controller.windows([k] * batch, [])
        chosen.append(max(lengths))
    return chosen


def best_cap(cost_of, accept_prob, batch, k):
    expected = np.concatenate([[0.0], np.cumsum(accept_prob ** np.arange(1, k + 1))])
    goodput = [batch * (1 + expected[c]) / cost_of(batch * (1 + c), c > 0) for c in range(k + 1)]
    return int(np.argmax(goodput)), goodput


@pytest.mark.parametrize(
    "name, cost_of, batch",
    [
        ("flat, as a GPU below its roofline", lambda n, d: 0.020, 4),
        ("linear, as a busy CPU", lambda n, d: 0.020 * n, 8),
        ("fixed cost plus a slope", lambda n, d: 0.020 + 0.002 * n, 4),
        ("drafted steps cost more", lambda n, d: 0.003 + 0.003 * d + 0.0001 * n, 1),
        ("flat to 64 positions, then a slope", lambda n, d: 0.020 + 0.0005 * max(0, n - 64), 16),
    ],
)
def test_the_controller_finds_the_best_window(name, cost_of, batch):
    k, accept_prob = 16, 0.8
    best, goodput = best_cap(cost_of, accept_prob, batch, k)
    for seed in range(3):
        clock, rng = Clock(), np.random.default_rng(seed)
        controller = GoodputController(k, clock=clock)
        chosen = drive(controller, clock, cost_of, accept_prob, batch, k, 1500, rng)
        settled = [c for i, c in enumerate(chosen[750:], 751) if i % EXPLORE_EVERY >= EXPLORE_RUN]
        got = max(set(settled), key=settled.count)
        # Within 5% of the best goodput: the estimates are noisy and the optimum is often flat.
        assert goodput[got] >= 0.95 * goodput[best], (name, seed, got, best, goodput)


def test_a_pass_is_timed_after_one_of_its_kind():
    """The time between two step ends also holds the earlier step's tail, here 0.1 per token it
    committed (in units of 10 ms).  Windows of one (accepting half a draft) with a run of three
    choices of none every 16 steps, as exploring does: the passes without drafts cost 1.8 in a
    run of them, but 2.2 right after a drafted step, whose 12 tokens they would pay for; timing
    those would make drafting look better than it is (t_0 = 2.0)."""
    batch = 8
    rng, clock = np.random.default_rng(0), Clock()
    controller = GoodputController(8, clock=clock)
    ids = [f"r{i}" for i in range(batch)]
    lengths, tail = [0] * batch, 0.0
    for step in range(2000):  # in the sampler's order: choose the next windows, run, report
        next_lengths = [0 if step % 16 < 3 else 1] * batch
        full_step = sum(lengths) + sum(next_lengths) > 0  # verifies or makes drafts
        accepted = [min(rng.geometric(0.5) - 1, n) for n in lengths]
        clock.now += 0.01 * (1.0 + 0.05 * sum(lengths) + 0.3 * full_step + tail)
        tail = 0.1 * (batch + sum(accepted))
        controller.observe_step(batch + sum(lengths), ids, full_step, lengths, accepted)
        lengths = next_lengths
    assert controller.cost.curve(batch, False)(8)[()] == pytest.approx(0.018, abs=2e-4)
    assert controller.cost.curve(batch, True)(16)[()] == pytest.approx(0.029, abs=5e-4)


def test_explores_and_waits_for_measurements():
    clock = Clock()
    controller = GoodputController(8, clock=clock)
    # A batch size not measured yet is probed: no drafts, windows of one, full windows.
    for lengths in ([0, 0], [1, 1], [8, 8]):
        assert controller.windows([8, 8], []) == lengths
        for _ in range(2):
            clock.now += 0.01 * (2 + sum(lengths))
            controller.observe_step(2 + sum(lengths), ["a", "b"], lengths[0] > 0, lengths, [0, 0])
    for step in range(1, 3 * EXPLORE_EVERY):
        drafted = step % 2
        clock.now += 0.01 * (2 + 16 * drafted)  # drafts cost 9x: never worth it
        controller.observe_step(2 + 16 * drafted, ["a", "b"], bool(drafted), [8 * drafted] * 2, [0, 0])
    controller.steps = 0
    chosen = [max(controller.windows([8, 8], [])) for _ in range(160 * EXPLORE_EVERY)]
    exploring = [EXPLORE_EVERY <= step and step % EXPLORE_EVERY < EXPLORE_RUN for step in range(1, len(chosen) + 1)]
    assert not any(c for c, e in zip(chosen, exploring) if not e)  # the choice: no drafts
    # Exploring runs go round the whole range, and next to the choice (0, so 1); the full window,
    # predicted at 9x the chosen pass, only once in these 5120 steps.
    assert {c for c, e in zip(chosen, exploring) if e} == {0, 1, 2, 4, 8}
    assert chosen.count(8) == EXPLORE_RUN
    assert controller.windows([0, 0], []) == [0, 0]


def measured(cost_of) -> GoodputController:
    """A controller that has measured `cost_of` at a few pass sizes and sees every draft accepted."""
    controller = GoodputController(8, clock=Clock())
    for n in (1, 2, 18, 34, 66):
        controller.cost.observe(1, n, n > 1, cost_of(n))
    controller.acceptance.observe(np.arange(1, 9), np.arange(1, 9))
    return controller


def test_pinned_windows_count_in_the_cost():
    """A request whose window is pinned (seeded) still makes the pass bigger."""
    assert measured(lambda n: 0.010 + 0.001 * n).windows([8], []) == [8]
    cheap_until_30 = lambda n: 0.010 + 0.001 * max(0, n - 30) ** 2  # noqa: E731
    assert measured(cheap_until_30).windows([8], []) == [8]
    assert measured(cheap_until_30).windows([8], [8, 8, 8]) < [8]  # the pinned fill the cheap part


def test_pinned_windows_do_not_wait_for_a_windowless_step():
    """With a seeded request's window in every pass no step is windowless: the controller
    chooses from the drafted steps' cost alone instead of waiting for t_0 forever."""
    controller = GoodputController(8, clock=Clock())
    for n in (10, 18, 34, 66):
        controller.cost.observe(2, n, True, 0.010)  # flat: drafts are free
    controller.acceptance.observe(np.arange(1, 9), np.arange(1, 9))
    assert controller.windows([8], [8]) == [8]


def test_an_idle_gap_is_not_a_pass():
    clock = Clock()
    controller = GoodputController(4, clock=clock)
    controller.observe_step(1, ["a"], False, [0], [0])
    clock.now += 30.0  # the engine waited for work; "b" is a new request
    controller.observe_step(1, ["b"], False, [0], [0])
    clock.now += 0.01
    controller.observe_step(1, ["b"], False, [0], [0])
    xs, ts = controller.cost.curve(1, False).points()
    assert list(ts) == [pytest.approx(0.01)] and controller.cost.curve(1, True) is None


def test_the_cost_is_per_batch_size():
    """Per-request work makes 8 requests of 5 positions dearer than 1 of 40: each batch size has
    its curve, and one not measured is probed (no drafts) rather than guessed."""
    controller = GoodputController(8, clock=Clock())
    for batch, per_request in ((1, 0.001), (8, 0.004)):
        for n in (batch, 5 * batch, 40):
            controller.cost.observe(batch, n, n > batch, 0.002 + per_request * batch + 0.0001 * n)
    one, eight = (controller.cost.predict(b, np.array([40.0]), np.array([True]))[0] for b in (1, 8))
    assert one == pytest.approx(0.007) and eight == pytest.approx(0.038)
    controller.acceptance.observe([4], [4])
    assert controller.windows([4] * 30, []) == [0] * 30


def test_several_workers_get_the_fixed_fallback_budget(caplog):
    """Every worker runs the step and must make the same windows, but each would time its own
    passes: with tensor or pipeline parallelism "auto" is the fixed AUTO_FALLBACK_BUDGET, with
    a warning, and the controller is never asked (a single worker adapts)."""
    import logging
    from types import SimpleNamespace

    from vllm_sjdpp.config import ADDITIONAL_CONFIG_KEY, AUTO_FALLBACK_BUDGET
    from vllm_sjdpp.engine.runtime import SJDPPRuntime
    from vllm_sjdpp.engine.window_budget import share_draft_budget

    def runtime(world_size):
        """The runtime of a runner with `world_size` workers, serving k = 32 under "auto"."""
        model_config = SimpleNamespace(
            hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]), get_vocab_size=lambda: 300, max_model_len=512
        )
        runner = SimpleNamespace(
            vllm_config=SimpleNamespace(
                additional_config={ADDITIONAL_CONFIG_KEY: {"num_speculative_tokens": 32}}, model_config=model_config
            ),
            model_config=model_config, parallel_config=SimpleNamespace(world_size=world_size),
        )
        return SJDPPRuntime(runner)

    wanted, unseeded = [32] * 64, [False] * 64
    with caplog.at_level(logging.WARNING, logger="vllm.sjdpp"):
        tp2 = runtime(2)
    assert "needs a single worker" in caplog.text
    tp2.goodput = None  # asking it would fail
    assert tp2._share(wanted, unseeded) == share_draft_budget(wanted, AUTO_FALLBACK_BUDGET)
    assert sum(tp2._share(wanted, unseeded)) == AUTO_FALLBACK_BUDGET
    single = runtime(1)
    asked = []
    single.goodput = SimpleNamespace(windows=lambda w, p: asked.append(1) or [0] * len(w))
    assert single._share(wanted, unseeded) == [0] * 64 and asked


@pytest.mark.parametrize("gain, drafts", [(1.02, False), (1.06, True)])
def test_drafting_must_promise_a_margin_over_none(gain, drafts):
    """Every window promises `gain` times the goodput of no drafts (each pass costs its
    positions / gain, every draft accepted): within DRAFT_MARGIN (5%) of none, no drafts."""
    from vllm_sjdpp.engine.goodput import DRAFT_MARGIN

    assert 1.02 < DRAFT_MARGIN < 1.06
    controller = measured(lambda n: 0.001 * (n if n == 1 else n / gain))
    goodput = controller.evaluate(np.array([8]), np.zeros(0, dtype=int))[0]
    assert goodput[1:] / goodput[0] == pytest.approx(gain)
    assert (controller.windows([8], [])[0] > 0) == drafts


@pytest.mark.parametrize("realised, drafts", [(False, False), (True, True)])
def test_drafting_that_realises_less_than_predicted_stops(realised, drafts):
    """Windows whose lengths switch (8, 6, 8, ...) are left out of A(L), as a probe is; if their
    passes commit nothing, drafted passes realise a ninth of the goodput the curves predict, and
    the calibration turns a choice of 8 drafts (5x the goodput of none, predicted) into none.
    Passes that commit what was predicted leave it at 8."""
    clock = Clock()
    cost_of = lambda n: 0.010 + 0.001 * n  # noqa: E731
    controller = GoodputController(8, clock=clock)
    for n in (1, 2, 18, 34, 66):
        controller.cost.observe(1, n, n > 1, cost_of(n))
    for _ in range(10):
        controller.acceptance.observe(np.arange(1, 9), np.arange(1, 9))
    assert controller.windows([8], []) == [8]
    controller.observe_step(1, ["a"], True, [0], [0])
    for step in range(40):
        length = 8 if step % 2 else 6
        clock.now += cost_of(1 + length)
        controller.observe_step(1 + length, ["a"], True, [length], [length if realised else 0])
    assert controller.acceptance.expected(8)[8] == pytest.approx(8)  # switching windows: not measured
    assert (controller.calibration.factor(1) > 0.9) == realised
    controller._next_choice = 0
    assert (controller.windows([8], [])[0] > 0) == drafts
