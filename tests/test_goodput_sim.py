"""The goodput controller in a simulated engine (`sim_engine.py`): measured machines' pass costs
and the digit model's acceptance, which depends on how often a draft has been refined.

From a fresh controller, over one image's worth of steps (STEPS = 273: what one digit image
takes without drafts), its goodput (real tokens committed per simulated second) over the second
half of them (steps START .. STEPS - 1: the first half is for learning, the second what the
first image's client sees from then on) is compared with the best fixed cap's over the same
steps, each cap 0 .. 32 run on the same streams and costs; both are means over the same seeds.
Scenarios: every machine profile at 1 request, at 32, and paired (16 requests, or 1, each with
its guidance companion: half the batch never drafts and commits nothing of its own).

At one request a length's acceptance is measured from one window per step, and a window accepts
nothing two times in three or a run of up to 15 drafts: by step START the direct means of the
lengths measured lie between half and twice the true A(L) (cpu-fp32, 12 seeds).  There the
controller is held to 8% (`TOLERANCE`), everywhere else to 5% (it reaches 0.97 to 1.01).  Figures
below are one request, unpaired, per profile in `PROFILES` order (cpu-fp32, cpu-fp32-drift,
cpu-fp32-b, cpu-bf16-avx2, gpu, twin), from one-off scripts over this module's functions
(2026-12-07).  On the test's seeds (`SEEDS[1]`, 0 to 11) the controller reaches 0.941, 0.933,
0.955, 0.975, 0.996, 0.984 of the best fixed cap; on 36 seeds the test does not run (12 to 47),
0.933, 0.913, 0.925, 0.983, 1.008, 0.969: there cpu-fp32-drift falls outside the 8%.  What
limits it is what those windows can tell: given the true A(L) (`acceptance_by_slot` with 200
images) in place of its estimate, the same controller reaches 1.003, 0.972, 1.000, 0.998, 1.010,
1.000 on seeds 12 to 47.  Estimators tried in its place, none better on every profile: on seeds
12 to 47, the truncated means scaled by one factor fitted where both are measured (0.949, 0.913,
0.937, 0.993, 0.983, 0.973; at 32 requests on the test's seeds 0.966 on the GPU, this 0.981),
a saturating fit a (1 - exp(-L / b)) to the direct means alone (0.932, 0.875, 0.913, 0.991,
1.008, 0.964) or as what they are shrunk towards (0.945, 0.902, 0.933, 0.998, 1.007, 0.977); on
the test's seeds, the truncated means where measured (0.941, 0.947, 0.931, 0.975, 0.996, 0.973),
upper confidence bounds on the direct means (0.87 to 0.95) and hazards per slot pooled over
lengths with a factor for the distance from the window's end (0.85 to 0.90).  The simulated
acceptance is held to the digit model's measured one.

The measured profile, cpu-fp32-avx2 (`ONE_REQUEST_PROFILES`: the README's demo machine, its pass
costs from benchmarks/pass_cost.py, its acceptance float32's), is a scenario at one request: the
controller reaches 0.975 of the best fixed cap (13) on the test's seeds and 0.970 on seeds 12 to
47 (a `/tmp` script, 2026-12-07; held, like every scenario at one request, to 8%).  It tells
controllers apart less than the linear profiles: a step with drafts pays the SJD++ step once and
little per position, so caps of 12 to 32 all come within 4% of the best (0.963, 0.972, 0.973,
0.968 at 12, 16, 24, 32) and a controller holding full windows passes too (the linear-acceptance
one: 0.976); it fails one that settles on short windows or none (0.848 at 8, 0.715 at 4, 0.578
without drafts).  Over the demo's own shape (ten images one at a time, each after a plain image
of 273 windowless steps, one controller throughout, every step counted; seeds 0 to 11, a one-off
script) the controller reaches 0.923 of the best fixed cap (15; 0.878 over the first image, 0.89
to 0.955 over the others), where this test's window reads 0.975; the demo measured about 0.92
(below).  The linear profiles of CPUs in float32 keep `DIGITS`: paired with float32's acceptance
(`DIGITS_FP32`), their one-request scenarios read 0.937, 0.920, 0.942 (cpu-fp32, -drift, -b;
seeds 0 to 11) and 0.952, 0.959, 0.950 (12 to 47), and with a companion 0.907, 0.883, 0.913 and
0.939, 0.899, 0.940: outside the 8% on the test's seeds, where `DIGITS` gives 0.92 or more.

At one request this engine does not predict what a change does in the real one.  A length
counted as measured only after 32 of its windows (74370f5, reverted) brought the controller
here 2 to 3 points nearer the best fixed cap on the fp32 profiles (seeds 48 to 95: 0.954, 0.948,
0.942 against 0.926, 0.924, 0.916), and on a profile of the demo's measured costs (a drafted
step 1.75x a plain one, 33 positions 2.7x; seeds 0 to 47) 0.972 against 0.936.  In the README's
demo (`python -m vllm_sjdpp.digits.demo --dtype float32` under the AVX2 cap: ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS set to AVX2; the 2-core EPYC, 2026-12-07) it
drafted 9 tokens a pass instead of 16.5, and one image at a time came 1.33x and 1.34x faster
than plain decoding, against 1.49x at 25f1943 (without it) in the same hour.  Without it, the
demo's "auto" against its full windows at one image, each against its own server's plain
images, was 0.91 to 1.09 (median 0.935; 9 runs at ccfeb80, 6402111 and 25f1943).  That is
against full windows, not the best fixed cap: in one server with full windows (a `/tmp` script:
the demo's ten images one at a time, two rounds, each request's `sjdpp_num_speculative_tokens`
set) windows of 8, 12, 16, 24 and 32 drafts made one image 1.30x, 1.51x, 1.55x, 1.59x and 1.56x
faster than plain, so there the best is 24 and full windows 0.98 of it; here, on the demo's
costs, the best fixed cap is 15 and full windows give 0.92 of its goodput (seeds 0 to 47).  The
demo's ten images in float32 accept 2.43 drafts a full window; the 100 images `DIGITS` is fitted
to, 2.22 in bf16 and 2.34 in float32 (benchmarks/results/digits_acceptance_fp32.md).  Likewise,
re-making a standing choice ever less often below TRIAL_MIN_BATCH requests (as is done where no
drafts stand from TRIAL_MIN_BATCH on) came about 2 points nearer here on the fp32 profiles at
one request (seeds 0 to 95) and at two (0 to 23); in the demo (the same command, 2 runs) it
drafted 12.1 tokens a pass, not 14 to 18, and "auto" reached 0.89 and 0.96 of full windows at
one image.  Changes that explore less look better here and settle on shorter windows there.

Broken controllers must fall short where their bias matters: the old acceptance model (linear
between measured lengths), and companions counted as requests (as the runtime did).  And where
drafts are rarely accepted on a machine where drafting is dear (a tiny random folder), the
first image's goodput, learning included, is held to RANDOM_FLOOR of no drafts'.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from sim_engine import (DIGITS, DIGITS_FP32, ONE_REQUEST_PROFILES, PROFILES, RANDOM, RESULTS, ROW, WINDOW, Clock, Drafts,
                        Profile, acceptance_by_slot, fixed_goodputs, run)

from vllm_sjdpp.engine.goodput import (PROBE_GAP, REMEASURE_EVERY, TRIAL_MIN_BATCH, Acceptance, GoodputController, Verdict,
                                      batch_bucket)

STEPS, START = 273, 137
SEEDS = {1: 12, 32: 4, 16: 4}  # per number of requests: one request's streams vary most
TOLERANCE = {1: 0.08, 32: 0.05, 16: 0.05}
PROFILE = {p.name: p for p in PROFILES + ONE_REQUEST_PROFILES}
SCENARIOS = [(p.name, batch, paired) for batch, paired in ((1, False), (32, False), (16, True), (1, True)) for p in PROFILES]
SCENARIOS += [(p.name, 1, False) for p in ONE_REQUEST_PROFILES]


@functools.lru_cache(maxsize=None)
def best_fixed(batch: int, paired: bool) -> dict[str, tuple[float, int]]:
    """Per profile: the best fixed cap's goodput (mean over the seeds) and that cap."""
    profiles = PROFILES + ONE_REQUEST_PROFILES if (batch, paired) == (1, False) else PROFILES
    total = {p.name: np.zeros(WINDOW + 1) for p in profiles}
    for seed in range(SEEDS[batch]):
        for name, goodput in fixed_goodputs(batch, STEPS, seed, START, paired, profiles).items():
            total[name] += goodput / SEEDS[batch]
    return {name: (float(g.max()), int(g.argmax())) for name, g in total.items()}


def controlled(profile: str, batch: int, paired: bool, make=GoodputController, companions_counted=False):
    """The controller's goodput (mean over the seeds) and the cap it held most in each run."""
    goodput, caps = [], []
    for seed in range(SEEDS[batch]):
        controller = make(WINDOW, clock=Clock())
        trace = run(PROFILE[profile], batch, STEPS, seed, controller=controller, paired=paired,
                    companions_counted=companions_counted)
        goodput.append(trace.goodput(START))
        caps.append(int(np.bincount(trace.caps[START:]).argmax()))
    return float(np.mean(goodput)), caps


@pytest.mark.parametrize("profile, batch, paired", SCENARIOS)
def test_the_controller_is_within_reach_of_the_best_fixed_window(profile, batch, paired):
    best, cap = best_fixed(batch, paired)[profile]
    goodput, caps = controlled(profile, batch, paired)
    assert goodput >= (1 - TOLERANCE[batch]) * best, (goodput / best, cap, caps)


class LinearAcceptance(Acceptance):
    """The old acceptance model: linear between the measured means, and beyond the longest one
    every further draft accepted."""

    def expected(self) -> np.ndarray:
        lengths, means = self.means()
        xs, ys = np.concatenate([[0], lengths]), np.concatenate([[0.0], means])
        L = np.arange(self.max_window + 1)
        return np.minimum(np.interp(L, xs, ys) + np.maximum(L - xs[-1], 0), L)


def linear_controller(max_window: int, clock) -> GoodputController:
    controller = GoodputController(max_window, clock=clock)
    controller.acceptance = LinearAcceptance(max_window)
    return controller


@pytest.mark.parametrize("broken, profile, batch, paired", [
    ("linear acceptance", "cpu-fp32", 1, False),  # mid-size windows under-estimated, never tried
    ("linear acceptance", "gpu", 32, False),
    # Half the windows accept nothing and the tokens double (drafting looks worse), the
    # companions' drafts are missing from the positions (it looks cheaper): at 16 paired
    # requests on the GPU it drafts too little.
    ("companions counted", "gpu", 16, True),
])
def test_a_broken_controller_falls_short(broken, profile, batch, paired):
    best, _ = best_fixed(batch, paired)[profile]
    if broken == "linear acceptance":
        goodput, caps = controlled(profile, batch, paired, make=linear_controller)
    else:
        goodput, caps = controlled(profile, batch, paired, companions_counted=True)
    assert goodput < (1 - TOLERANCE[batch]) * best, (goodput / best, caps)


MEASURED = {DIGITS: RESULTS / "digits_acceptance.json", DIGITS_FP32: RESULTS / "digits_acceptance_fp32.json"}
# Tolerances, absolute: drafts accepted per pass, the first draft, a column's later drafts.  The
# float32 fit misses more (its form is fitted at k = 32: short windows' first drafts, and the
# columns, are not its own parameters).
TOLERANCES = {DIGITS: (0.07, 0.03, 0.06), DIGITS_FP32: (0.10, 0.03, 0.08)}
# About the acceptance model before the refit: a run stopped at a row's first code (accepted
# 0.069), fitted to drafts per pass alone (0.790, 1.223, 1.880, 2.057: benchmarks/results/e2e.json
# at 698a729).
ROW_BARRIER = Drafts("row barrier", first=(0.306,) * ROW, later=(0.069,) + (0.915,) * (ROW - 1), tau=0.41,
                     fresh=0.0, near=(), certain=())


def misses(drafts: Drafts, path: Path = MEASURED[DIGITS]) -> tuple[np.ndarray, np.ndarray, float]:
    """Against the counts at `path` (benchmarks/digits_acceptance.py's), full windows of each k
    measured there (`acceptance_by_slot`, 100 images): per k the drafts accepted per pass and the
    first drafts' acceptance, simulated minus measured; and at the longest k the largest miss over
    the image columns of the later drafts' acceptance."""
    measured = json.loads(path.read_text())
    tested, accepted = np.array(measured["tested"], dtype=float), np.array(measured["accepted"], dtype=float)
    per_pass, first = [], []
    for i, window in enumerate(measured["windows"]):  # the longest last: its t and a stay
        t, a, drafts_per_pass = acceptance_by_slot(drafts, window)
        per_pass.append(drafts_per_pass - measured["drafts_per_pass"][i])
        first.append(a[:, 0].sum() / t[:, 0].sum() - accepted[i, :, 0].sum() / tested[i, :, 0].sum())
    real = accepted[-1, :, 1:].sum(1) / tested[-1, :, 1:].sum(1)
    return np.array(per_pass), np.array(first), float(np.abs(a[:, 1:].sum(1) / t[:, 1:].sum(1) - real).max())


@pytest.mark.parametrize("drafts", [DIGITS, DIGITS_FP32], ids=lambda d: d.name)
def test_the_simulated_digit_model_accepts_where_the_real_one_did(drafts):
    """`DIGITS` against the digit model's acceptance served in bf16, `DIGITS_FP32` in float32,
    full windows of k = 4, 8, 16, 32, within `TOLERANCES`: drafts accepted per pass at every k
    (the fits miss by 0.056 and 0.094 at most, both at k = 4, too few), the first draft (0.020 and
    0.026), and at k = 32 every column's later drafts (0.047 and 0.077)."""
    per_pass_tolerance, first_tolerance, column_tolerance = TOLERANCES[drafts]
    per_pass, first, column = misses(drafts, MEASURED[drafts])
    assert np.abs(per_pass).max() <= per_pass_tolerance and np.abs(first).max() <= first_tolerance \
        and column <= column_tolerance, (per_pass, first, column)


@pytest.mark.parametrize("served", [DIGITS, DIGITS_FP32], ids=lambda d: d.name)
def test_the_row_barrier_fails_the_measurement(served):
    """The model before the refit, held to the same tolerances, fails both dtypes' counts: in
    bf16 0.11 too many drafts per pass at k = 8, 0.17 too few at k = 32, and a row's first code
    accepted 0.07 where the digit model's later drafts are accepted 0.97 (a miss of 0.90); in
    float32 0.28 too few at k = 32 and a miss of 0.91."""
    per_pass_tolerance, _, column_tolerance = TOLERANCES[served]
    per_pass, _, column = misses(ROW_BARRIER, MEASURED[served])
    assert np.abs(per_pass).max() > per_pass_tolerance and column > column_tolerance, (per_pass, column)


def test_a_slow_start_is_re_timed():
    """Every pass size's first pass costs 3x (a compile): the second timing of each probe
    restarts its bucket, and re-timing follows the lengths not chosen.  After 2000 steps at one
    request on the GPU profile (where every length is cheap) each power of two has been timed
    in the last 2 * REMEASURE_EVERY steps, the drafted passes' curve is within 10% of the true
    cost there, and the controller drafts long windows."""
    profile = PROFILE["gpu"]
    controller = GoodputController(WINDOW, clock=Clock())
    trace = run(profile, 1, 2000, 0, controller=controller, first_shape_slow=3.0)
    caps = np.array([1, 2, 4, 8, 16, 32])
    assert all(controller.cost.last_timed(1, 1 + c, True) > controller.steps - 2 * REMEASURE_EVERY for c in caps)
    assert controller.cost.curve(1, True)(1 + caps) == pytest.approx(profile.cost(1 + caps), rel=0.1)
    assert np.median(trace.caps[1000:]) >= 16


# A tiny random-weight folder served on this CPU in float32: the tiny Emu3 server's controller
# timed a drafted pass of 132 positions at 31x a pass of 4 without drafts (0.34 against 0.011 s);
# a ratio of 26 at 33 positions gives t(132) / t(4) = 30.9 in the sim's linear cost.
TINY_RANDOM = Profile("tiny-emu3-fp32", 26.0)
RANDOM_SEEDS, RANDOM_FLOOR = 8, 0.6


@functools.lru_cache(maxsize=None)
def no_drafts_goodput(batch: int, seed: int) -> float:
    """No drafts' goodput over one image's steps (the controller's and the broken one's baseline)."""
    return run(TINY_RANDOM, batch, STEPS, seed, cap=0, paired=True, drafts=RANDOM).goodput()


def first_image_goodput(batch: int) -> float:
    """The controller's goodput over one image's steps from a fresh start, learning included,
    over no drafts' on the same streams (mean over RANDOM_SEEDS seeds), paired as Emu3 runs."""
    ratios = []
    for seed in range(RANDOM_SEEDS):
        trace = run(TINY_RANDOM, batch, STEPS, seed, controller=GoodputController(WINDOW, clock=Clock()),
                    paired=True, drafts=RANDOM)
        ratios.append(trace.goodput() / no_drafts_goodput(batch, seed))
    return float(np.mean(ratios))


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_rarely_accepted_drafts_are_given_up_within_the_first_image(batch, monkeypatch):
    """Drafts a random model rarely accepts, on a machine where a drafted pass is dear: no
    drafts is best, and the controller's start-up probes and first choices must not cost more
    than 1 - RANDOM_FLOOR of the first image's goodput (measured: 0.74-0.75 of no drafts' at 1,
    2 and 4 requests; what is left is the start-up probe of full windows, timed twice).  Every
    steady window bounds A(L) by L times its first draft's acceptance
    (`Acceptance.first_draft_bound`).
    Broken variant, the bound lifted: A(L) = L until a length has MEASURED_STARTS windows
    accepting a draft, which takes dozens of windows here, so below TRIAL_MIN_BATCH requests the
    controller keeps drafting long windows (0.13 and 0.24 of no drafts' goodput at 1 and 2).  At
    4 the trials, which start at one draft, catch it too (0.73; 0.45 when they started at the
    model's choice)."""
    assert first_image_goodput(batch) >= RANDOM_FLOOR
    if batch < TRIAL_MIN_BATCH:
        monkeypatch.setattr(Acceptance, "first_draft_bound", lambda self: 1.0)
        assert first_image_goodput(batch) < RANDOM_FLOOR


class WithoutShortcut(GoodputController):
    """The controller without `_holding_none`: every step's cap from `_cap`."""

    def _holding_none(self, batch):
        return False


class HoldingWithoutVisits(GoodputController):
    """Broken shortcut: holds no drafts without counting the step as a visit of its batch size."""

    def _holding_none(self, batch):
        held = super()._holding_none(batch)
        if held:
            self._visits[batch_bucket(batch)] -= 1
        return held


class HoldingAcrossBatchSizes(GoodputController):
    """Broken shortcut: the model's choice of none taken to stand at any batch size."""

    def _holding_none(self, batch):
        chosen_for = self._chosen_for
        self._chosen_for = batch_bucket(batch)
        try:
            return super()._holding_none(batch)
        finally:
            self._chosen_for = chosen_for


def controller_state(controller) -> dict:
    """Everything a controller decides from, but its clock and what it measured (the same
    inputs in both runs: the same costs and acceptance)."""
    state = {k: v for k, v in vars(controller).items() if k not in ("clock", "cost", "acceptance", "_holding_none")}
    state["_trial"] = controller._trial and vars(controller._trial)  # a Trial compares by identity
    return state


def lockstep(controllers, profile: Profile, schedule, seed: int = 0):
    """Feed every controller the same steps and compare their caps and state after each: a
    batch of `batch` requests (windows of up to WINDOW) for `steps` steps per (batch, steps,
    pinned, paired) in `schedule`, passes costed by `profile`, acceptance drawn once per step.
    Returns (the first step where they part or None, the shortcut's hits)."""
    rng = np.random.default_rng(seed)
    clock = controllers[0].clock
    step = 0
    for batch, steps, pinned, paired in schedule:
        ids = [f"r{batch}-{i}" for i in range(batch)]
        for _ in range(steps):
            wanted = [WINDOW] * (batch - pinned)
            kwargs = dict(copies=[2] * len(wanted), pinned_copies=[2] * pinned) if paired else {}
            caps = [c.windows(wanted, [WINDOW] * pinned, **kwargs) for c in controllers]
            states = [controller_state(c) for c in controllers]
            if any(cap != caps[0] for cap in caps) or any(st != states[0] for st in states):
                return step, None
            lengths = caps[0] + [WINDOW] * pinned
            positions = (2 if paired else 1) * int(np.sum(np.asarray(lengths) + 1))
            accepted = [int(rng.binomial(n, 0.15)) for n in lengths]
            clock.now += float(profile.cost(positions, any(lengths)))
            for c in controllers:
                c.observe_step(positions, ids, bool(any(lengths)), lengths, accepted)
            step += 1
    return None, None


def shortcuts_taken(controller) -> list[bool]:
    """From now on, whether each call of the controller's `_holding_none` took the shortcut."""
    taken, own = [], controller._holding_none
    controller._holding_none = lambda batch: taken.append(own(batch)) or taken[-1]
    return taken


# Requests at 10, a drop to 3 (below the trials' batch sizes) and back, pinned windows for a
# while, guidance companions, 32 requests: the shortcut's conditions met and unmet in turn.
SCHEDULE = [(10, 700, 0, False), (3, 150, 0, False), (10, 400, 0, False), (10, 60, 1, False),
            (10, 400, 0, True), (32, 600, 0, False), (10, 300, 0, False)]


@pytest.mark.parametrize("broken", [None, HoldingWithoutVisits, HoldingAcrossBatchSizes],
                         ids=["shortcut", "visit-not-counted", "any-batch-size"])
def test_the_shortcut_while_no_drafts_stand_changes_no_decision(broken):
    """`_holding_none` hands out, step for step, the caps `_cap` does and leaves the controller in
    the same state (every field but its clock and measurements, compared after every step): on
    every simulated machine profile, with the batch changing size, pinned windows and guidance
    companions in turn (`SCHEDULE`, 2610 steps a profile), and it is taken (in 11,273 of the
    15,660 steps; at least 8,000 asked).  Broken variants must part from `_cap` somewhere: the
    visit not counted (at once, in the visit counts), or the model's choice of none taken to
    stand at another batch size (back at 10 requests after 3 or after 32)."""
    parted, taken = [], 0
    for profile in PROFILES:
        shortcut = (broken or GoodputController)(WINDOW, clock=Clock())
        full = WithoutShortcut(WINDOW, clock=shortcut.clock)
        hits = shortcuts_taken(shortcut)
        step, _ = lockstep([shortcut, full], profile, SCHEDULE)
        taken += sum(hits)
        if step is not None:
            parted.append((profile.name, step))
    if broken is not None:
        assert parted, f"{broken.__name__} went unnoticed"
    else:
        assert not parted, parted
        assert taken >= 8_000, taken


class LookingEveryStep(GoodputController):
    """Broken re-timing look: while the choice's acceptance is unmeasured, due again at every step."""

    def _reprobe(self, batch, wanted, pinned, copies, pinned_copies):
        due = self._next_probe
        cap = super()._reprobe(batch, wanted, pinned, copies, pinned_copies)
        if cap is None and self.best and not self.acceptance.measured(min(self.best, int(wanted.max()))):
            self._next_probe = due
        return cap


@pytest.mark.parametrize("make", [GoodputController, LookingEveryStep], ids=["controller", "looking-every-step"])
def test_windowless_steps_take_the_shortcut_while_the_trials_hold_no_drafts(make):
    """Where the trials hold no drafts, the model's choice does not run and its acceptance is
    never measured, and re-timing waits for that measurement: the look for a probe must still
    come only every PROBE_GAP steps, so that the steps between take `_holding_none`'s shortcut
    (in a demo's ten images in flight, 647 of the 1469 windowless steps went through `_cap`
    instead, 62 against 21 us each).  Set up after 600 steps at 10 requests on the bf16 profile, where no
    drafts pay: the trials' limit of none standing, and the choice full windows, never run.
    Broken variant: the look due again at every step (the shortcut is never taken)."""
    controller = make(WINDOW, clock=Clock())
    run(PROFILE["cpu-bf16-avx2"], 10, 600, 0, controller=controller)
    controller._verdicts[batch_bucket(10)] = Verdict(limit=0, until=10**9, hold=256, held=0)
    controller.best = WINDOW
    assert not controller.acceptance.measured(WINDOW)
    taken = shortcuts_taken(controller)
    steps = 20 * PROBE_GAP
    trace = run(PROFILE["cpu-bf16-avx2"], 10, steps, 1, controller=controller)
    assert not any(trace.caps)
    if make is GoodputController:
        assert sum(taken) >= steps - steps // PROBE_GAP - 2, sum(taken)
    else:
        assert sum(taken) < steps // 2, sum(taken)
