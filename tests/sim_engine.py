"""A simulated SJD++ engine for the goodput controller: a fake clock, pass costs of measured
machines, and acceptance that depends on how often a draft has been refined.

Pass cost.  A pass of n positions (every sequence's rows: 1 + its drafts) costs

    t(n) = T1 * (1 + beta * (n - 1)),   beta = (R - 1) / 32,

so that at batch 1 a pass of 33 positions costs R times a pass of 1, and at batch 32 the cost
grows with the total positions at the same per-position slope (T1 * beta).  A profile may add
an overhead to steps with drafts (the SJD++ step proper, O * T1) and a drift (the forward costs
1 + D * f times more, f the batch's mean fraction of its images generated: attention reads
longer contexts); the others' steps with and without drafts cost the same at every moment.
Each pass is scaled by a seeded jitter
(lognormal, 3%), and one pass in 100 is a hiccup (2x).  R per machine (`PROFILES`):
- 1.85: the digit model on 2 CPU cores in fp32 (benchmarks/README.md, "Where a step's time goes
  at batch 1": "the forward pass of 33 positions costs 1.85 times one of 1 on this CPU");
- 2.05: another fp32 CPU's measurement, 4.8: bf16 emulated on an AVX2 CPU, 1.05: a GPU at
  batch 1, 6.0: the heavy twin (issue 30's report, "about 2.0x", "4.8x", "about 1.05x", "about
  6x"; for the twin bench_twin.py measured t_33 / t_1 = 163.2 / 23.0 = 7.1 in vLLM, from 33
  separate sequences, which cost more than one sequence of 33 positions).
A measured profile (`ONE_REQUEST_PROFILES`) reads its drafted passes' cost from
benchmarks/pass_cost.py's JSON instead, interpolated between the window lengths measured there:
"cpu-fp32-avx2", the README's demo machine (the digit model in float32 on 2 CPU cores held to
AVX2, benchmarks/results/pass_cost_fp32_avx2.json; its numbers: benchmarks/README.md, "A step's
cost at one request, by window").  Measured at one request, it serves only there.

Acceptance.  Each request decodes streams of IMAGE_TOKENS = 273 tokens (one digit image: 16 rows
of 16 codes and <eol>, then <eoi>), one image after another.  A window's drafts are verified in
order: the first, drafted beside the token the last pass sampled, is accepted with probability
FIRST[c], c its image column; a later one, once all before it are, with probability

    q(c, r, j) = LATER[c] * (1 - (1 - FRESH) * exp(-r / TAU)) * NEAR[j],

r the number of passes that have computed its position (its refinements: a draft made past the
last window is fresh, r = 0; the position right after that window was computed once; each pass
a draft stays in the window adds one), j its slot in the window.  NEAR lowers slot 1, the draft
after the first, and slots 15-17, the drafts in the row below the token the last pass sampled
(slot -1; a row is 17 tokens), whose drafts were made beside that token's old value.  An <eol>
draft is always accepted.  So
a run of windows of L refines its drafts less the shorter L is, a longer window after short ones
holds fresh drafts, and a run rarely passes slot 15, whatever the column it starts at.  Like
Gumbel-coupled verification the randomness is keyed by stream position (one uniform per position
and test), so a stream accepts alike under two window policies where its drafts are alike.

The numbers (`DIGITS`) are fitted by `fit_drafts` (`python tests/sim_engine.py --fit`, 35 s) to
the digit model's acceptance by column and slot with full windows of k = 4, 8, 16, 32
(benchmarks/results/digits_acceptance.json, 100 images each): FIRST is the first drafts'
acceptance per column over all k; TAU, FRESH and NEAR are least squares (Nelder-Mead) on the
acceptance per slot and the drafts accepted per pass (273 / passes - 1: measured 0.783, 1.164,
1.847, 2.224), with LATER set at each step so that at k = 32 every column's later drafts accept
as measured (0.97 at a row's first code, 0.73 mid-row).  The fit gives 0.73, 1.20, 1.90, 2.23
drafts per pass (`acceptance_by_slot`, 100 images), and the measured columns at k = 32 within
0.05; it does not follow the measured dip at slots 12-14 (0.74-0.61 at k = 16, 0.1-0.19 higher
here), nor the columns of short windows (calibrated at k = 32 only).  `test_goodput_sim.py`
holds the fit to the measurements, and the model it replaced fails them: a barrier at a row's
first code (accepted 0.069) fitted to drafts per pass alone, where the digit model's later
drafts are accepted 0.97 (measured).  Those counts were served in bf16.  `DIGITS_FP32` is the
same fit to the digit model served in float32 (`python tests/sim_engine.py --fit
benchmarks/results/digits_acceptance_fp32.json`; measured 0.808, 1.196, 1.898, 2.342 drafts per
pass, fitted 0.714, 1.195, 1.954, 2.345): a profile accepts as its dtype does (`Profile.drafts`),
the measured float32 profile so; the linear ones accept as `DIGITS`, though three are CPUs in
float32 (test_goodput_sim.py says what float32's acceptance does to the controller there).
`RANDOM` (a `Drafts` of other constants)
is a random-weight folder's, whose drafts are rarely accepted.

Paired requests (`paired=True`): every request has a companion (guidance/pairing.py) that runs
its request's drafts at its own positions, commits nothing of its own and is no request to the
controller (the runtime leaves it out, and counts it in `copies`).  `companions_counted=True`
feeds them in as the runtime did before: requests wanting no window, whose verified drafts (their
request's) all fail.

`run` drives a controller (or a fixed cap) in the runtime's order: choose the next windows
(`windows`), pay for the pass, report it (`observe_step`); `fixed_goodputs` runs every fixed cap.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_TOKENS = 273  # the digit model's generated stream: 16 x 16 codes, 16 <eol>, <eoi>
WINDOW = 32  # k, the digit model's default
T1 = 0.010  # seconds for a pass of one position
JITTER = 0.03
HICCUP_EVERY, HICCUP = 100, 2.0

ROW = 17  # an image row: 16 codes and <eol>
# `DIGITS`, fitted by `fit_drafts` to benchmarks/results/digits_acceptance.json (the module's docstring).
FIRST = (0.565, 0.231, 0.232, 0.192, 0.216, 0.211, 0.213, 0.224, 0.244, 0.277, 0.263, 0.268, 0.277, 0.328,
         0.369, 0.481, 1.0)
LATER = (1.0, 0.947, 0.977, 0.952, 0.912, 0.889, 0.853, 0.877, 0.845, 0.839, 0.783, 0.806, 0.814, 0.801,
         0.868, 0.952, 1.0)
TAU, FRESH = 0.542, 0.309
NEAR = ((1, 0.741), (15, 0.402), (16, 0.411), (17, 0.853))


@dataclass(frozen=True)
class Drafts:
    """A model's draft acceptance (the module's docstring): per image column, a window's first
    draft's and a later draft's once refined for good; how fast refinement gets there; and the
    slots whose drafts were made beside the token the last pass sampled."""

    name: str
    first: tuple = FIRST  # per column
    later: tuple = LATER  # per column
    tau: float = TAU
    fresh: float = FRESH  # a draft no pass has computed, as a fraction of `later`
    near: tuple = NEAR  # (slot, factor)
    certain: tuple = (ROW - 1,)  # columns whose drafts are always accepted (<eol>)

    def first_at(self, column: np.ndarray) -> np.ndarray:
        return np.where(np.isin(column, self.certain), 1.0, np.asarray(self.first)[column])

    @functools.cached_property
    def near_factor(self) -> np.ndarray:
        """`near` per slot 0 .. ROW + 1 (1 where not listed; further slots as ROW + 1)."""
        factor = np.ones(ROW + 2)
        for at, f in self.near:
            factor[at] = f
        return factor

    def later_at(self, column: np.ndarray, refined: np.ndarray, slot: np.ndarray) -> np.ndarray:
        """Acceptance of later drafts at these columns, refined so often, in these window slots."""
        later = np.asarray(self.later)[column]
        q = later * (1.0 - (1.0 - self.fresh) * np.exp(-np.asarray(refined, dtype=float) / self.tau))
        q = q * self.near_factor[np.minimum(slot, ROW + 1)]
        return np.where(np.isin(column, self.certain), 1.0, q)


DIGITS = Drafts("digits")
# Fitted by `fit_drafts` to benchmarks/results/digits_acceptance_fp32.json (the digit model served
# in float32, as on a CPU without native bf16): the measured float32 profile accepts so (the
# linear ones keep `DIGITS`: test_goodput_sim.py says why).
DIGITS_FP32 = Drafts(
    "digits-fp32",
    first=(0.641, 0.237, 0.222, 0.185, 0.207, 0.213, 0.211, 0.233, 0.239, 0.25, 0.275, 0.286, 0.262, 0.337, 0.361,
           0.502, 1.0),
    later=(1.0, 0.958, 0.996, 0.971, 0.929, 0.939, 0.878, 0.892, 0.85, 0.848, 0.803, 0.825, 0.845, 0.861, 0.868,
           0.958, 1.0),
    tau=0.529, fresh=0.31, near=((1, 0.689), (15, 0.428), (16, 0.41), (17, 0.836)),
)
# The tiny random-weight folders (tests/tiny_emu3.py, tests/tiny_lumina.py) as their servers'
# controllers measured them: a window's first draft accepted about one time in eight (0.12
# drafts from windows of 1), and about 0.2 drafts from longer windows (0.23 from 11, 0.21 from
# 23): once the first is accepted, runs of 1.7-1.9 drafts.  Later drafts at 0.45 once refined,
# a row's first code at 0.05, give A(11) and A(23) about 0.20 here.
RANDOM = Drafts("random", first=(0.12,) * ROW, later=(0.05,) + (0.45,) * (ROW - 1), fresh=0.11, tau=0.41, near=(),
                certain=())


@dataclass(frozen=True)
class Profile:
    name: str
    ratio: float  # t(33) / t(1) at batch 1
    overhead: float = 0.0  # what a step with drafts costs more, in T1 (the SJD++ step proper)
    drift: float = 0.0  # how much dearer a pass is at its requests' images' ends than at their starts
    drafts: Drafts = DIGITS  # the acceptance of the dtype it serves
    # Drafted passes' cost against positions, measured at one request, ((n, t(n) / t(1)), ...):
    # in place of `ratio` and `overhead`, interpolated; only where it was measured (one request:
    # a pass without drafts has 1 position, one with drafts 2 to the longest measured).
    measured: tuple = ()

    @property
    def beta(self) -> float:
        return (self.ratio - 1.0) / 32.0

    def cost(self, positions, full_step=False, progress=0.0) -> np.ndarray:
        """Seconds of a pass of `positions`, with drafts or not, its requests `progress` (mean
        fraction of their images generated) through their images."""
        n = np.asarray(positions, dtype=float)
        if self.measured:
            xs, ys = np.array(self.measured, dtype=float).T
            if np.any(n > xs[-1]) or np.any((n > 1) & ~np.asarray(full_step)):
                raise ValueError(f"{self.name}: measured at one request, up to {xs[-1]:.0f} positions")
            forward = np.where(full_step, np.interp(n, xs, ys), 1.0)
            return T1 * forward * (1.0 + self.drift * np.asarray(progress))
        forward = 1.0 + self.beta * (n - 1.0)
        return T1 * (forward * (1.0 + self.drift * np.asarray(progress)) + self.overhead * np.asarray(full_step))


PROFILES = [
    Profile("cpu-fp32", 1.85),
    # This CPU in float32, timed by the controller at batch 1 and 10 (issue 30): a step with
    # drafts 1.5x one without at 2 positions, 0.09 ms per position more, 2.25 ms at 1; at 10
    # requests a pass without drafts 2.5 ms at the images' first tokens, 3.6 ms at their last.
    Profile("cpu-fp32-drift", 2.28, overhead=0.5, drift=0.45),
    Profile("cpu-fp32-b", 2.05),
    Profile("cpu-bf16-avx2", 4.8),
    Profile("gpu", 1.05),
    Profile("twin", 6.0),
]


def measured_profile(name: str, path: Path) -> Profile:
    """A profile of the drafted passes' cost relative to a plain one's, at one request, from
    benchmarks/pass_cost.py's JSON of the digit model served in float32 (its acceptance
    `DIGITS_FP32`)."""
    result = json.loads(path.read_text())
    if result["dtype"] != "float32":
        raise ValueError(f"{path} was served in {result['dtype']}; the profile pairs float32's acceptance")
    modes = result["modes"]
    plain = modes["0"]["step_seconds"]["mean"]
    points = tuple((1 + int(k), v["step_seconds"]["mean"] / plain) for k, v in sorted(modes.items(), key=lambda kv: int(kv[0]))
                   if k != "0")
    return Profile(name, points[-1][1], drafts=DIGITS_FP32, measured=points)


RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"
# Measured at one request only: a batch's passes hold more than the 33 positions measured.
ONE_REQUEST_PROFILES = [measured_profile("cpu-fp32-avx2", RESULTS / "pass_cost_fp32_avx2.json")]


@dataclass
class Trace:
    """Per step: positions in the pass, real tokens committed, the longest window handed out,
    and the pass's seconds."""

    positions: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    caps: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    def goodput(self, start: int = 0, stop: int | None = None) -> float:
        """Real tokens committed per second over steps start .. stop - 1."""
        return float(np.sum(self.tokens[start:stop]) / np.sum(self.seconds[start:stop]))


def jitter(seed: int, steps: int) -> np.ndarray:
    """Each step's cost factor: lognormal (JITTER), one step in HICCUP_EVERY a hiccup."""
    rng = np.random.default_rng(seed + 10_000)
    factor = np.exp(rng.normal(0.0, JITTER, steps))
    return np.where(rng.random(steps) < 1.0 / HICCUP_EVERY, HICCUP * factor, factor)


class SimEngine:
    """`len(streams)` real requests (plus as many companions if `paired`), each decoding images
    of IMAGE_TOKENS one after the other, windows of at most `window` drafts.  A request's images
    come from its stream (seeded by `seed` and the stream's number), so requests of the same
    stream in two engines, or in one, decode the same images."""

    def __init__(self, streams, seed: int, paired: bool = False, window: int = WINDOW,
                 image_tokens: int = IMAGE_TOKENS, drafts: Drafts = DIGITS):
        batch = len(streams)
        self.drafts = drafts
        self.streams = list(streams)
        self.batch, self.paired, self.window, self.image_tokens = batch, paired, window, image_tokens
        self.rngs = [np.random.default_rng([seed, stream]) for stream in self.streams]
        self.images = [0] * batch
        self.ids = [""] * batch
        self.generated = np.zeros(batch, dtype=np.int64)
        # Refinements of each window draft (offset 0 .. window - 1) and the window's length.
        self.refined = np.zeros((batch, window + 2), dtype=np.int64)
        self.length = np.zeros(batch, dtype=np.int64)
        # Position-keyed uniforms: the first-slot test and the later-slot test of each position.
        self.u_first = np.zeros((batch, image_tokens + window + 2))
        self.u_later = np.zeros((batch, image_tokens + window + 2))
        for i in range(batch):
            self._new_image(i)

    def _new_image(self, i: int) -> None:
        self.ids[i] = f"s{self.streams[i]}-img{self.images[i]}"
        self.images[i] += 1
        self.generated[i] = 0
        self.length[i] = 0
        self.refined[i] = 0
        self.u_first[i] = self.rngs[i].random(self.u_first.shape[1])
        self.u_later[i] = self.rngs[i].random(self.u_later.shape[1])

    def wanted(self) -> np.ndarray:
        """The runtime's `windows_wanted`: drafts the next pass may verify after this one commits."""
        return np.minimum(self.window, np.maximum(self.image_tokens - self.generated - 2, 0))

    def step(self, next_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Verify the current windows, commit, and set the next windows to `next_lengths` (cut
        to what is left of each image, as the proposer does).  Per request: the drafts verified,
        the drafts accepted, and the tokens committed (an image ends at its last token)."""
        lengths = self.length.copy()
        offsets = np.arange(self.window)
        rows = np.arange(self.batch)[:, None]
        at = self.generated[:, None] + offsets[None, :]  # stream position of each draft
        column = at % ROW
        first = self.u_first[rows, at] < self.drafts.first_at(column)
        later = self.u_later[rows, at] < self.drafts.later_at(column, self.refined[:, : self.window], offsets[None, :])
        ok = np.where(offsets[None, :] == 0, first, later) & (offsets[None, :] < lengths[:, None])
        accepted = np.cumprod(ok, axis=1).sum(1)
        committed = np.minimum(accepted + 1, self.image_tokens - self.generated)
        self.generated += accepted + 1
        # The next window: a draft this pass computed is refined once more, the position after
        # the window once, anything further is fresh.
        shift = accepted + 1
        new_offsets = offsets[None, :] + shift[:, None]  # old offset of each new offset
        old = np.take_along_axis(self.refined, np.minimum(new_offsets, self.window + 1), axis=1)[:, : self.window]
        refined = np.where(new_offsets < lengths[:, None], old + 1, np.where(new_offsets == lengths[:, None], 1, 0))
        self.refined[:, : self.window] = refined
        left = np.maximum(self.image_tokens - self.generated - 1, 0)
        self.length = np.minimum(np.asarray(next_lengths, dtype=np.int64), left)
        for i in np.flatnonzero(self.generated >= self.image_tokens):
            self._new_image(i)
        return lengths, accepted, committed


def run(profile: Profile, batch: int, steps: int, seed: int, controller=None, cap: int | None = None,
        paired: bool = False, companions_counted: bool = False, first_shape_slow: float = 1.0,
        drafts: Drafts | None = None) -> Trace:
    """Drive `controller` (a GoodputController on a `Clock`) or a fixed `cap` for `steps`
    steps, in the runtime's order: choose the next windows, pay for the pass, report it.
    `first_shape_slow`: the first pass of each number of positions costs that many times more
    (a compile, a shape's first run).  `drafts`: the acceptance (default: the profile's)."""
    engine = SimEngine(range(batch), seed, paired, drafts=drafts or profile.drafts)
    copies = 2 if paired else 1
    factors = jitter(seed, steps)
    trace = Trace()
    seen: set[int] = set()
    for step in range(steps):
        wanted = engine.wanted()
        if controller is None:
            next_lengths = np.minimum(wanted, cap)
        elif paired and companions_counted:  # the old runtime: companions are requests wanting none
            next_lengths = np.asarray(controller.windows(list(wanted) + [0] * batch, [])[:batch])
        elif paired:
            next_lengths = np.asarray(controller.windows(list(wanted), [], copies=[2] * batch))
        else:
            next_lengths = np.asarray(controller.windows(list(wanted), []))
        ids = list(engine.ids)
        progress = float(np.mean(engine.generated)) / engine.image_tokens
        lengths, accepted, committed = engine.step(next_lengths)
        positions = int(copies * np.sum(1 + lengths))
        full_step = bool(lengths.any() or next_lengths.any())  # verified or made drafts
        seconds = float(profile.cost(positions, full_step, progress)) * factors[step]
        if positions not in seen:
            seen.add(positions)
            seconds *= first_shape_slow
        trace.positions.append(positions)
        trace.tokens.append(int(committed.sum()))
        trace.caps.append(int(np.max(next_lengths, initial=0)))
        trace.seconds.append(seconds)
        if controller is not None:
            controller.clock.now += seconds
            if paired and companions_counted:
                # A companion verifies its request's drafts against its own logits and takes
                # its request's tokens: to the old runtime, none of its drafts accepted.
                controller.observe_step(positions, ids + [i + "::uncond" for i in ids], full_step,
                                        list(lengths) * 2, list(accepted) + [0] * batch)
            else:
                controller.observe_step(positions, ids, full_step, list(lengths), list(accepted))
    return trace


def fixed_goodputs(batch: int, steps: int, seed: int, start: int, paired: bool = False,
                   profiles: list[Profile] = PROFILES) -> dict[str, np.ndarray]:
    """Goodput over steps start .. steps - 1 with each fixed cap 0 .. WINDOW, per profile, on
    `run`'s streams: one engine per acceptance holds the batch once per cap (the windows and
    tokens do not depend on the machine, so one run serves every profile that accepts alike)."""
    goodputs = {}
    for drafts in dict.fromkeys(p.drafts for p in profiles):
        goodputs.update(_fixed_goodputs(batch, steps, seed, start, paired, [p for p in profiles if p.drafts == drafts]))
    return {p.name: goodputs[p.name] for p in profiles}


def _fixed_goodputs(batch: int, steps: int, seed: int, start: int, paired: bool,
                    profiles: list[Profile]) -> dict[str, np.ndarray]:
    caps = np.repeat(np.arange(WINDOW + 1), batch)
    engine = SimEngine(np.tile(np.arange(batch), WINDOW + 1), seed, paired, drafts=profiles[0].drafts)
    positions, progress = np.zeros((2, steps, WINDOW + 1))
    full_step = np.zeros((steps, WINDOW + 1), dtype=bool)
    tokens = np.zeros(WINDOW + 1)
    for step in range(steps):
        progress[step] = np.bincount(caps, engine.generated, WINDOW + 1) / batch / engine.image_tokens
        next_lengths = np.minimum(engine.wanted(), caps)
        lengths, _, committed = engine.step(next_lengths)
        positions[step] = (2 if paired else 1) * np.bincount(caps, 1 + lengths)
        full_step[step] = np.bincount(caps, lengths + next_lengths, WINDOW + 1) > 0
        if step >= start:
            tokens += np.bincount(caps, committed)
    factors = jitter(seed, steps)[start:, None]
    return {
        p.name: tokens / np.sum(p.cost(positions[start:], full_step[start:], progress[start:]) * factors, axis=0)
        for p in profiles
    }


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def acceptance_by_slot(drafts: Drafts, window: int, images: int = 100, seed: int = 0):
    """Full windows of `window` over `images` whole images: drafts tested and accepted per
    [column, slot] (a later draft is tested when all before it were accepted), and drafts
    accepted per pass (IMAGE_TOKENS / passes - 1), as benchmarks/digits_acceptance.py counts them."""
    engine = SimEngine(range(images), seed, window=WINDOW, drafts=drafts)
    tested, accepted = np.zeros((2, ROW, WINDOW + 1))
    passes, done = np.zeros(images), np.zeros(images, dtype=bool)
    slots = np.arange(WINDOW)
    while not done.all():
        generated = engine.generated.copy()
        lengths, taken, _ = engine.step(np.minimum(engine.wanted(), window))
        mask = (slots[None, :] < np.minimum(lengths, taken + 1)[:, None]) & ~done[:, None]
        columns = (generated[:, None] + slots[None, :]) % ROW
        at = np.broadcast_to(slots, mask.shape)
        np.add.at(tested, (columns[mask], at[mask]), 1)
        np.add.at(accepted, (columns[mask], at[mask]), (at < taken[:, None])[mask])
        passes += ~done
        done |= engine.generated == 0  # a new image began: this one ended
    return tested, accepted, IMAGE_TOKENS / passes.mean() - 1


def fit_drafts(measured: dict, evaluations: int = 700) -> Drafts:
    """`Drafts` fitted to benchmarks/results/digits_acceptance.json (the module's docstring)."""
    from scipy.optimize import minimize

    windows = measured["windows"]
    tested, accepted = np.array(measured["tested"], dtype=float), np.array(measured["accepted"], dtype=float)
    target = np.array(measured["drafts_per_pass"])
    # A window's first draft is a row's first code only after a window accepted up to the row's
    # end (its bonus token is <eol>): tested at short windows only.
    first = accepted[:, :, 0].sum(0) / np.maximum(tested[:, :, 0].sum(0), 1)
    longest = len(windows) - 1
    later_target = accepted[longest, :, 1:].sum(1) / tested[longest, :, 1:].sum(1)

    def drafts(x, later):
        tau, fresh, near1, near15, near16, near17 = x
        near = tuple((slot, float(np.clip(f, 0, 1))) for slot, f in ((1, near1), (15, near15), (16, near16), (17, near17)))
        return Drafts("fit", first=tuple(first), later=tuple(later), tau=max(tau, 0.05),
                      fresh=float(np.clip(fresh, 0, 1)), near=near)

    def calibrated(x):
        # The later drafts' level per column, so that at the longest window each column accepts
        # as measured (three fixed-point rounds).
        later = np.clip(later_target, 0, 1)
        for _ in range(3):
            t, a, _ = acceptance_by_slot(drafts(x, later), windows[longest])
            simulated = a[:, 1:].sum(1) / np.maximum(t[:, 1:].sum(1), 1)
            later = np.clip(later * later_target / np.maximum(simulated, 1e-3), 0, 1)
        return drafts(x, later)

    def loss(x):
        model, out = calibrated(x), 0.0
        for i, window in enumerate(windows):
            t, a, per_pass = acceptance_by_slot(model, window)
            out += 50 * (per_pass - target[i]) ** 2
            real = tested[i].sum(0)
            for slot in range(1, min(window, 20)):
                if real[slot] > 20 and t[:, slot].sum() > 5:
                    miss = accepted[i, :, slot].sum() / real[slot] - a[:, slot].sum() / t[:, slot].sum()
                    out += 10 * real[slot] / real[0] * miss**2
        return out

    x = minimize(loss, np.array([0.5, 0.3, 0.85, 0.4, 0.4, 0.8]), method="Nelder-Mead",
                 options=dict(maxfev=evaluations, xatol=0.01, fatol=1e-4)).x
    return calibrated(x)


if __name__ == "__main__":
    import sys

    results = RESULTS / "digits_acceptance.json"
    if sys.argv[1:2] != ["--fit"] or len(sys.argv) > 3:
        sys.exit(f"usage: python {Path(__file__).name} --fit [JSON]   (fits DIGITS to JSON; default {results})")
    fit = fit_drafts(json.loads(Path(sys.argv[2] if len(sys.argv) > 2 else results).read_text()))
    print(f"FIRST = {tuple(round(float(q), 3) for q in fit.first)}")
    print(f"LATER = {tuple(round(float(q), 3) for q in fit.later)}")
    print(f"TAU, FRESH = {fit.tau:.3f}, {fit.fresh:.3f}")
    print(f"NEAR = {tuple((slot, round(f, 3)) for slot, f in fit.near)}")
