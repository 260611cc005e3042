"""SJD++ in the place of vLLM's rejection sampler.

vLLM computes the logits of all k_i + 1 window positions of each request (rows after a rejection
included) and hands them to `runner.rejection_sampler`.  This subclass runs vLLM's own logits
processing (penalties, allowed tokens, bad words, min tokens, temperature, top-k, top-p) on every
row, then the fused SJD++ step: it verifies the drafts, commits, and prepares each request's next
window, which `SJDPPProposer.propose` hands back to vLLM a moment later.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler, apply_sampling_constraints

from .batch_requests import BatchRequests
from ..config import AUTO, AUTO_FALLBACK_BUDGET
from .goodput import GoodputController
from .jacobi_state import JacobiStates, Window
from ..kernels import REUSE_CODES, FreshTokens, StepBatch, StepNoise, sjdpp_step
from ..kernels.row_pass_torch import race_winner_
from .window_budget import share_draft_budget

# Under "vllm." so that vLLM's logging configuration (handlers, level) applies in every process.
logger = init_logger("vllm.sjdpp")

GREEDY_EPS = 1e-5  # vLLM's sampler treats temperature below this as greedy


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


def step_memory_bytes(max_num_seqs: int, max_num_batched_tokens: int, k: int, budget: int | None, vocab: int) -> int:
    """The most memory one SJD++ step holds beyond vLLM's own sampling, for vLLM's KV sizing.

    Rows: every window position of every running request, at most max_num_batched_tokens.  Per
    row, float32 over the vocabulary: the processed logits, the probabilities, the race noise,
    a copy of the raw logits (when logprobs are asked for) and one temporary of the row pass.
    Plus the two q-row buffers (drafts with a full proposal, at most the draft-token budget) and
    each request's first row, kept for the fallback.
    """
    rows = min(max_num_seqs * (k + 1), max_num_batched_tokens)
    cap = budget if isinstance(budget, int) else max_num_seqs * k  # "auto" may draft every window
    drafts = min(max_num_seqs * k, max_num_batched_tokens, cap)
    return 4 * vocab * (5 * rows + 2 * drafts + max_num_seqs)


def first_rows_of(metadata, logits: torch.Tensor) -> torch.Tensor:
    """Each request's first row (its next token's distribution given what it committed), as a
    copy: later processing works on `logits` in place."""
    cu = metadata.cu_num_sampled_tokens.long()
    return logits[torch.cat([cu.new_zeros(1), cu[:-1]])]


def greedy_requests(sampling_metadata, num_reqs: int, device) -> torch.Tensor:
    """Which requests sample greedily (vLLM's rule: temperature below GREEDY_EPS)."""
    if sampling_metadata.all_greedy:
        return torch.ones(num_reqs, dtype=torch.bool, device=device)
    return sampling_metadata.temperature[:num_reqs] < GREEDY_EPS


@dataclass
class StepPlan:
    """Per request: its drafts this pass, where its committed tokens end, its Jacobi state, the
    proposal row of each draft (-1: one-hot) and the length of its next window."""

    counts: list[int]
    per_request: list[list[int]]
    start: list[int]
    states: list
    prob_rows: list[int]
    next_len: list[int]

    @property
    def windowless(self) -> bool:
        return not any(self.counts) and not any(self.next_len)


class SJDPPSampler(RejectionSampler):
    def __init__(self, runner, states: JacobiStates):
        super().__init__(runner.sampler, runner.speculative_config, runner.device)
        self.runner = runner
        self.states = states
        self.batch = BatchRequests(states, runner)
        self.max_model_len = runner.model_config.max_model_len
        self.goodput = GoodputController(states.config.num_speculative_tokens)
        self.stats = StepStats(
            lambda: f"; {self.goodput.summary()}" if self.states.config.draft_token_budget == AUTO else ""
        )
        # Every worker runs this step; timings differ between them, windows must not.
        self.adaptive = runner.parallel_config.world_size == 1
        if states.config.draft_token_budget == AUTO and not self.adaptive:
            logger.warning(
                "SJD++: draft_token_budget=%r needs a single worker; with %d it is a fixed %d",
                AUTO, runner.parallel_config.world_size, AUTO_FALLBACK_BUDGET,
            )

    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        input_batch = self.runner.input_batch
        num_reqs = len(metadata.num_draft_tokens)
        if num_reqs != input_batch.num_reqs:  # a warm-up call on a dummy batch
            return super().forward(metadata, draft_probs, logits, sampling_metadata)

        raw_logits = logits
        first_rows = None
        try:
            plan = self._plan(metadata)
            if plan.windowless and not sampling_metadata.generators:
                return self._plain_decoding_step(plan, logits, sampling_metadata)
            if sampling_metadata.max_num_logprobs is not None and not self.is_processed_logprobs_mode:
                raw_logits = logits.clone()  # processing below works in place
            if plan.windowless:
                output_token_ids, processed = self._windowless_step(plan, metadata, logits, sampling_metadata)
            else:
                first_rows = first_rows_of(metadata, logits)  # unprocessed, for the fallback
                output_token_ids, processed = self._sjdpp_step(plan, metadata, logits, sampling_metadata)
        except Exception:
            req_ids = input_batch.req_ids[:num_reqs]
            logger.exception(
                "SJD++ step failed for requests %s: this step samples each request's next token "
                "plainly and drops their windows", req_ids,
            )
            rows = first_rows if first_rows is not None else first_rows_of(metadata, logits)
            output_token_ids, processed = self._plain_step(metadata, rows, sampling_metadata), None

        logprobs = None
        if sampling_metadata.max_num_logprobs is not None:
            source = processed if self.is_processed_logprobs_mode and processed is not None else raw_logits.float()
            logprobs = self._get_logprobs_tensors(
                sampling_metadata.max_num_logprobs,
                metadata,
                source,
                source[metadata.target_logits_indices],
                source[metadata.bonus_logits_indices],
                output_token_ids,
            )
        return SamplerOutput(sampled_token_ids=output_token_ids.to(torch.int32), logprobs_tensors=logprobs)

    def _plan(self, metadata) -> StepPlan:
        """The step's bookkeeping, before any work over the vocabulary."""
        input_batch = self.runner.input_batch
        num_reqs = len(metadata.num_draft_tokens)
        batch = self.batch
        batch.update(input_batch.req_ids[:num_reqs])
        committed = input_batch.num_tokens_no_spec[:num_reqs]
        wanted = batch.windows_wanted(
            committed,
            input_batch.num_prompt_tokens[:num_reqs],
            self.runner.discard_request_mask.np[:num_reqs],
            self.max_model_len,
        )
        counts = list(metadata.num_draft_tokens)
        start = committed.tolist()
        states = batch.request_states
        if any(counts):
            drafts = metadata.draft_token_ids.tolist()
            ends = list(itertools.accumulate(counts))
            per_request = [drafts[end - n : end] for n, end in zip(counts, ends)]
            prob_rows = [
                row for state, n0, d in zip(states, start, per_request) for row in self.states.drafts_usable(state, n0, d)
            ]
        else:
            per_request, prob_rows = [[] for _ in counts], []
        return StepPlan(counts, per_request, start, states, prob_rows, self._share(wanted.tolist(), batch.seeded))

    def _share(self, wanted: list[int], seeded: list[bool]) -> list[int]:
        """The next windows' lengths under the server's draft-token budget."""
        budget = self.states.config.draft_token_budget
        if budget != AUTO:
            return share_draft_budget(wanted, budget)
        if not self.adaptive:
            return share_draft_budget(wanted, AUTO_FALLBACK_BUDGET)
        # Seeded requests keep their windows: their draws, hence their tokens, follow the lengths.
        if not any(seeded):
            return self.goodput.windows(wanted, [])
        adapted = iter(self.goodput.windows(
            [w for w, s in zip(wanted, seeded) if not s], [w for w, s in zip(wanted, seeded) if s]
        ))
        return [w if s else next(adapted) for w, s in zip(wanted, seeded)]

    def _observe(self, num_reqs: int, full_step: bool, lengths, accepted) -> None:
        """The step's cost and acceptance, for the goodput controller."""
        if self.states.config.draft_token_budget != AUTO:
            return
        positions = int(self.runner.query_start_loc.np[num_reqs])
        req_ids = self.runner.input_batch.req_ids[:num_reqs]
        self.goodput.observe_step(positions, req_ids, full_step, lengths, accepted)

    def _sjdpp_step(self, plan: StepPlan, metadata, logits, sampling_metadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify, commit and build the next windows: ([requests, max drafts + 1] committed
        tokens, PLACEHOLDER after each request's last), and the processed logits."""
        num_reqs = len(plan.counts)
        counts, start, states, next_len = plan.counts, plan.start, plan.states, plan.next_len
        processed = self._process_all_rows(logits, metadata, sampling_metadata, plan.per_request)
        probs = processed.softmax(-1, dtype=torch.float32)
        configs = [s.config or self.states.config for s in states]

        device = probs.device
        # The per-request settings are read on the host, where the step's plan runs.
        rows = np.array(plan.prob_rows, dtype=np.int64)
        step_batch = StepBatch(
            cu_num_draft_tokens=metadata.cu_num_draft_tokens,
            target_probs=probs,
            draft_token_ids=metadata.draft_token_ids,
            draft_probs=self.states.proposals,
            draft_is_onehot=rows < 0,
            greedy=greedy_requests(sampling_metadata, num_reqs, device),
            reuse=np.array([REUSE_CODES[c.reuse] for c in configs], dtype=np.int64),
            threshold=np.array([c.threshold for c in configs], dtype=np.float32),
            next_window_len=np.array(next_len, dtype=np.int64),
            draft_prob_rows=np.maximum(rows, 0),
        )
        fresh = FreshTokens.build(
            [c.init for c in configs],
            [s.fresh_vocab or range(1) for s in states],  # plain requests draw no fresh tokens
            self._history(start, max(c.row_width or 1 for c in configs)),
            [c.row_width for c in configs],
        )
        noise = StepNoise.sample_per_request(
            [n + 1 for n in counts], next_len, probs.shape[1], sampling_metadata.generators, device
        )
        out_buffer = self.states.next_buffer(sum(next_len), probs.shape[1], probs.dtype, device)
        out = sjdpp_step(step_batch, noise, fresh, next_probs_out=out_buffer)
        accepted = self._record_windows(states, start, next_len, out)
        self.stats.add(num_reqs, sum(accepted) + num_reqs, sum(counts), self.states)
        self._observe(num_reqs, True, counts, accepted)
        return out.output_token_ids, processed

    def _plain_decoding_step(self, plan: StepPlan, logits, sampling_metadata) -> SamplerOutput:
        """A windowless step without seeded requests is plain decoding: nothing to verify,
        nothing to draft, and no seed whose draws must follow the race's.  So vLLM's own sampler
        takes it, logprobs included (on CPU a fused Gumbel-max over the logits, without the
        softmax and the noise tensor that the race needs)."""
        output = self.sampler(logits, sampling_metadata)
        self._close_windows(plan)  # after sampling: the controller times the step at its end
        return output

    def _windowless_step(self, plan: StepPlan, metadata, logits, sampling_metadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The step when no request has drafts to verify or will draft next, and some are seeded:
        each request's one row is raced exactly as `sjdpp_step` races a bonus row, from the same
        noise drawn in the same order, without the rest of the step.  So a seeded request's token
        does not depend on whether the others in its batch draft."""
        processed = self._process_all_rows(logits, metadata, sampling_metadata, plan.per_request)
        probs = processed.softmax(-1, dtype=torch.float32)
        num_reqs = len(plan.counts)
        noise = StepNoise.sample_per_request(
            [1] * num_reqs, [0] * num_reqs, probs.shape[1], sampling_metadata.generators, probs.device
        )
        greedy_token = None if sampling_metadata.all_random else probs.argmax(-1)
        if sampling_metadata.all_greedy:
            token = greedy_token
        else:
            token = race_winner_(probs, noise.exponentials)
            if greedy_token is not None:
                token = torch.where(greedy_requests(sampling_metadata, num_reqs, probs.device), greedy_token, token)
        self._close_windows(plan)
        return token.view(-1, 1), processed

    def _close_windows(self, plan: StepPlan) -> None:
        """A windowless step's bookkeeping: one token per request, no window after it."""
        for state in plan.states:
            state.window = None
        num_reqs = len(plan.counts)
        self.stats.add(num_reqs, num_reqs, 0, self.states)
        self._observe(num_reqs, False, plan.counts, plan.counts)

    def _plain_step(self, metadata, first_rows, sampling_metadata) -> torch.Tensor:
        """Plain sampling of each request's first row (its next token after what it committed,
        as exact as decoding without drafts), with vLLM's sampler; the windows are dropped, so
        the next pass has no drafts and the step after it drafts afresh."""
        self.states.drop_windows(self.runner.input_batch.req_ids[: first_rows.shape[0]])
        sampled = self.sampler(first_rows, replace(sampling_metadata, max_num_logprobs=None)).sampled_token_ids
        out = torch.full(
            (first_rows.shape[0], max(metadata.num_draft_tokens, default=0) + 1), PLACEHOLDER_TOKEN_ID,
            dtype=torch.long, device=first_rows.device,
        )
        out[:, 0] = sampled.view(-1).long()
        return out

    def _history(self, start: list[int], length: int) -> np.ndarray:
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

    def _process_all_rows(self, logits, metadata, sampling_metadata, per_request):
        """vLLM's processing of draft rows, applied to the bonus rows as well.

        Row j of a request sees the drafts before it; appending one dummy draft per request
        makes vLLM's draft-row processing cover the k_i + 1 rows (the dummy is never read).
        """
        all_rows = replace(metadata, num_draft_tokens=[len(d) + 1 for d in per_request])
        with_dummy = replace(sampling_metadata, spec_token_ids=[d + [0] for d in per_request])
        x = logits.to(torch.float32)
        x = self.apply_logits_processors(x, with_dummy, all_rows)
        return apply_sampling_constraints(x, metadata.cu_num_sampled_tokens, sampling_metadata)

    def _record_windows(self, states, start, next_len, out) -> list[int]:
        """Keep each request's next window; returns the drafts each request had accepted."""
        accepted = out.num_accepted.tolist()
        tokens = out.next_draft_token_ids.tolist()
        rows = out.next_draft_prob_rows.tolist()
        generation = self.states.generation + 1
        offset = 0
        for state, n0, n, a in zip(states, start, next_len, accepted):
            state.window = (
                Window(n0 + a + 1, tokens[offset : offset + n], rows[offset : offset + n], generation)
                if n
                else None
            )
            offset += n
        self.states.advance()
        return accepted

