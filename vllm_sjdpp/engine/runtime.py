"""`SJDPPRuntime`: the one owner of a model runner's per-request SJD++ state.

A runner serving SJD++ has one runtime, built by the runner patch (`patches.gpu_model_runner`)
right after vLLM builds the runner, and reached as `runner.sjdpp`.  It holds
- the Jacobi windows and their proposal rows (`states`),
- the running batch's per-request facts in batch order (`batch`),
- the goodput controller that sizes windows under draft_token_budget="auto" (`goodput`),
- the step statistics (`stats`), the guard at the model runner's door (`guard`) and the count
  of steps that fell back to plain sampling (`fallbacks`).
vLLM's adapters are thin: `SJDPPSampler` (the rejection sampler's slot) verifies and redrafts
with the state read and recorded here, `SJDPPProposer` (the drafter's slot) hands out the windows
kept here.  `release` is the one place a request's state is forgotten, called from vLLM's hook
for a removed request (finished, aborted): a request id that a client reuses starts afresh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from vllm.logger import init_logger

from ..config import AUTO, AUTO_FALLBACK_BUDGET, SJDPPConfig
from ..families import family_of, logits_size, stream_grid
from ..kernels.step import compile_cpu_step, default_backend
from .batch_requests import BatchRequests
from .goodput import GoodputController
from .jacobi_state import JacobiStates, RequestState, Window
from .step_memory import max_drafts
from .window_budget import share_draft_budget

# Under "vllm." so that vLLM's logging configuration (handlers, level) applies in every process.
logger = init_logger("vllm.sjdpp")


def _fallback_counter():
    """The Prometheus counter of steps that fell back, by cause (one per process).  Not named
    "vllm:...": vLLM unregisters those collectors when it builds its own loggers.  /metrics shows
    it where the engine shares the API server's process, or with PROMETHEUS_MULTIPROC_DIR set."""
    from prometheus_client import Counter

    return Counter("sjdpp_step_fallbacks", "SJD++ steps sampled plainly after a failure, by cause", ["stage", "cause"])


STEP_FALLBACKS = _fallback_counter()


def fallbacks_total() -> float:
    """Steps fallen back in this process so far (all stages and causes)."""
    return sum(s.value for m in STEP_FALLBACKS.collect() for s in m.samples if s.name.endswith("_total"))


class StepStats:
    """Committed tokens per request-step and the Jacobi state held, logged periodically
    (every SJDPP_LOG_INTERVAL_S seconds, default 10)."""

    def __init__(self, detail=lambda: "") -> None:
        self.detail = detail  # more to log, e.g. what the goodput controller measured
        self.request_steps = self.committed = self.drafts = 0
        self.interval = float(os.environ.get("SJDPP_LOG_INTERVAL_S", "10"))
        self._last_log = time.monotonic()

    def add(self, request_steps: int, committed: int, drafts: int, states: JacobiStates) -> None:
        self.request_steps += request_steps
        self.committed += committed
        self.drafts += drafts
        now = time.monotonic()
        if now - self._last_log >= self.interval and self.request_steps:
            logger.info(
                "SJD++: %d request-steps, %.2f tokens committed per step (step compression "
                "%.2fx), %.1f%% of %d drafts accepted; state: %d requests, %.1f MiB of q rows%s",
                self.request_steps,
                self.committed / self.request_steps,
                self.committed / self.request_steps,
                100.0 * (self.committed - self.request_steps) / max(self.drafts, 1),
                self.drafts,
                len(states.requests),
                states.state_bytes() / 2**20,
                self.detail(),
            )
            self._last_log = now


class DraftGuard:
    """The one check between SJD++ windows and the model runner: every draft handed to vLLM is
    a token the model samples (0 .. vocab_size - 1, for Janus the codebook), hence one it can
    embed.  A window is cut before its first token outside that range, whatever made it: a draft
    source that lets one through is a bug, logged and counted here instead of an IndexError in
    the forward pass that would take the engine down."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.windows = 0  # windows handed to vLLM
        self.drafts = 0  # draft tokens checked
        self.cut = 0  # windows cut short

    def __call__(self, req_id: str, tokens: list[int]) -> list[int]:
        self.windows += 1
        self.drafts += len(tokens)
        if not tokens or (min(tokens) >= 0 and max(tokens) < self.vocab_size):
            return tokens
        first_bad = next(i for i, t in enumerate(tokens) if not 0 <= t < self.vocab_size)
        self.cut += 1
        logger.error(
            "SJD++: request %s's window holds token %d at slot %d, outside the model's %d tokens: "
            "drafts from there on dropped (%d windows cut so far)",
            req_id, tokens[first_bad], first_bad, self.vocab_size, self.cut,
        )
        return tokens[:first_bad]


class StepFallbacks:
    """Steps (or proposals) that failed and were sampled plainly instead: logged with the cause
    and counted, here and in the `sjdpp_step_fallbacks` Prometheus counter."""

    def __init__(self):
        self.count = 0

    CONSEQUENCE = {
        "step": "this step samples each request's next token plainly and drops their windows",
        "proposal": "their next pass verifies no drafts and drafting starts afresh after it",
    }

    def record(self, stage: str, error: BaseException, req_ids) -> None:
        self.count += 1
        STEP_FALLBACKS.labels(stage=stage, cause=type(error).__name__).inc()
        logger.error(
            "SJD++ %s failed for requests %s (%s: %s): %s (%d fallbacks so far)",
            stage, list(req_ids), type(error).__name__, error, self.CONSEQUENCE[stage], self.count, exc_info=error,
        )


def compile_step(runner: Any, vocab_size: int, window: int) -> None:
    """Where the step will run TorchInductor's fused row pass and noise (a CPU whose largest step,
    every sequence with a full window, reaches it: `kernels.step.default_backend`), compile them
    while the server starts
    instead of in the first large step, which a fresh server's first requests waited for (2.1 s
    of the first step with full windows at 32 digit images; compiling every shape at start-up
    takes about 4 s on 2 cores).  Where TorchInductor cannot compile here, the step runs the eager
    functions, said once at start-up."""
    device = getattr(runner, "device", None)
    if device is None or device.type != "cpu":
        return
    largest = runner.vllm_config.scheduler_config.max_num_seqs * (window + 1) * vocab_size
    if default_backend(device, largest) != "inductor":
        return
    start = time.perf_counter()
    try:
        compile_cpu_step(vocab_size, device)
    except Exception as error:  # a CPU without a C++ compiler still serves, at the eager speed
        logger.warning("SJD++: TorchInductor cannot compile the step's fused kernels here (%s: %s); they run eagerly",
                       type(error).__name__, error)
        return
    logger.info("SJD++: the step's fused kernels compiled for the CPU in %.1f s", time.perf_counter() - start)


@dataclass
class StepPlan:
    """Per request: its drafts this pass, where its committed tokens end, its Jacobi state, the
    proposal row of each draft (-1: one-hot) and the length of its next window."""

    counts: list[int]
    per_request: list[list[int]]
    start: list[int]
    states: list[RequestState]
    prob_rows: list[int]
    next_len: list[int]

    @property
    def windowless(self) -> bool:
        return not any(self.counts) and not any(self.next_len)


class SJDPPRuntime:
    def __init__(self, runner: Any):
        vllm_config = runner.vllm_config
        vocab_size = logits_size(vllm_config.model_config)
        self.runner = runner
        self.states = JacobiStates(SJDPPConfig.of_server(vllm_config), vocab_size)
        self.batch = BatchRequests(self.states, runner)
        self.goodput = GoodputController(self.config.num_speculative_tokens)
        # The most drafts in one pass that the step's reserve holds (`step_memory`).
        self.max_drafts = max_drafts(self.config.step_memory_gib, vllm_config.scheduler_config.max_num_seqs, vocab_size,
                                     vllm_config.model_config.dtype)
        self.stats = StepStats(lambda: f"; {self.goodput.summary()}" if self.config.draft_token_budget == AUTO else "")
        self.guard = DraftGuard(vocab_size)
        # Fresh drafts follow each request's grid, as the model's logits do.
        self.grid = stream_grid(vllm_config.model_config)
        self._request_grid = functools.partial(family_of(vllm_config.model_config.hf_config).request_grid,
                                               vllm_config.model_config.hf_config)
        self._grids: dict[str, Any] = {}
        self.fallbacks = StepFallbacks()
        compile_step(runner, vocab_size, self.config.num_speculative_tokens)
        # Whether the last step left any window open: while none is (drafting does not pay), the
        # proposer has nothing to read out.
        self._windows_open = False
        # Every worker runs this step; timings differ between them, windows must not.
        self.adaptive = runner.parallel_config.world_size == 1
        if self.config.draft_token_budget == AUTO and not self.adaptive:
            logger.warning(
                "SJD++: draft_token_budget=%r needs a single worker; with %d it is a fixed %d",
                AUTO, runner.parallel_config.world_size, AUTO_FALLBACK_BUDGET,
            )

    @property
    def config(self) -> SJDPPConfig:
        """The server's SJD++ options (the Jacobi states hold the one copy)."""
        return self.states.config

    def set_draft_token_budget(self, budget: int | str | None) -> None:
        """Change the server's draft-token budget while it runs (in-process benchmarks, tests)."""
        self.states.config = dataclasses.replace(self.states.config, draft_token_budget=budget)

    def request_grids(self, num_reqs: int) -> list | None:
        """The grid of each running request's image, in batch order (None: the model has none).
        A prompt that names none (a guidance companion's negative prompt) gets the model's."""
        if self.grid is None:
            return None
        out = []
        for req_id in self.runner.input_batch.req_ids[:num_reqs]:
            grid = self._grids.get(req_id)
            if grid is None:
                try:
                    grid = self._request_grid(self.runner.requests[req_id].prompt_token_ids, self.grid)
                except ValueError:
                    grid = self.grid
                self._grids[req_id] = grid
            out.append(grid)
        return out

    def release(self, req_id: str) -> None:
        """Forget a request (vLLM removed it: finished or aborted)."""
        self._grids.pop(req_id, None)
        self.states.release(req_id)
        self.batch.forget(req_id)
        self.goodput.forget(req_id)

    # The step: what the sampler asks before and after its work over the vocabulary -----------

    def plan(self, metadata) -> StepPlan:
        """The step's bookkeeping, before any work over the vocabulary."""
        input_batch = self.runner.input_batch
        num_reqs = len(metadata.num_draft_tokens)
        batch = self.batch
        batch.update(input_batch.req_ids[:num_reqs], input_batch.num_prompt_tokens[:num_reqs])
        committed = input_batch.num_tokens_no_spec[:num_reqs]
        counts = list(metadata.num_draft_tokens)
        start = committed.tolist()
        states = batch.request_states
        if any(counts):
            # The drafts vLLM scheduled, from its host copy (metadata.draft_token_ids is the
            # device one): each request's first counts[i] spec tokens.
            spec = input_batch.spec_token_ids
            per_request = [list(spec[i][:n]) for i, n in enumerate(counts)]
            prob_rows = [
                row for state, n0, d in zip(states, start, per_request) for row in self.states.drafts_usable(state, n0, d)
            ]
        else:
            per_request, prob_rows = [[] for _ in counts], []
        if self.config.draft_token_budget == 0:  # a server without drafts: none is wanted
            next_len = [0] * num_reqs
        else:
            wanted = batch.windows_wanted(committed, self.runner.discard_request_mask.np[:num_reqs])
            # A companion runs its request's window (its rows go through the step as well):
            # under companions, the memory cap counts each window twice.
            cap = self.max_drafts // 2 if batch.has_companions else self.max_drafts
            next_len = share_draft_budget(self._share(wanted.tolist(), batch.pinned), cap)
        return StepPlan(counts, per_request, start, states, prob_rows, next_len)

    def _share(self, wanted: list[int], pinned: list[bool]) -> list[int]:
        """The next windows' lengths under the server's draft-token budget; pinned requests
        (seeded ones verified by the ratio test) keep theirs under "auto", where a guidance
        companion is no request of its own: it wants no window (it runs its request's), and
        counts only in the positions of its request's (`copies`)."""
        budget = self.config.draft_token_budget
        if budget != AUTO:
            return share_draft_budget(wanted, budget)
        if not self.adaptive:
            return share_draft_budget(wanted, AUTO_FALLBACK_BUDGET)
        if not any(pinned) and not self.batch.has_companions:
            return self.goodput.windows(wanted, [])
        req_ids, companion_of = self.batch.req_ids, self.batch.companion_of
        copies = {r: 1 for r, c in zip(req_ids, companion_of) if c is None}
        for c in companion_of:
            if c in copies:
                copies[c] += 1
        real = [(r, w, s) for r, w, s, c in zip(req_ids, wanted, pinned, companion_of) if c is None]
        extra = {}
        if self.batch.has_companions:
            extra = dict(copies=[copies[r] for r, _, s in real if not s],
                         pinned_copies=[copies[r] for r, _, s in real if s])
        adapted = iter(self.goodput.windows([w for _, w, s in real if not s], [w for _, w, s in real if s], **extra))
        return [0 if c is not None else w if s else next(adapted) for w, s, c in zip(wanted, pinned, companion_of)]

    def history(self, start: list[int], length: int) -> np.ndarray:
        """The last `length` committed tokens of each request, right-aligned; -1 at prompt
        positions.  The image starts at the first generated token (every family's prompt ends
        with its image-start token), so a spatial prior never copies a prompt token: a text id
        that the model could not embed as an image code (Janus: ids past the codebook)."""
        batch = self.runner.input_batch
        num_reqs = len(start)
        positions = np.asarray(start)[:, None] - length + np.arange(length)
        tokens = batch.token_ids_cpu[np.arange(num_reqs)[:, None], np.maximum(positions, 0)]
        generated = positions >= batch.num_prompt_tokens[:num_reqs, None]
        return np.where(generated, tokens, -1).astype(np.int64)

    def record_windows(self, plan: StepPlan, out) -> None:
        """Keep each request's next window from the step's output, and count the step."""
        accepted = out.host.num_accepted.tolist()
        tokens = out.host.next_draft_token_ids.tolist()
        rows = out.host.next_draft_prob_rows.tolist()
        generation = self.states.generation + 1
        offset = 0
        for state, n0, n, a in zip(plan.states, plan.start, plan.next_len, accepted):
            state.window = Window(n0 + a + 1, tokens[offset : offset + n], rows[offset : offset + n], generation) if n else None
            offset += n
        self._windows_open = any(plan.next_len)
        self.states.advance()
        self._observe(True, plan.counts, accepted)

    def close_windows(self, plan: StepPlan) -> None:
        """A windowless step's bookkeeping: one token per request, no window after it."""
        for state in plan.states:
            state.window = None
        self._windows_open = False
        self._observe(False, plan.counts, plan.counts)

    def drop_windows(self, req_ids) -> None:
        self.states.drop_windows(req_ids)

    def _observe(self, full_step: bool, lengths, accepted) -> None:
        """Count the step, per request its drafts verified and accepted: in the statistics and,
        under "auto", for the goodput controller with the step's positions (every sequence's).
        A guidance companion is left out of both: it commits its request's tokens, and its
        drafts, its request's, are not verified against the distribution it takes tokens from."""
        num_reqs = len(lengths)
        req_ids = self.batch.req_ids  # the step's plan brought them up to date
        if self.batch.has_companions:
            real = [i for i, c in enumerate(self.batch.companion_of) if c is None]
            req_ids = [req_ids[i] for i in real]
            lengths, accepted = [lengths[i] for i in real], [accepted[i] for i in real]
        self.stats.add(len(req_ids), sum(accepted) + len(req_ids), sum(lengths), self.states)
        if self.config.draft_token_budget != AUTO:
            return
        positions = int(self.runner.query_start_loc.np[num_reqs])
        self.goodput.observe_step(positions, req_ids, full_step, lengths, accepted)

    # What the proposer hands vLLM ----------------------------------------------------------------

    def windows(self, num_tokens_no_spec) -> list[list[int]]:
        """Each running request's drafts for its next pass, in batch order: its kept window if
        it follows what the request committed, trimmed to what it may still generate, through
        the guard."""
        req_ids = self.runner.input_batch.req_ids
        if not self._windows_open:
            return [[] for _ in req_ids]
        self.batch.update(req_ids, self.runner.input_batch.num_prompt_tokens[: len(req_ids)])
        committed = np.asarray(num_tokens_no_spec[: len(req_ids)], dtype=np.int64)
        allowed = self.batch.drafts_allowed(committed)
        drafts = []
        for req_id, state, start, most in zip(req_ids, self.batch.request_states, committed.tolist(), allowed.tolist()):
            window = state.window
            if window is None or window.start != start:
                drafts.append([])
            else:
                drafts.append(self.guard(req_id, window.tokens[:most]))
        return drafts


def runtime_of(llm) -> SJDPPRuntime:
    """The SJD++ runtime of an in-process `vllm.LLM` (VLLM_ENABLE_V1_MULTIPROCESSING=0, one
    worker): for tests and benchmarks that read or steer the engine's SJD++ state."""
    runtime = getattr(llm.llm_engine.model_executor.driver_worker.worker.model_runner, "sjdpp", None)
    if runtime is None:
        raise ValueError("this engine does not run SJD++ (no --speculative-config sjdpp)")
    return runtime
