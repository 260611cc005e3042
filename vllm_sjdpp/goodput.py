"""Goodput-adaptive windows (draft_token_budget="auto"): each pass gets the drafts that maximise
the expected committed tokens per second, from two measurements the engine takes while serving.

- Pass cost t(n): seconds per engine step whose pass has n positions (scheduled tokens, prompt
  chunks included), from the time between the ends of consecutive steps that share a request
  (so the engine was busy in between, not waiting for work).  Steps are grouped by n in
  power-of-two buckets; t between buckets is linear interpolation, beyond the largest the slope
  of the last two.
- Acceptance by window position r_j: among windows of at least j drafts, the fraction whose
  first j drafts were all accepted.  A window of L drafts is expected to commit
  1 + R(L) tokens, R(L) = r_1 + ... + r_L.

For requests wanting windows w_i (and pinned requests whose windows are fixed, f_m), the cap c
maximises

    G(c) = [B + sum_i R(min(w_i, c)) + sum_m R(f_m)] / t(B + sum_i min(w_i, c) + sum_m f_m).

Why the output stays exact.  Verification commits each token with the distribution p given
everything fixed before the step's noise is drawn: the committed prefix, the drafts, their
proposals, and how many there are.  The window lengths here are a function of the batch and of
past steps (their timings and acceptances), all fixed before the noise of the pass that
verifies them, so each committed token is distributed as plain sampling's given its prefix, and
the whole stream as plain sampling's.  What would break it is a length chosen after seeing the
verifying pass's own noise (stopping a window once a draft is rejected, say), which this module
cannot see.  `tests/test_engine.py` runs the chi-square test against plain decoding with the
controller on.

What it does change is which draws a seed's generator makes: the same law, other samples.
Seeded requests are therefore pinned to their own window (not adapted, not shared), so that a
seed reproduces its tokens at any load.
"""

from __future__ import annotations

import time

import numpy as np

# Every so many steps the windows are not chosen but set, alternately to none and to full, so that
# t(n) is measured at both ends even where the choice would never go there again.
EXPLORE_EVERY = 64
MIN_BUCKETS = 2  # cost measured at this many pass sizes before windows are cut
MAX_STEP_GAP_S = 5.0  # a longer gap is a stall (a compile, a pause), not a pass


class PassCost:
    """t(n) for passes of n positions, from timed steps (exponential averages per bucket)."""

    def __init__(self, decay: float = 0.1):
        self.decay = decay
        self.buckets: dict[int, list[float]] = {}  # log2 bucket: [mean n, mean seconds]

    def observe(self, n: int, seconds: float) -> None:
        b = self.buckets.setdefault(max(n, 1).bit_length(), [float(n), seconds])
        b[0] += self.decay * (n - b[0])
        b[1] += self.decay * (seconds - b[1])

    @property
    def known(self) -> bool:
        return len(self.buckets) >= MIN_BUCKETS

    def predict(self, n: np.ndarray) -> np.ndarray:
        points = np.array(sorted(self.buckets.values()))
        xs, ts = points[:, 0], points[:, 1]
        inside = np.interp(n, xs, ts)
        slope = max((ts[-1] - ts[-2]) / max(xs[-1] - xs[-2], 1e-9), 0.0) if len(xs) > 1 else 0.0
        return np.where(n > xs[-1], ts[-1] + slope * (n - xs[-1]), inside)


class AcceptanceByPosition:
    """r_j = P(first j drafts all accepted | window of at least j), with a weak prior of 1/2 and
    counts halved now and then so that the estimate follows the traffic."""

    def __init__(self, max_window: int, horizon: float = 20000.0):
        self.windows = np.ones(max_window + 1)  # windows of at least j drafts (index j)
        self.accepted = np.full(max_window + 1, 0.5)  # of those, with the first j accepted
        self.horizon = horizon

    def observe(self, lengths: np.ndarray, accepted: np.ndarray) -> None:
        j = np.arange(1, len(self.windows))
        self.windows[1:] += (lengths[:, None] >= j).sum(0)
        self.accepted[1:] += (accepted[:, None] >= j).sum(0)
        if self.windows[1] > self.horizon:
            self.windows /= 2
            self.accepted /= 2

    def expected_accepted(self) -> np.ndarray:
        """R(L) for L = 0 .. max_window."""
        r = self.accepted / self.windows
        r[0] = 0.0
        return np.cumsum(r)


class GoodputController:
    """Window lengths for the next pass from the measured pass cost and acceptance."""

    def __init__(self, max_window: int, clock=time.perf_counter):
        self.cost = PassCost()
        self.acceptance = AcceptanceByPosition(max_window)
        self.clock = clock
        self.steps = 0
        self._last_end: float | None = None
        self._last_requests: frozenset = frozenset()

    def observe_step(self, positions: int, req_ids, lengths, accepted) -> None:
        """Called at the end of each step: the positions in its pass, the requests in it, and per
        request the drafts verified and accepted."""
        now = self.clock()
        requests = frozenset(req_ids)
        busy = not requests.isdisjoint(self._last_requests)
        if busy and self._last_end is not None and now - self._last_end < MAX_STEP_GAP_S:
            self.cost.observe(positions, now - self._last_end)
        self._last_end, self._last_requests = now, requests
        lengths = np.asarray(lengths)
        if lengths.any():
            self.acceptance.observe(lengths, np.asarray(accepted))

    def windows(self, wanted: list[int], pinned: list[int]) -> list[int]:
        """Lengths for the adaptable requests' next windows (each at most what it wants), given
        the pinned requests' fixed lengths."""
        self.steps += 1
        if not any(wanted):
            return list(wanted)
        if self.steps % EXPLORE_EVERY == 0:  # alternately no drafts and full windows
            return [0] * len(wanted) if self.steps // EXPLORE_EVERY % 2 else list(wanted)
        if not self.cost.known:
            return list(wanted)
        w = np.asarray(wanted)
        expected = self.acceptance.expected_accepted()
        caps = np.arange(w.max() + 1)
        lengths = np.minimum(w[None, :], caps[:, None])  # [cap, request]
        fixed = sum(pinned)
        requests = len(wanted) + len(pinned)
        tokens = requests + expected[lengths].sum(1) + expected[np.asarray(pinned, dtype=int)].sum()
        seconds = self.cost.predict(requests + fixed + lengths.sum(1).astype(float))
        best = int(caps[np.argmax(tokens / np.maximum(seconds, 1e-9))])
        return np.minimum(w, best).tolist()

    def summary(self) -> str:
        points = sorted(self.cost.buckets.values())
        cost = ", ".join(f"t({n:.0f})={1e3 * t:.1f} ms" for n, t in points)
        r = self.acceptance.accepted[1:] / self.acceptance.windows[1:]
        shown = ", ".join(f"{x:.2f}" for x in r[: min(8, len(r))])
        return f"pass cost {cost or 'not measured yet'}; acceptance by position {shown}"

