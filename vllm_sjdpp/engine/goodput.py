"""Goodput-adaptive windows (draft_token_budget="auto"): each pass gets the drafts that maximise
the expected committed tokens per second, from what the engine measures while serving.

Who counts.  A request is a sequence whose tokens are delivered.  A guided request's companion
(guidance/pairing.py: a sequence that runs its request's drafts at its own positions and samples
nothing of its own) is none: the runtime leaves it out of the batch size, the committed tokens
and the acceptance, and it counts only where it costs, in the positions of a pass (`copies`: the
sequences that run a request's window, 2 for a paired request).

Pass cost: seconds per engine step as a function of the positions n in its pass (every
sequence's scheduled tokens, prompt chunks included), timed between the ends of consecutive
steps of the same requests and the same kind (the interval holds the tail of the step before
it; requests arriving or leaving cost the same with or without drafts; and with none in common
the engine may have waited for work).  A time 1.5x over its bucket's mean is a hiccup, dropped,
and one 1.5x under it restarts the bucket (what it held was a slow start).  Two curves per half
octave of the batch size: t_0(n) for steps without drafts (they skip the SJD++ step proper) and
t_d(n) for steps with drafts, each a forgetting average per quarter octave of n, made
non-decreasing (scipy's isotonic regression, weighted) and interpolated linearly; beyond the
largest n measured, the steeper of the last two points' slope and the chord's from the smallest
n (where both are flat, and from one point: in proportion to n).

Gain: A(L), the mean number of drafts accepted from a window of L drafts in a run of such
windows, from steady windows only.  A draft is accepted more often the more passes have refined
it; in a run of windows of L each draft enters the window at its end and is refined once per
pass on its way down, while after a change of length the window holds drafts refined less (a
longer window's new end) or more (a shorter one's).  So a window counts only when its request
has verified windows of exactly L for L / s steps before it, s the recent mean tokens committed
per request and step: by then its drafts have entered at the end of a window of L.  (Counted in
steps, the same for every request: counting a request's own tokens would first count those that
just accepted long runs, whose windows then hold the least refined drafts.)  Two measurements of
each length (forgetting per window):
- direct: the steady windows of L.  A window accepts nothing or a run of drafts (the digit
  model's first draft is accepted about one time in three, whatever the length), so a mean is
  noisy: it is taken as p * (drafts accepted per window accepting any), p the first draft's
  acceptance over all steady windows;
- truncated: min(X, L) over steady windows of longer lengths that accepted X.  The drafts of a
  window of L are refined at least as often in a longer window, so this is an upper bound on
  A(L) (in the simulated digit model 1.06x from windows a third longer, 1.31x from
  32 to 8), and every verified window gives it for every shorter length on the same stream.
A length counts as measured once steady windows of it ran in MEASURED_STEPS steps, MEASURED_STARTS
of them accepting a draft: at a large batch one step holds dozens of windows of one moment of
the images (at 32 simulated requests on a GPU's costs, windows of 32 counted from two steps read
A(32) = 1.38 against 2.2 steady; it then bounded every shorter length, and the cap fell to 4
for good where 13 was best).
The curve: the concave non-decreasing least-squares fit through (0, 0) to the direct means
(each weighted by its windows accepting any, over L^2: a run's variance grows about as L^2
while runs reach the window's end) at measured lengths; between them the most any
concave non-decreasing curve through the fit's vertices allows there (the lines through the
neighbouring segments, the next vertex, and L), and beyond the longest the most one through
(0, 0) and the longest allows (the chord's slope: the fit's last segment is as noisy as its
means, and a flat one would hold every longer window for good), so that a length that might be
best is tried, and a gap is never interpolated down (linearly, a concave curve is
under-estimated: A(8) read 0.74 between 1 and 32, where 1.22 was measured); then at most the
truncated mean where that is measured, and at most L * p+, p+ an upper bound on the first
draft's acceptance over all steady windows (a window accepts a run from its first draft, so
A(L) <= L * p; the one-sided FIRST_DRAFT_CONFIDENCE Clopper-Pearson bound, since a length
counts as measured only after MEASURED_STARTS of its windows accepted a draft, dozens of windows
where drafts are rarely accepted: with A(L) = L meanwhile, a tiny random Emu3 folder's server
kept drafting full windows at 31x a plain pass).  With nothing measured, A(L) = L.

For requests wanting windows w_i (and pinned requests whose windows are fixed, f_m), each run by
c_i sequences, the cap k maximises

    G(k) = [B + sum_i A(min(w_i, k)) + sum_m A(f_m)] / t(sum_i c_i (1 + min(w_i, k)) + sum_m c_m (1 + f_m)),

with B the requests and t = t_0 when the pass has no drafts, over the caps whose pass has at
most twice the positions of the longest drafted pass timed at the batch size (beyond them t is
extrapolated; a chosen cap is timed as it runs, so where the batch is steady the reach doubles
at each choice, and where it changes every step nothing extrapolated is run).  The choice is re-made every
DECIDE_EVERY steps and changes only for SWITCH_MARGIN more goodput than the current choice's,
whichever way (near break-even the estimates move by a few percent from one choice to the next,
and each change of length restarts the runs that measure A; no drafts gets no other margin than
any choice).  Weighing the caps takes about 0.1 ms, a fiftieth of a digit-model step at 10
requests on 2 CPU cores, so where no drafts stand from TRIAL_MIN_BATCH requests on, the choice is
re-made ever less often (the interval doubles up to MAX_DECIDE_EVERY), and not at all while the
trials' verdict holds drafting to none.  A batch size met for the first time is probed before
anything is chosen for it: no drafts, windows of one draft (until their acceptance is measured:
its slope bounds every longer window's), and longer windows, each until its pass is timed twice
(a shape's first pass is often slow): from TRIAL_MIN_BATCH requests on, windows of 2 (a slope:
trials climb from short windows, and a chosen cap is timed as it runs), below it full ones at the
start and the choice afterwards (no trials there: the model alone must see a long pass).
Afterwards the costs stay current: every PROBE_GAP steps (up to MAX_PROBE_GAP while the caps are
too dear to probe yet) one cap whose pass has not been timed for REMEASURE_EVERY steps (0, the
powers of two, the choice's neighbours; 0 takes ZERO_RUN steps, any other cap one) is set
instead of chosen, the longest untimed first, if its probe loses (its seconds beyond what its
tokens, one per request, are worth at the choice's goodput) at most its share of PROBE_BUDGET of
the time since it was last timed (or, untimed, probed: where requests come and go every step no
probe is timed), and in any case once MAX_REMEASURE_EVERY steps have passed if a cost COST_DOUBT
times lower would make it worth choosing; never while the choice's own acceptance is still being
measured (a probe restarts the runs).  No drafts, the floor, is re-timed every REMEASURE_EVERY
steps whatever its probe is predicted to lose.  These steps, and a trial verdict's hold below,
count the steps run at the batch size's half octave: one a server passes through at a batch's
start and end would else find its dear probes due again at every visit.  So a cheap length is
re-timed every REMEASURE_EVERY steps, a dear one as often as its share allows, and at least every
MAX_REMEASURE_EVERY steps where a cost misread by COST_DOUBT could hide a better choice; one
that loses even at half its cost is only re-timed within the budget (at 32 digit images on 2
CPU cores the passes of 2 to 32 drafts per request cost 4x to 65x a plain one: forced every
4096 steps, their probes took about 3% of the time, from those costs).  A slow start is not
remembered: a time 1.5x faster restarts a bucket.

Trials.  The model's estimates can be wrong where no estimate shows it: a pass's cost drifts
through an image (at 10 digit images on 2 CPU cores a pass without drafts cost 2.5 ms at the
images' first tokens and 3.6 ms at their last in one trace, 3.9 and 4.6 ms in float32 under the
AVX2 cap in another), so a t_0 timed at another moment misleads; a
length's acceptance is optimistic until measured; a window restarted after a change of length
accepts less.  (At 10 digit images on 2 CPU cores, float32, the model promised drafting 15-30% more
than no drafts, measured over whole rounds it gave 25% less; in trials, steady stretches of
drafting gave 10-16% more: most of the loss is the rounds' ends, where images finish apart.)  So
where the choice promises less than TRIAL_DOUBT more than no drafts, a `Trial`
runs both at the same batch size, the cap between two halves without drafts (a pass's cost
drifts as its images advance), and what each commits per second decides,
for TRIAL_EVERY steps (doubled each time a trial agrees with the last): drafting where it
committed more at TRIAL_CONFIDENCE (Welch's one-sided test on the steps' rates), a shorter cap
where it committed less, and no drafts where the trial cannot tell; a batch size's first trial is
at the shortest window the model expects to beat no drafts (one draft, unless a drafted step's own
cost makes one lose) and climbs while drafting wins (and past a cap that cannot tell, where
twice it may win, but not past two in a row); where the climb ends, the last cap that won is
tried again and stands only if it wins again (`Verdict`).

Why the output stays exact. Verification commits each token with the distribution p given
everything fixed before the step's noise is drawn: the committed prefix, the drafts, their
proposals, and how many there are. The window lengths here are a function of the batch and of
past steps (their timings and acceptances), all fixed before the noise of the pass that verifies
them, so each committed token is distributed as plain sampling's given its prefix, and the
whole stream as plain sampling's. What would break it is a length chosen after seeing the
verifying pass's own noise (stopping a window once a draft is rejected, say), which this module
cannot see. `tests/test_engine.py` runs the chi-square test against plain decoding with the
controller on.

Nor does it change a seed's tokens under Gumbel-coupled verification (the default), which commits
plain decoding's tokens for that seed whatever the windows.  Under the ratio test a seed's
generator draws follow the window lengths (the same law, other samples), so there a seeded
request is pinned to its own window (not adapted, not shared).

`tests/test_goodput_sim.py` drives this controller in a simulated engine (`tests/sim_engine.py`)
on five machines' pass costs.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression, nnls
from scipy.special import betaincinv, stdtrit

DECIDE_EVERY = 4  # steps between choices of the cap (a choice takes some 100 us), ...
MAX_DECIDE_EVERY = 32  # ... doubled while the choice stays the same, up to this
SWITCH_MARGIN = 0.05  # a new choice must promise this much more goodput than the current one
PROBE_GAP = 16  # steps between looks for a re-timing probe due, ...
MAX_PROBE_GAP = 128  # ... or up to this many, while the caps are too dear to probe yet
REMEASURE_EVERY = 256  # a cap's pass is re-timed when it has not been for this many steps ...
PROBE_BUDGET = 0.01  # ... if its probe loses at most its share of this much of the time, ...
MAX_REMEASURE_EVERY = 4096  # ... or when it has not been for this many, ...
COST_DOUBT = 2.0  # ... if a cost this many times lower would make it worth choosing
STARTUP_STEPS = 12  # most steps given each probe of a batch size met first
ZERO_RUN = 3  # steps of a probe without drafts: the third, after a windowless one, is timed
MAX_STEP_GAP_S = 5.0  # a longer gap is a stall (a compile, a pause), not a pass
# A pass over 1.5 times its bucket's mean time is a hiccup (a collection, the OS, a shape's first
# pass), not its cost: passes without drafts are timed rarely, and one such among five would
# set their curve.
STEP_OUTLIER = 1.5
OUTLIER_RUN = 3
MEASURED_STEPS = 8  # steps with steady windows of a length before its acceptance counts as measured ...
MEASURED_STARTS = 3.0  # ... and windows of it that accepted a draft
FIRST_DRAFT_CONFIDENCE = 0.9  # of the bound on the first draft's acceptance that caps A(L) / L
ADVANCE_FORGET = 0.95  # per drafted step, for the mean tokens a request commits
# Trials (`Trial`): where drafting promises less than TRIAL_DOUBT more than no drafts, the two
# are run side by side, TRIAL_STEPS steps of each, and what they commit per second decides.
TRIAL_DOUBT = 0.3
TRIAL_CONFIDENCE = 0.9  # of Welch's one-sided test a trial's verdict either way needs
TRIAL_MIN_BATCH = 4  # below, 12 steps' acceptance is too noisy to compare (a window accepts
# nothing two times in three, or a run of up to 16)
TRIAL_STEPS = 12
TRIAL_EVERY = 256  # steps (at its batch size) a verdict holds, doubled each time the next trial confirms it ...
MAX_TRIAL_EVERY = 4096  # ... up to this


class MeasuredCurve:
    """A non-decreasing y(x) from noisy measurements."""

    def __init__(self, bucket, forget: float = 0.98, outlier: float | None = None):
        self.bucket = bucket  # array of x -> array of integer bucket keys
        self.forget = forget  # per observation in a bucket: about 1 / (1 - forget) of them count
        # y above `outlier` times its bucket's mean is dropped, unless OUTLIER_RUN in a row are
        # (the level has changed); y below the mean by that factor restarts the bucket (what it
        # held was a hiccup, often the first pass of a new shape, or an old level).
        self.outlier = outlier
        self._outliers = 0
        self.sums: dict[int, list[float]] = {}  # bucket: [weight, weight * x, weight * y]
        self.stamps: dict[int, int] = {}  # bucket: the caller's step count when last measured
        self._keys: dict[float, int] = {}  # x: its bucket (positions repeat)
        self._points: tuple[np.ndarray, np.ndarray] | None = None

    def key(self, x: float) -> int:
        key = self._keys.get(x)
        if key is None:  # numpy costs more than the rest of a step's bookkeeping on one scalar
            key = self._keys[x] = int(self.bucket(np.array([x]))[0])
        return key

    def weight(self, x: float) -> float:
        """The weight of x's bucket (about the measurements it holds)."""
        return self.sums.get(self.key(x), (0.0,))[0]

    def observe(self, x: float, y: float, when: int = 0) -> None:
        key = self.key(x)
        s = self.sums.setdefault(key, [0.0, 0.0, 0.0])
        if self.outlier and s[0] > 0:
            mean = s[2] / s[0]
            if y > self.outlier * mean and self._outliers < OUTLIER_RUN:
                self._outliers += 1
                return
            if y * self.outlier < mean:
                s[0] = s[1] = s[2] = 0.0
        self._outliers = 0
        self._points = None
        self.stamps[key] = when
        f = self.forget
        s[0], s[1], s[2] = f * s[0] + 1.0, f * s[1] + x, f * s[2] + y

    def __bool__(self) -> bool:
        return bool(self.sums)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        if self._points is None:  # kept until the next observation: most steps observe one curve
            w, wx, wy = np.array(sorted(self.sums.values(), key=lambda s: s[1] / s[0])).T
            self._points = wx / w, isotonic_regression(wy / w, weights=w).x
        return self._points

    def __call__(self, x) -> np.ndarray:
        """Interpolated; beyond the largest x, the last slope or the chord's from the smallest x,
        whichever is steeper, and where both are flat (from one point too), in proportion to x:
        the pessimistic guesses for a cost.  Made non-decreasing, noisy means pool into flat
        segments, and a flat last one extended flat makes a longer pass look as cheap as the
        longest timed (docs/design/controller.md, "What it chooses")."""
        xs, ys = self.points()
        x = np.asarray(x, dtype=float)
        slope = 0.0
        if len(xs) > 1:
            slope = max((ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9), (ys[-1] - ys[0]) / max(xs[-1] - xs[0], 1e-9))
        if slope <= 0.0:
            slope = ys[-1] / max(xs[-1], 1e-9)
        return np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), np.interp(x, xs, ys))


def position_bucket(n: np.ndarray) -> np.ndarray:
    """Quarter octaves: 32 and 40 positions apart, 1000 and 1100 together."""
    return np.floor(4 * np.log2(np.maximum(n, 1))).astype(np.int64)


NO_PINNED = np.zeros(0, dtype=int)


@functools.lru_cache(maxsize=None)
def batch_bucket(batch: int) -> int:
    """Half octaves of the batch size."""
    return int(2 * math.log2(max(batch, 1)))


class PassCost:
    """Seconds per step of B requests with n positions, for steps that skip the SJD++ step
    proper (no drafts verified or made) and steps that run it: one curve over n per class and
    half octave of B (per-request work in the engine weighs as much as positions on a small
    model, positions alone on a large one)."""

    def __init__(self):
        self.curves: dict[tuple[int, bool], MeasuredCurve] = {}

    def observe(self, batch: int, n: int, full_step: bool, seconds: float, when: int = 0) -> None:
        key = (batch_bucket(batch), full_step)
        if key not in self.curves:
            self.curves[key] = MeasuredCurve(position_bucket, outlier=STEP_OUTLIER)
        self.curves[key].observe(n, seconds, when)

    def curve(self, batch: int, full_step: bool) -> MeasuredCurve | None:
        return self.curves.get((batch_bucket(batch), full_step))

    def predict(self, batch: int, n: np.ndarray, full_step: np.ndarray) -> np.ndarray:
        seconds = self.curve(batch, True)(n)
        if not full_step.all():  # with pinned windows every step drafts: t_0 is never needed
            seconds = np.where(full_step, seconds, self.curve(batch, False)(n))
        return seconds

    def last_timed(self, batch: int, n: float, full_step: bool) -> int | None:
        """The `when` a pass like this was last timed with (the controller: its steps at this batch
        size; None: never)."""
        curve = self.curve(batch, full_step)
        return None if curve is None else curve.stamps.get(curve.key(n))


class Acceptance:
    """A(L) from steady windows: direct and truncated means per L, and the curve made of them
    (the module's docstring); A(0) = 0."""

    def __init__(self, max_window: int, forget: float = 0.999):
        self.max_window = max_window
        self.forget = forget  # per window of a length (or longer, truncated): about 1000 count
        # Per length, directly and truncated: [windows, windows accepting a draft, drafts accepted].
        self.direct, self.cut = np.zeros((3, max_window + 1)), np.zeros((3, max_window + 1))
        self.first = np.zeros(2)  # [windows, windows accepting their first draft]
        # Per length, directly and truncated: the steps whose steady windows measured it.
        self.measuring_steps = np.zeros((2, max_window + 1))
        self._sizes = np.arange(max_window + 1, dtype=float)
        self._expected: np.ndarray | None = None

    def observe(self, lengths, accepted) -> None:
        """Steady windows of `lengths` drafts that accepted `accepted` (lengths 0 are skipped)."""
        if len(lengths) == 1:  # one request: `observe_window`, at a quarter of the cost
            if lengths[0] > 0:
                self.observe_window(int(lengths[0]), float(accepted[0]))
            return
        lengths, accepted = np.asarray(lengths, dtype=np.int64), np.asarray(accepted, dtype=float)
        accepted, lengths = accepted[lengths > 0], lengths[lengths > 0]
        if not len(lengths):
            return
        started = accepted > 0
        if lengths.min() == lengths.max():
            self._observe_windows_of(int(lengths[0]), accepted, started)
        else:
            self._observe_mixed(lengths, accepted, started)

    def _observe_mixed(self, lengths: np.ndarray, accepted: np.ndarray, started: np.ndarray) -> None:
        """`observe` of windows of any lengths (> 0), through masks over every length."""
        self.measuring_steps[0, np.unique(lengths)] += 1
        self.measuring_steps[1, 1:int(lengths.max())] += 1
        self.first = self.forget ** len(lengths) * self.first + (len(lengths), started.sum())
        size = np.arange(self.max_window + 1)[None, :]
        own = size == lengths[:, None]  # [window, L]
        shorter = (size < lengths[:, None]) & (size > 0)
        cut = np.minimum(accepted[:, None], size)
        for sums, mask, x in ((self.direct, own, accepted[:, None]), (self.cut, shorter, cut)):
            counts = mask.sum(0)
            sums *= self._forgetting(counts)
            sums += (counts, (mask & started[:, None]).sum(0), np.where(mask, x, 0.0).sum(0))
        self._expected = None

    def _forgetting(self, counts: np.ndarray) -> np.ndarray:
        """What the per-length sums are multiplied by after `counts` more windows of each length:
        NumPy's power over an array, in both paths (it differs from Python's, and from NumPy's
        scalar power, in the last bit for some counts where NumPy has its own SIMD power: 7, 23,
        26, 28, ... on the 2-core EPYC of benchmarks/README.md; `first` is forgotten by Python's
        power in both)."""
        return self.forget ** np.asarray(counts)

    def _observe_windows_of(self, length: int, accepted: np.ndarray, started: np.ndarray) -> None:
        """`observe` of windows that all have `length` drafts (> 0; at a steady batch every
        window reaches the cap): the same sums, made on the columns they change (drafts
        accepted are whole numbers, so every order of summation gives them exactly).  Ten windows
        of 4 drafts: 42 us a call through `_observe_mixed`'s masks over every length, 21 us here
        (a loop of calls on the 2-core EPYC of benchmarks/README.md, 2026-12-07)."""
        n = len(accepted)
        f = float(self._forgetting(np.array([n]))[0])
        num, starts = float(n), float(np.count_nonzero(started))
        self.measuring_steps[0, length] += 1
        self.measuring_steps[1, 1:length] += 1
        self.first = self.forget**n * self.first + (num, starts)
        self.direct[:, length] = self.direct[:, length] * f + (num, starts, accepted.sum())
        cut = self.cut[:, 1:length]
        cut *= f
        cut[0] += num
        cut[1] += starts
        cut[2] += np.minimum(accepted[:, None], self._sizes[1:length]).sum(0)
        self._expected = None

    def observe_window(self, length: int, accepted: float) -> None:
        """`observe` of one window (length > 0), the same sums to the bit: at one request a step
        has one window, and `observe`'s two dozen NumPy calls on arrays of one took 38 us of a
        3-6 ms step, this 9 us (a loop of calls on the 2-core EPYC of benchmarks/README.md,
        2026-12-07; the digit model's steps there in float32 held to AVX2)."""
        started = float(accepted > 0)
        f = self.forget
        self.measuring_steps[0, length] += 1
        self.measuring_steps[1, 1:length] += 1
        self.first = f * self.first + (1, started)
        self.direct[:, length] = self.direct[:, length] * f + (1.0, started, accepted)
        cut = self.cut[:, 1:length]
        cut *= f
        cut[0] += 1.0
        cut[1] += started
        cut[2] += np.minimum(accepted, self._sizes[1:length])
        self._expected = None

    def __bool__(self) -> bool:
        return bool(len(self.estimates()[0]))

    def first_draft(self) -> float:
        """How often a window's first draft is accepted, over all steady windows."""
        return self.first[1] / max(self.first[0], 1e-9)

    def first_draft_bound(self) -> float:
        """An upper bound on how often a window's first draft is accepted: the one-sided
        FIRST_DRAFT_CONFIDENCE Clopper-Pearson bound over all steady windows (1 before any).
        A window accepts a run from its first draft, so A(L) <= L * p_first(L), and p_first is
        taken as one rate for every length: a first draft always follows a freshly sampled
        token, however long its window (the digit model's: 0.303, 0.289, 0.303, 0.318 with full
        windows of 4, 8, 16, 32, benchmarks/results/digits_acceptance.json).  So every steady
        window bounds every length, long before a length is measured (MEASURED_STARTS windows
        accepting a draft take dozens of windows where drafts are rarely accepted)."""
        windows, starts = self.first
        if starts >= windows:
            return 1.0
        # The quantile of Beta(starts + 1, windows - starts), scipy.stats.beta.ppf's, at 1/25 of its cost.
        return float(betaincinv(starts + 1, windows - starts, FIRST_DRAFT_CONFIDENCE))

    def estimates(self, truncated: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lengths measured (windows in MEASURED_STEPS steps, MEASURED_STARTS of them
        accepting a draft), directly or `truncated`, their mean acceptance, and their windows
        accepting a draft."""
        sums = self.cut if truncated else self.direct
        lengths = np.flatnonzero(self._measured(truncated)[1:]) + 1
        started, total = sums[1:, lengths]
        return lengths, self.first_draft() * total / started, started

    def _measured(self, truncated: bool = False) -> np.ndarray:
        """Per length 0 .. max_window, directly or `truncated`: whether its acceptance counts as
        measured (windows in MEASURED_STEPS steps, MEASURED_STARTS of them accepting a draft)."""
        sums = self.cut if truncated else self.direct
        return (self.measuring_steps[int(truncated)] >= MEASURED_STEPS) & (sums[1] >= MEASURED_STARTS)

    def measured(self, length: int) -> bool:
        """Whether the acceptance of windows of `length` counts as measured directly."""
        return bool(self._measured()[length])

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """The lengths measured directly and their mean acceptance."""
        return self.estimates()[:2]

    def expected(self) -> np.ndarray:
        """A(L) for L = 0 .. max_window."""
        if self._expected is None:
            lengths, means, started = self.estimates()
            fit = concave_fit(lengths.astype(float), means, started / lengths**2) if len(lengths) else means
            out = optimistic_concave(lengths, fit, self.max_window)
            cut, bound, _ = self.estimates(truncated=True)
            out[cut] = np.minimum(out[cut], bound)
            self._expected = np.minimum(out, self.first_draft_bound() * np.arange(self.max_window + 1))
        return self._expected


def concave_fit(xs: np.ndarray, ys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The concave non-decreasing f with f(0) = 0 closest to the points (xs increasing, > 0) in
    weighted least squares, at xs: f is a sum of hinges e_j * min(x, xs[j]) with e_j >= 0."""
    basis = np.minimum(xs[:, None], xs[None, :])
    root = np.sqrt(weights)
    e, _ = nnls(basis * root[:, None], ys * root)
    return basis @ e


def optimistic_concave(lengths: np.ndarray, values: np.ndarray, max_window: int) -> np.ndarray:
    """A(0 .. max_window): `values` (concave and non-decreasing in `lengths`, through (0, 0)) at
    those lengths; between them the most a concave non-decreasing curve through their vertices
    allows; beyond the longest, the most one through (0, 0) and it allows (its chord's slope);
    never over L.  (Python floats: a NumPy call per length cost more than the rest of a choice.)"""
    xs = [0.0] + [float(x) for x in lengths]
    ys = [0.0] + [float(y) for y in values]
    out = [float(L) for L in range(max_window + 1)]
    for x, y in zip(lengths.tolist(), ys[1:]):
        out[x] = min(out[x], y)
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    # The vertices, where the slope falls: a point inside a straight segment is no constraint
    # (taken as one, it would make that segment a bound on the gap after it).
    keep = [0] + [i for i in range(1, len(xs) - 1) if slopes[i - 1] > slopes[i] + 1e-12] + [len(xs) - 1] * (len(xs) > 1)
    vx, vy = [xs[i] for i in keep], [ys[i] for i in keep]
    vs = [(vy[i + 1] - vy[i]) / (vx[i + 1] - vx[i]) for i in range(len(vx) - 1)]  # vertex i to i + 1
    measured = set(lengths.tolist())
    for L in range(1, max_window + 1):
        if L in measured:
            continue
        i = bisect.bisect_right(vx, L) - 1  # vx[i] < L
        bound = math.inf
        if 1 <= i == len(vx) - 1:
            # Beyond the longest length measured, the chord from (0, 0): the fit's last segment
            # is made of noisy means (after 8 windows of 1 and of 2 drafts, an A(2) read no
            # higher than A(1) fits flat, and a flat last segment held every longer window to
            # A(1) for good).
            bound = vy[i] * L / vx[i]
        elif i >= 1:  # the segment ending at vertex i, extended
            bound = vy[i] + vs[i - 1] * (L - vx[i])
        if i + 1 < len(vx):
            bound = min(bound, vy[i + 1])  # non-decreasing
            if i + 2 < len(vx):  # the segment after the next vertex, extended back
                bound = min(bound, vy[i + 1] - vs[i + 1] * (vx[i + 1] - L))
        out[L] = min(out[L], bound)
    return np.array(out)


class Trial:
    """No drafts, the chosen cap, and no drafts again: TRIAL_STEPS counted steps of the cap
    between two halves of as many without drafts, compared in what they commit per second (why:
    the module docstring, "Trials").  The cap sits between the halves so that a cost drifting
    through the trial weighs on both sides alike: a pass grows dearer as its images advance (at 10
    digit images on 2 CPU cores, float32 held to AVX2, 18% from an image's first steps to its
    last), and a cap run first was compared with later, dearer passes.  Counted are timed steps
    of `batch` requests: on a server under steady load a request ends and the next arrives every
    few dozen steps, so a trial that needed the same requests throughout was mostly cut short.
    It is cut where the batch leaves its half octave, or by step `deadline`."""

    def __init__(self, cap: int, batch: int, warmup: int, started: int, fallback: int | None = None,
                 recheck: int | None = None):
        self.cap, self.batch = cap, batch
        self.fallback = fallback  # climbing: the cap that last won, tried again if this one does not win
        self.recheck = recheck  # looking up from a limit held a while: tried again if this does not win
        self.deadline = started + warmup + 4 * TRIAL_STEPS
        self.phase = 0  # 0: no drafts (the first half), 1: the cap, 2: no drafts (the second half)
        self.warmup = warmup  # timed steps of the cap to drop (its windows not yet steady)
        self.skip = 0
        self.counted = 0
        # With drafts, without: tokens per second of each counted step.
        self.rates: list[list[float]] = [[], []]

    def cap_now(self) -> int:
        return self.cap if self.phase == 1 else 0

    def observe(self, drafted: bool, tokens: int, seconds: float) -> bool:
        """A timed step of the trial's requests; True once every phase is counted."""
        if drafted != (self.phase == 1):  # a step between the phases
            return False
        if self.skip:
            self.skip -= 1
            return False
        self.rates[0 if self.phase == 1 else 1].append(tokens / max(seconds, 1e-12))
        self.counted += 1
        if self.counted < (TRIAL_STEPS if self.phase == 1 else TRIAL_STEPS // 2):
            return False
        if self.phase == 2:
            return True
        self.phase, self.counted = self.phase + 1, 0
        self.skip = self.warmup if self.phase == 1 else 0
        return False

    def outcome(self) -> int:
        """+1 where drafting committed more per second than no drafts, -1 where less, each at
        TRIAL_CONFIDENCE by Welch's one-sided t-test on the steps' rates, 0 where the trial cannot
        tell.  (A drafted step commits a run of drafts or none, so its rate scatters: at 10 digit
        images on 2 CPU cores in float32, windows of 8 made 1.1-2.3 tokens/ms a step against
        1.5-1.6 without drafts.  Compared by their means, those twelve steps named drafting the
        winner by 4%, and the round of 30 images it then drafted in, windows of 4 for half its
        steps, came at 0.69x plain's throughput.)"""
        drafted, plain = (np.asarray(r) for r in self.rates)
        se = math.sqrt(drafted.var(ddof=1) / len(drafted) + plain.var(ddof=1) / len(plain))
        difference = drafted.mean() - plain.mean()
        if se == 0.0:
            return int(np.sign(difference))
        t = difference / se
        df = se**4 / ((drafted.var(ddof=1) / len(drafted)) ** 2 / (len(drafted) - 1)
                      + (plain.var(ddof=1) / len(plain)) ** 2 / (len(plain) - 1))
        critical = float(stdtrit(df, TRIAL_CONFIDENCE))
        return 1 if t > critical else -1 if t < -critical else 0


@dataclass
class Verdict:
    """What the trials of a batch size left: the cap drafting is held to (`limit`: the last cap
    that won where a longer one did not; 0: even one draft did not win, or a trial could not
    tell; None: the model's choice won outright), the step (counted at this batch size) until
    which it holds, and for how long (`hold`: TRIAL_EVERY, doubled each time trials end at the
    same limit, `held`).  A cap that loses is halved and tried again at once.  A batch size's
    first trial starts at the shortest window the model expects to beat no drafts (one draft,
    unless a drafted step's own cost makes one lose) and climbs: a cap that wins below the
    model's choice is doubled and tried at once (one that cannot tell too, not two in a row:
    `unsure`); where the climb ends, the last that won is tried again at once and is the limit
    only if it wins again (where the model is in doubt, its choice's own drafted phase, at a
    large batch several times a plain pass, is the dearest thing to try first).  When a limit
    expires, twice it is tried (that shortest window after 0); where that does not win, the limit
    itself is tried again at once, so a limit one lucky trial set does not stand for good (that
    retry not winning leaves no drafts), and the limit follows the machine both ways."""

    limit: int | None = None  # None: no limit (drafting won outright)
    until: int = -1
    hold: int = 0
    held: int | None = -1  # the limit the last hold was set for (-1: none yet)
    lost: bool = False  # a longer cap lost in the trials since the last hold (then its half is tried next)
    fresh: bool = False  # the limit is a cap that has just won, climbing (then twice it is tried next)
    unsure: int | None = None  # the limit is a cap whose trial could not tell, climbing: the cap that last won


class GoodputController:
    """Window lengths for the next pass from the measured pass cost and acceptance."""

    def __init__(self, max_window: int, clock=time.perf_counter):
        self.max_window = max_window
        self.cost = PassCost()
        self.acceptance = Acceptance(max_window)
        self.clock = clock
        self.steps = 0
        # Steps run per half octave of the batch size after its start-up probes: re-timing and
        # trials' verdicts are paced by these (a batch size a server passes through now and then,
        # at a batch's start and end, would else find every probe due and every verdict expired
        # at each visit).
        self._visits: dict[int, int] = {}
        self.best = max_window  # the cap chosen
        self._next_choice, self._chosen_for, self._decide_gap = 0, -1, DECIDE_EVERY
        self._last_end: float | None = None
        self._last_requests: frozenset = frozenset()
        self._last_full_step: bool | None = None
        self._runs: dict = {}  # request: [its window length, steps it verified windows of it]
        self._advance = 1.0  # tokens committed per request and drafted step, recently
        self._startup_steps: dict[int, list[int]] = {}  # batch bucket: steps given each probe
        self._probe: list[int] = []  # caps set for the next steps (the rest of a run of 0)
        self._next_probe = 0
        self._probed: dict[tuple[int, int], int] = {}  # (batch bucket, cap): visits when last probed for re-timing
        self._chosen = False  # whether a choice has been made (no re-timing before it)
        self._trial: Trial | None = None
        self._next_trial = 0  # no trial before this step (after one was cut short)
        self._verdicts: dict[int, Verdict] = {}  # batch bucket: what its trials left
        self._doubt: dict[int, bool] = {}  # batch bucket: the last choice's promise under TRIAL_DOUBT
        self._climb_from: dict[int, int] = {}  # batch bucket: the shortest cap the model expects to win

    def forget(self, req_id: str) -> None:
        """vLLM removed the request: a new request reusing its id is not the same run."""
        self._last_requests = self._last_requests - {req_id}
        self._runs.pop(req_id, None)

    def observe_step(self, positions: int, req_ids, full_step: bool, lengths, accepted) -> None:
        """Called at the end of each step: the positions in its pass (every sequence's), the
        requests in it (companions left out), whether it ran the SJD++ step proper, and per
        request the drafts verified and accepted."""
        now = self.clock()
        requests = frozenset(req_ids)
        # The time between two step ends also holds the earlier step's tail (its tokens' output
        # processing, its windows' proposal), so a step counts only after one of its own kind
        # (a windowless step after a drafted one would pay for the drafted one's tokens) and of
        # the same requests: arrivals and departures cost what they cost with or without drafts
        # (they made the passes without drafts, often timed at a batch's start and end, look
        # dearer), and with none in common the engine may have waited for work.
        steady = full_step == self._last_full_step and requests == self._last_requests
        timed = steady and self._last_end is not None and now - self._last_end < MAX_STEP_GAP_S
        bucket = batch_bucket(len(requests))
        if timed:
            self.cost.observe(len(requests), positions, full_step, now - self._last_end, self._visits.get(bucket, 0))
        trial = self._trial
        if trial is not None and (bucket != batch_bucket(trial.batch) or self.steps > trial.deadline):
            self._trial = None  # no comparison
            self._next_trial = self.steps + TRIAL_STEPS  # a batch that keeps changing is not tried each step
        elif trial is not None and timed and len(requests) == trial.batch and trial.observe(
                any(lengths), len(requests) + int(sum(accepted)), now - self._last_end):
            self._trial = None
            self._verdict(bucket, trial)
        self._last_end, self._last_requests, self._last_full_step = now, requests, full_step
        if not any(lengths):  # nothing verified (most steps where drafting does not pay)
            self._runs = {}
            return
        advance = self._advance
        counted_lengths, counted, runs = [], [], {}
        for req_id, length, a in zip(req_ids, lengths, accepted):
            run = self._runs.get(req_id)
            if run is None or run[0] != length:
                run = [length, 0]
            elif length and run[1] * advance >= length:  # steady: the module's docstring
                counted_lengths.append(length)
                counted.append(a)
            run[1] += 1
            runs[req_id] = run
        self._runs = runs
        self.acceptance.observe(counted_lengths, counted)
        tokens = 1.0 + sum(accepted) / len(accepted)
        self._advance = ADVANCE_FORGET * advance + (1.0 - ADVANCE_FORGET) * tokens

    def windows(self, wanted: list[int], pinned: list[int], copies=None, pinned_copies=None) -> list[int]:
        """Lengths for the adaptable requests' next windows (each at most what it wants), given
        the pinned requests' fixed lengths; `copies` (`pinned_copies`): the sequences that run
        each one's window (default 1; 2 for a request with a guidance companion)."""
        self.steps += 1
        if not any(wanted):
            return list(wanted)
        if len(pinned) == 0 and self._holding_none(len(wanted)):
            cap = 0
        else:
            cap = self._cap(np.asarray(wanted), np.asarray(pinned, dtype=int), copies, pinned_copies)
        return [min(n, cap) for n in wanted]

    def _holding_none(self, batch: int) -> bool:
        """True only where `_cap` would give no drafts at this step and change nothing but the
        visit count, which this then counts: no start-up probe, re-timing probe or trial is due,
        and no drafts stand (the trials' limit of none, or the model's choice of none until its
        next weighing); without pinned windows (guidance companions change nothing here: none of
        this reads `copies`).  False leaves everything as it was, and `_cap` decides.  Where
        drafting does not pay most steps are such, and `_cap`'s look at all that may be due took
        46-68 us a step (10 digit images in float32, 2 CPU cores held to AVX2: some 1.2% of the
        time)."""
        bucket = batch_bucket(batch)
        if self._trial is not None or self._probe or not self._chosen or self.steps >= self._next_probe:
            return False
        given = self._startup_steps.get(bucket)
        if given is None or min(given) < STARTUP_STEPS or not self._measured(batch, NO_PINNED):
            return False
        visits = self._visits.get(bucket, 0) + 1
        verdict = self._verdicts.get(bucket)
        limited = verdict is not None and verdict.limit == 0 and self._holds(verdict, visits)
        chosen = not self.best and self.steps < self._next_choice and bucket == self._chosen_for
        if not (limited or chosen):
            return False
        self._visits[bucket] = visits
        return True

    def _cap(self, w: np.ndarray, p: np.ndarray, copies, pinned_copies) -> int:
        """The cap for the next pass: a start-up or re-timing probe's, a trial's, or the choice."""
        c = np.ones(len(w)) if copies is None else np.asarray(copies, dtype=float)
        pc = np.ones(len(p)) if pinned_copies is None else np.asarray(pinned_copies, dtype=float)
        batch = len(w) + len(p)
        bucket = batch_bucket(batch)
        cap = self._startup(batch, w, p, c, pc)
        if cap is None:
            self._visits[bucket] = self._visits.get(bucket, 0) + 1
        if cap is None and not self._measured(batch, p):
            # The start-up probes gave up before timing a pass (requests kept arriving or
            # leaving): nothing to choose from yet.  Below TRIAL_MIN_BATCH the choice stands;
            # from there on, where drafting is in doubt until measured, no drafts (a batch of 10
            # digit images filling one request a step passed through 4 to 7 requests with
            # windows of 32, the choice at another batch size, in every round).  Every
            # REMEASURE_EVERY visits its probes start again: the batch may be steady by now.
            if self._visits[bucket] % REMEASURE_EVERY == 0:
                self._startup_steps.pop(bucket, None)
            return self.best if batch < TRIAL_MIN_BATCH else 0
        if cap is None and self._trial is None:  # a probe inside a trial would skew it
            cap = self._reprobe(batch, w, p, c, pc)
        if cap is not None:
            return cap
        self._chosen = True
        verdict = self._verdicts.get(bucket)
        held_at_none = verdict is not None and verdict.limit == 0 and self._holds(verdict, self._visits[bucket])
        if self._trial is None and held_at_none and not p.any():
            # The trials' limit of no drafts stands: the choice would be capped to none, so it is
            # not made (a weighing takes about 0.1 ms, some 2% of a digit-model step at 10
            # requests on 2 CPU cores).  It is made afresh when the limit expires.
            return 0
        if self.steps >= self._next_choice or bucket != self._chosen_for:
            goodput, _, positions = self.evaluate(w, p, c, pc)
            # No further than twice the positions of a drafted pass timed at this batch size:
            # beyond them the cost is extrapolated, and a chosen cap is timed as it runs, so
            # at a steady batch the reach doubles each time (a few steps); where the batch
            # changes every step (filling a request a step) nothing is timed, and an
            # extrapolation from passes of 14 and 21 positions had chosen 32 drafts at 6 requests.
            reach = 2 * self.cost.curve(batch, True).points()[0].max()
            goodput = np.where((positions <= reach) | (np.arange(len(goodput)) == 0), goodput, -np.inf)
            best = int(np.argmax(goodput))
            current = min(self.best, len(goodput) - 1)
            same = bucket == self._chosen_for and (
                best == current or goodput[best] <= (1 + SWITCH_MARGIN) * goodput[current])
            if not same:
                self.best = best
            settled_at_none = same and not self.best and batch >= TRIAL_MIN_BATCH
            self._decide_gap = min(2 * self._decide_gap, MAX_DECIDE_EVERY) if settled_at_none else DECIDE_EVERY
            self._next_choice, self._chosen_for = self.steps + self._decide_gap, bucket
            self._doubt[bucket] = goodput[min(self.best, len(goodput) - 1)] < (1 + TRIAL_DOUBT) * goodput[0]
            # Where climbing starts: the shortest window the model expects to beat no drafts.  A
            # drafted step has a cost of its own (the SJD++ step), so one draft may lose where
            # eight win: at 10 digit images in bf16 on 2 CPU cores, a pass of 1 draft cost 1.35x
            # one without and committed 1.3x the tokens, one of 8 drafts 1.9x and 2.2x, and
            # trials climbing from one draft never drafted.
            beating = np.flatnonzero(goodput[1:] > goodput[0])
            self._climb_from[bucket] = int(beating[0]) + 1 if len(beating) else 1
        return self._tried(bucket, batch, p)

    def _tried(self, bucket: int, batch: int, pinned: np.ndarray) -> int:
        """The cap after trials (`Trial`): a trial's, else the model's choice within the limit the
        trials left (`Verdict`) until it expires, then the next trial where the model is in doubt
        or a limit stands: the first at the shortest window the model expects to beat no drafts
        (one draft, unless a drafted step's own cost makes one lose), then climbing or halving
        (`Verdict`), and after a limit expired at twice the limit (the model's choice at most),
        that shortest window from a limit of 0."""
        if self._trial is not None:
            return self._trial.cap_now()
        if not self.best or pinned.any() or batch < TRIAL_MIN_BATCH:
            return self.best
        verdict = self._verdicts.get(bucket)
        limited = verdict is not None and verdict.limit is not None
        recheck = None
        start = min(self.best, self._climb_from.get(bucket, 1))
        # After a trial was cut short, the last verdict's limit stands until the next one (before
        # the first verdict, where the model is in doubt, what the first trial tries).
        if self._holds(verdict, self._visits[bucket]):
            if limited:  # past a cap that could not tell: the cap that last won
                return min(self.best, verdict.limit if verdict.unsure is None else verdict.unsure)
            return start if verdict is None and self._doubt.get(bucket) else self.best
        if not limited and not self._doubt.get(bucket):
            return self.best
        if verdict is None:  # the first trial: the shortest window expected to win, climbing
            cap, fallback = start, 0
        elif not limited:  # the model's choice won outright before
            cap, fallback = self.best, None
        elif not verdict.lost:  # a cap won while climbing, or a limit expired: look up
            cap = min(self.best, max(2 * verdict.limit, start))
            if verdict.unsure is not None:  # past a cap that could not tell
                fallback = verdict.unsure
            elif verdict.fresh or not verdict.limit:
                fallback = verdict.limit
            else:  # a limit held a while is tried again if twice it does not win
                fallback, recheck = None, verdict.limit
        else:  # halved after a loss
            cap, fallback = min(self.best, verdict.limit), None
        # The cap's windows start after the first half without drafts: until they have run as
        # long as the steady rule asks (the module docstring), they hold drafts refined less than
        # a steady window's, and are not counted.
        warmup = int(math.ceil(cap / max(self._advance, 1.0))) + 1
        self._trial = Trial(cap, batch, warmup, self.steps, fallback, recheck)
        return self._trial.cap_now()  # its first half: no drafts

    def _holds(self, verdict: Verdict | None, visits: int) -> bool:
        """Whether the last verdict stands at a batch size visited `visits` times (this step's
        visit counted): its hold has not expired, or a trial was cut short a moment ago."""
        return self.steps < self._next_trial or (verdict is not None and visits < verdict.until)

    def _verdict(self, bucket: int, trial: Trial) -> None:
        """What a finished trial leaves (`Verdict`)."""
        verdict = self._verdicts.get(bucket) or Verdict()
        outcome = trial.outcome()
        won = outcome > 0
        climbing = trial.fallback is not None
        stepped_past = verdict.unsure is not None  # this trial is the step past a cap that could not tell
        verdict.fresh, verdict.unsure = False, None
        if won and (climbing or trial.recheck is not None) and trial.cap < self.best:  # twice as many at once
            verdict.limit, verdict.until, verdict.lost, verdict.fresh = trial.cap, self._visits[bucket], False, True
        elif outcome == 0 and climbing and not stepped_past and trial.cap < self.best:
            # Climbing, a cap that cannot tell is stepped past once: below the model's choice the
            # gain grows with the cap, and where drafting pays a trial of twice the cap tells it
            # from no drafts (at 8 digit images in bf16 on 2 CPU cores, two drafts could not be
            # told from none in 12 steps each, no drafts held for 256 steps at 0.90x plain where
            # full windows gave 1.08x).  If twice the cap does not win either, the cap that last
            # won is tried again (below).
            verdict.limit, verdict.until, verdict.lost = trial.cap, self._visits[bucket], False
            verdict.unsure = trial.fallback
        elif not won and trial.recheck is not None:  # the limit itself again, at once
            verdict.limit, verdict.until, verdict.lost = trial.recheck, self._visits[bucket], True
        elif outcome < 0 and trial.cap > 1 and not climbing:  # halve it and try again at once
            verdict.limit, verdict.until, verdict.lost = trial.cap // 2, self._visits[bucket], True
        elif not won and climbing and trial.fallback:
            # The climb ends: the cap that last won is tried again at once, and holds only if it
            # wins again.  One trial's win can be the machine's: at 10 digit images on 2 CPU cores
            # (float32, AVX2) a trial's steps without drafts once ran at 0.75x their usual rate,
            # windows of 8 won by 38%, and were held for rounds at 0.88x no drafts' throughput.
            verdict.limit, verdict.until, verdict.lost = trial.fallback, self._visits[bucket], True
        else:
            # Where the trial cannot tell, no drafts: it gains nothing the trial could see, and it
            # costs what the trial does not see (windows restarted, images finishing apart); a
            # shorter cap, nearer break-even still, would not tell either.  A cap that won after a
            # longer one lost is the limit; one that won at the model's choice leaves the model
            # free (the trial says nothing against longer windows).
            if won:
                limit = trial.cap if verdict.lost else None
            else:
                limit = 0
            verdict.hold = min(2 * verdict.hold, MAX_TRIAL_EVERY) if verdict.held == limit and verdict.hold else TRIAL_EVERY
            verdict.limit = verdict.held = limit
            verdict.until, verdict.lost = self._visits[bucket] + verdict.hold, False
        self._verdicts[bucket] = verdict

    def _measured(self, batch: int, pinned: np.ndarray) -> bool:
        """Whether the curves a choice needs at this batch size hold a timed pass: with drafts,
        and without (unless pinned windows make every pass draft)."""
        return self.cost.curve(batch, True) is not None and (pinned.any() or self.cost.curve(batch, False) is not None)

    def _startup(self, batch: int, wanted: np.ndarray, pinned: np.ndarray, copies: np.ndarray,
                 pinned_copies: np.ndarray) -> int | None:
        """The cap of a probe of a batch size met for the first time, if one is due (the module's
        docstring); each probe for at most STARTUP_STEPS steps."""
        given = self._startup_steps.setdefault(batch_bucket(batch), [0, 0, 0])
        # The second drafted length, for a slope that longer windows are extrapolated from.  Where
        # trials climb, 2: a long pass of a large batch, which may take many steps to be timed twice
        # while requests come and go, costs several plain ones (at 10 digit images on 2 CPU cores
        # in float32, 5.4x at full windows; probes at batch 1's choice cost the first round of 30
        # images 12% of its time).  Below, full windows at first, afterwards the choice.
        longer = min(int(wanted.max()), max(2, self.best) if batch < TRIAL_MIN_BATCH else 2)
        for stage, cap in enumerate((0, 1, longer)):
            if given[stage] >= STARTUP_STEPS or (cap == 0 and pinned.any()):
                continue
            curve = self.cost.curve(batch, bool(cap or pinned.any()))
            positions = (np.minimum(wanted, cap) + 1) @ copies + (pinned + 1) @ pinned_copies
            due = curve is None or curve.weight(positions) < 1.5  # timed twice
            if due or (cap == 1 and not self.acceptance.measured(1)):
                given[stage] += 1
                return cap
            given[stage] = STARTUP_STEPS
        return None

    def _reprobe(self, batch: int, wanted: np.ndarray, pinned: np.ndarray, copies: np.ndarray,
                 pinned_copies: np.ndarray) -> int | None:
        """The cap of a re-timing probe this step, if one is due (the module's docstring)."""
        if self._probe:
            return self._probe.pop()
        if self.steps < self._next_probe or not self._chosen:
            return None
        self._next_probe = self.steps + PROBE_GAP
        if self.best and not self.acceptance.measured(min(self.best, int(wanted.max()))):
            # A probe would restart the runs measuring the choice.  Looked at again in PROBE_GAP
            # steps, not at every step: where the trials hold no drafts, the choice does not run
            # and is never measured, and a look due at every step kept each windowless step off
            # `_holding_none` (62 against 21 us a step at 10 digit images in a server on 2 CPU
            # cores, float32 held to AVX2: 647 of the 1469 windowless steps of one demo's ten in
            # flight).
            return None
        positions = self._positions(wanted, pinned, copies, pinned_copies)[1]
        top = len(positions) - 1
        best = min(self.best, top)
        caps = [c for c in {0, best - 1, best + 1} | {1 << i for i in range(top.bit_length())}
                if 0 <= c <= top and c != best and not (c == 0 and pinned.any())]
        bucket = batch_bucket(batch)
        visits = self._visits[bucket]
        ages = {}
        for cap in caps:
            timed = self.cost.last_timed(batch, positions[cap], bool(cap or pinned.any()))
            # In steps at this batch size, since the cap was timed or, untimed, last probed (where
            # requests come and go every step no probe is timed, and one due again at every look
            # would run a dear pass every PROBE_GAP steps).
            ages[cap] = visits - max(0 if timed is None else timed, self._probed.get((bucket, cap), 0))
        if max(ages.values(), default=0) < REMEASURE_EVERY:
            return None  # nothing is old enough to be due: the model is not consulted (a tenth of a ms)
        goodput, seconds, _ = self.evaluate(wanted, pinned, copies, pinned_copies)
        # A step's time at this batch size under the choice, from the model (not the wall time
        # since the first choice: that counts a server's idle minutes as steps' time, and after
        # an idle hour every dear probe would look affordable).
        step_seconds = seconds[best]
        due, waits = [], []
        for cap, age in ages.items():
            # A probe's windows are fresh, and a fresh window's drafts are rarely accepted (a
            # first draft one time in three, the rest far less): its pass commits about one token
            # per request, not what a run of such windows does (with the latter, at 10 digit images
            # in float32 a pass of 32 drafts, 4x a plain one, looked nearly free, and every cap
            # was re-timed every 550 steps, 2% of the time).
            loss = (ZERO_RUN if cap == 0 else 1) * max(0.0, seconds[cap] - batch / goodput[best])
            # Each cap's probes may lose PROBE_BUDGET / (the caps) of the time since it was timed.
            affordable_at = loss / max(PROBE_BUDGET / len(caps) * step_seconds, 1e-12)
            # No drafts is the floor: it is re-timed every REMEASURE_EVERY steps whatever it is
            # predicted to lose (a t_0 read high, say from a batch's first passes, would else
            # make its probes look dear, and never be read again).  A cap that a cost misread by
            # COST_DOUBT could make the choice is re-timed by MAX_REMEASURE_EVERY whatever its
            # probe loses; one that would lose even so waits for its budget (at 32 digit images
            # on 2 CPU cores, bf16, the forced probe of 32 drafts took 389 ms, 65 plain steps,
            # every 4096 steps: with the other powers of two, about 3% of the time).
            due_at = max(REMEASURE_EVERY, 0 if cap == 0 else affordable_at)
            if COST_DOUBT * goodput[cap] >= goodput[best]:
                due_at = min(due_at, MAX_REMEASURE_EVERY)
            if age >= due_at:
                due.append((age, cap))
            waits.append(due_at - age)
        if not due:
            # The old caps are dear: they become affordable as they age, so the next look is
            # when the first is expected to be (each look consults the model; a probe found a
            # few dozen steps late costs nothing, as the budget only grows meanwhile), at most
            # MAX_PROBE_GAP steps away, as the prices change.
            self._next_probe = self.steps + int(min(max(min(waits), PROBE_GAP), MAX_PROBE_GAP))
            return None
        cap = max(due)[1]
        self._probed[bucket, cap] = visits
        if cap == 0:
            self._probe = [0] * (ZERO_RUN - 1)
        return cap

    def evaluate(self, wanted: np.ndarray, pinned: np.ndarray, copies: np.ndarray | None = None,
                 pinned_copies: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expected committed tokens per second, seconds per pass and positions per pass, for
        each cap 0 .. max(wanted)."""
        gain = self.acceptance.expected()
        lengths, positions = self._positions(wanted, pinned, copies, pinned_copies)
        requests = len(wanted) + len(pinned)
        drafts = lengths.sum(1) + pinned.sum()
        tokens = requests + gain[lengths].sum(1) + gain[pinned].sum()
        seconds = self.cost.predict(requests, positions, drafts > 0)
        return tokens / np.maximum(seconds, 1e-9), seconds, positions

    @staticmethod
    def _positions(wanted: np.ndarray, pinned: np.ndarray, copies: np.ndarray | None,
                   pinned_copies: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Each request's window under each cap 0 .. max(wanted), [cap, request], and the
        positions of each cap's pass."""
        copies = np.ones(len(wanted)) if copies is None else copies
        pinned_copies = np.ones(len(pinned)) if pinned_copies is None else pinned_copies
        lengths = np.minimum(wanted[None, :], np.arange(wanted.max() + 1)[:, None])
        return lengths, (lengths + 1) @ copies + (pinned + 1) @ pinned_copies

    def summary(self) -> str:
        def curve(name, c):
            if c is None:
                return f"{name}: not measured yet"
            xs, ys = c.points()
            picks = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 5)).round().astype(int))
            return f"{name}: " + ", ".join(f"{xs[i]:.0f}: {ys[i]:.2g}" for i in picks)

        batch = len(self._last_requests)
        lengths, means = self.acceptance.means()
        picks = np.unique(np.linspace(0, len(lengths) - 1, min(len(lengths), 5)).round().astype(int))
        accepted = ", ".join(f"{lengths[i]}: {means[i]:.2g}" for i in picks) if len(lengths) else "not measured yet"
        return "; ".join([
            curve(f"pass s by positions at {batch} requests, no drafts", self.cost.curve(batch, False)),
            curve("with drafts", self.cost.curve(batch, True)),
            f"drafts accepted by window length: {accepted}; cap {self.best}",
        ])
