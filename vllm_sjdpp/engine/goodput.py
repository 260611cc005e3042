"""Goodput-adaptive windows (draft_token_budget="auto"): each pass gets the drafts that maximise
the expected committed tokens per second, from what the engine measures while serving.

- Pass cost: seconds per engine step as a function of the positions n in its pass (scheduled
  tokens, prompt chunks included), timed between the ends of consecutive steps of the same
  requests and the same kind (the interval holds the tail of the step before it; requests
  arriving or leaving cost the same with or without drafts; and with none in common the
  engine may have waited for work); a time 1.5x over its bucket's mean is a hiccup, dropped.
  Two curves per batch size: t_0(n) for steps without drafts (they skip the SJD++ step proper)
  and t_d(n) for steps with drafts.
- Gain: A(L), the mean number of drafts accepted from a window of L drafts, measured per L (so
  it includes what the length does to the next window's drafts: a short window refines fewer
  positions ahead of it), from windows that follow a window of L - 1 to L + 1 drafts: what a
  run of such windows accepts, which is what choosing L gets (a probe after short windows holds
  drafts no pass has refined, a short window after long ones drafts refined many times).

Each curve is a set of forgetting averages per bucket of its argument, made non-decreasing
(scipy's isotonic regression, weighted) and interpolated linearly; a cost beyond the largest
measured n continues with the slope of the last two points (in proportion to n from a single
point: the pessimistic guess), a gain beyond the longest measured window grows by one accepted
draft per draft (the optimistic guess, so that longer windows get tried).  A batch
size met for the first time is probed before anything is chosen for it: a step without drafts,
one with windows of one draft, one with full windows (once per batch size, however dear).  For
requests wanting windows w_i (and pinned requests whose windows are fixed, f_m), the cap c
maximises

    G(c) = [B + sum_i A(min(w_i, c)) + sum_m A(f_m)] / t(B + sum_i min(w_i, c) + sum_m f_m),

with t = t_0 when the pass has no drafts, provided it beats G(0) by DRAFT_MARGIN (else c = 0).
Every EXPLORE_EVERY steps a short run of steps has its cap set instead of chosen: at no drafts
(every other run), next to the last choice, or (every 8th run) going round 0, k, k/2, ..., 1, so
that every part of the curves stays measured; a cap predicted to do far worse than the choice (a
pass over twice as dear, or under 80% of its goodput) is tried only in one cycle of runs in
four, so as not to pay often for it.

Why the output stays exact. Verification commits each token with the distribution p given
everything fixed before the step's noise is drawn: the committed prefix, the drafts, their
proposals, and how many there are. The window lengths here are a function of the batch and of
past steps (their timings and acceptances, and the calibration made of both), all fixed before
the noise of the pass that verifies them, so each committed token is distributed as plain
sampling's given its prefix, and the whole stream as plain sampling's. What would break it is a
length chosen after seeing the verifying pass's own noise (stopping a window once a draft is
rejected, say), which this module cannot see. `tests/test_engine.py` runs the chi-square test
against plain decoding with the controller on.

Nor does it change a seed's tokens under Gumbel-coupled verification (the default), which commits
plain decoding's tokens for that seed whatever the windows.  Under the ratio test a seed's
generator draws follow the window lengths (the same law, other samples), so there a seeded
request is pinned to its own window (not adapted, not shared).
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.optimize import isotonic_regression

EXPLORE_EVERY = 64  # steps between exploring runs
EXPLORE_RUN = 3  # steps per exploring run: the second pass without drafts is the one timed
DECIDE_EVERY = 4  # steps between choices of the cap (a choice takes some 100 us)
MAX_STEP_GAP_S = 5.0  # a longer gap is a stall (a compile, a pause), not a pass
# A pass over 1.5 times its kind's mean time is a hiccup (a collection, the OS, a shape's first
# pass), not its cost: passes without drafts are timed rarely, and one such among five would
# set their curve.
STEP_OUTLIER = 1.5
OUTLIER_RUN = 3
# Drafting is chosen only if it promises this much more goodput than no drafts.  Near break-even
# the estimates move by a few percent from one choice to the next (t_0 at 8 digit images read
# 4.1 to 4.9 ms over a minute) and would flip the choice at random; no drafts is the floor the
# server must not fall below, so the doubt goes its way.
DRAFT_MARGIN = 1.05


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
        self._keys: dict[float, int] = {}  # x: its bucket (positions repeat)
        self._points: tuple[np.ndarray, np.ndarray] | None = None

    def observe(self, x: float, y: float) -> None:
        key = self._keys.get(x)
        if key is None:  # numpy costs more than the rest of a step's bookkeeping on one scalar
            key = self._keys[x] = int(self.bucket(np.array([x]))[0])
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
        f = self.forget
        s[0], s[1], s[2] = f * s[0] + 1.0, f * s[1] + x, f * s[2] + y

    def observe_many(self, x: np.ndarray, y: np.ndarray) -> None:
        """Several measurements at once (forgetting applied per bucket, once per measurement)."""
        self._points = None
        keys, inverse, counts = np.unique(self.bucket(x), return_inverse=True, return_counts=True)
        sum_x, sum_y = np.bincount(inverse, x), np.bincount(inverse, y)
        for key, count, sx, sy in zip(keys.tolist(), counts.tolist(), sum_x.tolist(), sum_y.tolist()):
            s = self.sums.setdefault(key, [0.0, 0.0, 0.0])
            f = self.forget**count
            s[0], s[1], s[2] = f * s[0] + count, f * s[1] + sx, f * s[2] + sy

    def __bool__(self) -> bool:
        return bool(self.sums)

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        if self._points is None:  # kept until the next observation: most steps observe one curve
            w, wx, wy = np.array(sorted(self.sums.values(), key=lambda s: s[1] / s[0])).T
            self._points = wx / w, isotonic_regression(wy / w, weights=w).x
        return self._points

    def __call__(self, x) -> np.ndarray:
        """Interpolated; beyond the largest x, the last slope (from one point: in proportion to
        x, the pessimistic guess for a cost)."""
        xs, ys = self.points()
        x = np.asarray(x, dtype=float)
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9) if len(xs) > 1 else ys[0] / max(xs[0], 1e-9)
        return np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), np.interp(x, xs, ys))


def position_bucket(n: np.ndarray) -> np.ndarray:
    """Quarter octaves: 32 and 40 positions apart, 1000 and 1100 together."""
    return np.floor(4 * np.log2(np.maximum(n, 1))).astype(np.int64)


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

    def observe(self, batch: int, n: int, full_step: bool, seconds: float) -> None:
        key = (batch_bucket(batch), full_step)
        if key not in self.curves:
            self.curves[key] = MeasuredCurve(position_bucket, outlier=STEP_OUTLIER)
        self.curves[key].observe(n, seconds)

    def curve(self, batch: int, full_step: bool) -> MeasuredCurve | None:
        return self.curves.get((batch_bucket(batch), full_step))

    def predict(self, batch: int, n: np.ndarray, full_step: np.ndarray) -> np.ndarray:
        seconds = self.curve(batch, True)(n)
        if not full_step.all():  # with pinned windows every step drafts: t_0 is never needed
            seconds = np.where(full_step, seconds, self.curve(batch, False)(n))
        return seconds


class Acceptance:
    """A(L): drafts accepted from a window of L, per L; A(0) = 0."""

    def __init__(self):
        self.curve = MeasuredCurve(lambda lengths: np.asarray(lengths, dtype=np.int64), forget=0.995)

    def observe(self, lengths, accepted) -> None:
        if not any(lengths):
            return
        lengths, accepted = np.asarray(lengths), np.asarray(accepted)
        drafted = lengths > 0
        for length in set(lengths[drafted].tolist()) - set(self.curve.sums):
            # Optimism for a length seen first: one pseudo-window with every draft accepted, so
            # that one unlucky window does not rule the length out before it is tried again.
            self.curve.observe(length, length)
        self.curve.observe_many(lengths[drafted], accepted[drafted])

    def __bool__(self) -> bool:
        return bool(self.curve)

    def expected(self, max_window: int) -> np.ndarray:
        """A(L) for L = 0 .. max_window.  Beyond the longest window measured, optimism again:
        every further draft accepted, until such a window has been tried."""
        lengths = np.arange(max_window + 1)
        xs, ys = self.curve.points()
        measured = np.interp(lengths, xs, ys) + np.maximum(lengths - xs[-1], 0)
        return np.where(lengths == 0, 0.0, np.minimum(measured, lengths))


class Calibration:
    """What drafted passes realise against what the curves predict for them, per half octave of
    the batch size: (sum of committed tokens / sum of seconds) over (the same predicted), with
    forgetting.  The curves describe runs of one window length; a choice that switches between
    drafting and not (exploring, or near break-even) starts runs whose first windows hold drafts
    no pass has refined.  At 8 digit images drafted passes realised 0.81 of the prediction, at
    one image 1.00.  Drafted choices' goodput is scaled by the factor."""

    MIN_WEIGHT = 8.0  # drafted passes observed before the factor counts

    def __init__(self, forget: float = 0.98):
        self.forget = forget
        self.sums: dict[int, np.ndarray] = {}  # bucket: [weight, real tokens, real s, predicted tokens, predicted s]

    def observe(self, batch: int, tokens: float, seconds: float, predicted_tokens: float, predicted_seconds: float) -> None:
        s = self.sums.setdefault(batch_bucket(batch), np.zeros(5))
        s *= self.forget
        s += (1.0, tokens, seconds, predicted_tokens, predicted_seconds)

    def factor(self, batch: int) -> float:
        """Realised over predicted goodput, at most 1 (it corrects optimism, never adds to it);
        1 until enough drafted passes have been seen."""
        s = self.sums.get(batch_bucket(batch))
        if s is None or s[0] < self.MIN_WEIGHT:
            return 1.0
        return min(1.0, (s[1] / s[2]) / (s[3] / s[4]))


class GoodputController:
    """Window lengths for the next pass from the measured pass cost and acceptance."""

    MEASURED_WINDOWS = 8.0  # windows of a length observed before its acceptance counts as measured

    def __init__(self, max_window: int, clock=time.perf_counter):
        self.max_window = max_window
        self.cost = PassCost()
        self.acceptance = Acceptance()
        self.calibration = Calibration()
        self.clock = clock
        self.steps = 0
        self.best = max_window  # the last cap chosen
        self._next_choice, self._chosen_for = 0, -1
        self._last_end: float | None = None
        self._last_requests: frozenset = frozenset()
        self._last_full_step: bool | None = None
        self._last_lengths: dict = {}  # request: the drafts it verified in its last step

    def forget(self, req_id: str) -> None:
        """vLLM removed the request: a new request reusing its id is not the same run."""
        self._last_requests = self._last_requests - {req_id}
        self._last_lengths.pop(req_id, None)

    def observe_step(self, positions: int, req_ids, full_step: bool, lengths, accepted) -> None:
        """Called at the end of each step: the positions in its pass, the requests in it, whether
        it ran the SJD++ step proper, and per request the drafts verified and accepted."""
        now = self.clock()
        requests = frozenset(req_ids)
        # The time between two step ends also holds the earlier step's tail (its tokens' output
        # processing, its windows' proposal), so a step counts only after one of its own kind
        # (a windowless step after a drafted one would pay for the drafted one's tokens) and of
        # the same requests: arrivals and departures cost what they cost with or without drafts
        # (they made the passes without drafts, often timed at a batch's start and end, look
        # dearer), and with none in common the engine may have waited for work.
        steady = full_step == self._last_full_step and requests == self._last_requests
        if steady and self._last_end is not None and now - self._last_end < MAX_STEP_GAP_S:
            seconds = now - self._last_end
            if any(lengths):
                self._calibrate(len(requests), positions, seconds, lengths, accepted)
            self.cost.observe(len(requests), positions, full_step, seconds)
        self._last_end, self._last_requests, self._last_full_step = now, requests, full_step
        if not any(lengths):  # nothing verified (most steps where drafting does not pay)
            self._last_lengths = {}
            return
        lengths, accepted = np.asarray(lengths), np.asarray(accepted)
        previous = np.array([self._last_lengths.get(r, 0) for r in req_ids])
        self._last_lengths = dict(zip(req_ids, lengths.tolist()))
        # Only windows within a draft of their request's last count: what a run of windows of
        # one length accepts is what choosing that length gets.  A longer window after short
        # ones (a probe) holds drafts no pass has refined and accepts less; a shorter one after
        # long ones holds drafts refined many times and accepts more.
        steady = np.abs(previous - lengths) <= 1
        self.acceptance.observe(lengths[steady], accepted[steady])

    def _calibrate(self, batch: int, positions: int, seconds: float, lengths, accepted) -> None:
        """A drafted pass's committed tokens and time against the curves' prediction for its
        windows, made before the pass is added to them."""
        drafted = self.cost.curve(batch, True)
        if not self.acceptance or drafted is None or len(drafted.sums) < 2:
            return
        # Only against measured acceptance: the optimism for lengths barely tried (exploration's
        # prior) is meant not to be realised.
        measured = self.acceptance.curve.sums
        if any(measured.get(n, (0.0,))[0] < self.MEASURED_WINDOWS for n in set(lengths) if n):
            return
        predicted_tokens = batch + self.acceptance.expected(self.max_window)[np.asarray(lengths)].sum()
        predicted_seconds = float(drafted(positions))
        self.calibration.observe(batch, batch + sum(accepted), seconds, predicted_tokens, predicted_seconds)

    def _worth_exploring(self, cap: int, wanted: np.ndarray, pinned: np.ndarray) -> bool:
        """A cap predicted to do far worse than the best (a pass over twice as dear, or under
        80% of its goodput) is tried in one cycle of exploring runs in four: what exploring
        costs at the optimum is what drafting loses where drafting does not pay."""
        if cap == self.best or self.steps // (8 * EXPLORE_EVERY) % 4 == 0:
            return True
        goodput, seconds = self.evaluate(wanted, pinned)
        c, b = min(cap, wanted.max()), min(self.best, wanted.max())
        return seconds[c] <= 2 * seconds[b] and goodput[c] >= 0.8 * goodput[b]

    def exploring_cap(self) -> int | None:
        """The cap if this step explores.  Every other run tries no drafts: passes without
        drafts take another step path, timed only in such runs, and where drafting pays they
        are rare.  Most others try a neighbour of the last best cap (+1, -1), where a kink in
        the cost (a GPU's roofline) may hide between measured sizes; every 8th goes
        round the whole range (0, k, k/2, ..., 1), so that a change in the hardware's load is
        noticed."""
        if self.steps < EXPLORE_EVERY or self.steps % EXPLORE_EVERY >= EXPLORE_RUN:
            return None
        run = self.steps // EXPLORE_EVERY
        if run % 8 == 1:
            caps = [0] + [self.max_window >> i for i in range(self.max_window.bit_length())]
            return caps[run // 8 % len(caps)]
        if run % 2 == 0:
            return 0
        return min(max(self.best + (1 if run % 4 == 3 else -1), 0), self.max_window)

    def windows(self, wanted: list[int], pinned: list[int]) -> list[int]:
        """Lengths for the adaptable requests' next windows (each at most what it wants), given
        the pinned requests' fixed lengths."""
        self.steps += 1
        if not any(wanted):
            return list(wanted)
        batch = len(wanted) + len(pinned)
        # A batch size met for the first time is probed: no drafts (unless pinned windows make
        # every step draft), windows of one, full windows.
        if self.cost.curve(batch, False) is None and not any(pinned):
            return [0] * len(wanted)
        drafted = self.cost.curve(batch, True)
        if drafted is None or not self.acceptance:
            return [min(n, 1) for n in wanted]
        if len(drafted.sums) < 2:
            return list(wanted)
        w, p = np.asarray(wanted), np.asarray(pinned, dtype=int)
        cap = self.exploring_cap()
        if cap is not None and self._worth_exploring(cap, w, p):
            return [min(n, cap) for n in wanted]
        if self.steps >= self._next_choice or batch_bucket(batch) != self._chosen_for:
            goodput = self.evaluate(w, p)[0]
            best = int(np.argmax(goodput))
            self.best = best if goodput[best] >= DRAFT_MARGIN * goodput[0] else 0
            self._next_choice, self._chosen_for = self.steps + DECIDE_EVERY, batch_bucket(batch)
        return [min(n, self.best) for n in wanted]

    def evaluate(self, wanted: np.ndarray, pinned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expected committed tokens per second, and seconds per pass, for each cap 0 .. max(wanted)."""
        gain = self.acceptance.expected(self.max_window)
        caps = np.arange(wanted.max() + 1)
        lengths = np.minimum(wanted[None, :], caps[:, None])  # [cap, request]
        requests = len(wanted) + len(pinned)
        drafts = lengths.sum(1) + pinned.sum()
        tokens = requests + gain[lengths].sum(1) + gain[pinned].sum()
        seconds = self.cost.predict(requests, requests + drafts, drafts > 0)
        goodput = tokens / np.maximum(seconds, 1e-9)
        return np.where(drafts > 0, self.calibration.factor(requests) * goodput, goodput), seconds

    def summary(self) -> str:
        def curve(name, c):
            if c is None:
                return f"{name}: not measured yet"
            xs, ys = c.points()
            picks = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 5)).round().astype(int))
            return f"{name}: " + ", ".join(f"{xs[i]:.0f}: {ys[i]:.2g}" for i in picks)

        batch = len(self._last_requests)
        return "; ".join([
            curve(f"pass s by positions at {batch} requests, no drafts", self.cost.curve(batch, False)),
            curve("with drafts", self.cost.curve(batch, True)),
            curve("drafts accepted by window length", self.acceptance.curve if self.acceptance else None),
        ])
