"""SJD++ in the place of vLLM's rejection sampler: a thin adapter onto the runner's runtime.

vLLM computes the logits of all k_i + 1 window positions of each request (rows after a rejection
included) and hands them to `runner.rejection_sampler`.  This subclass plans the step with the
runtime's per-request state, runs vLLM's own logits processing (penalties, allowed tokens, bad
words, min tokens, temperature, top-k, top-p) on every row, then the fused SJD++ step: it
verifies the drafts, commits, and the runtime keeps each request's next window, which
`SJDPPProposer.propose` hands back to vLLM a moment later.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler, apply_sampling_constraints

from ..kernels import REUSE_CODES, FreshTokens, StepBatch, StepNoise, sjdpp_step
from .runtime import SJDPPRuntime, StepPlan

GREEDY_EPS = 1e-5  # vLLM's sampler treats temperature below this as greedy


def first_rows_of(metadata, logits: torch.Tensor) -> torch.Tensor:
    """Each request's first row (its next token's distribution given what it committed), as a
    copy: later processing works on `logits` in place."""
    cu = metadata.cu_num_sampled_tokens.long()
    return logits[torch.cat([cu.new_zeros(1), cu[:-1]])]


def greedy_on_host(sampling_metadata, input_batch, num_reqs: int) -> np.ndarray:
    """Which requests sample greedily (vLLM's rule: temperature below GREEDY_EPS), from the
    host copy of the temperatures vLLM keeps."""
    if sampling_metadata.all_greedy:
        return np.ones(num_reqs, dtype=bool)
    return input_batch.temperature_cpu[:num_reqs] < GREEDY_EPS


class SJDPPSampler(RejectionSampler):
    def __init__(self, runner, runtime: SJDPPRuntime):
        super().__init__(runner.sampler, runner.speculative_config, runner.device)
        self.runner = runner
        self.runtime = runtime
        self.seed_probe = None  # set while the start-up seed probe runs (engine.seed_probe)

    def forward(self, metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput:
        input_batch = self.runner.input_batch
        num_reqs = len(metadata.num_draft_tokens)
        if num_reqs != input_batch.num_reqs:  # a warm-up call on a dummy batch
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        if self.seed_probe is not None:
            scheduled = np.diff(self.runner.query_start_loc.np[: num_reqs + 1])
            self.seed_probe.record(input_batch, metadata, logits, scheduled)

        raw_logits = logits
        first_rows = None
        try:
            plan = self.runtime.plan(metadata)
            if plan.windowless:
                return self._plain_decoding_step(plan, logits, sampling_metadata)
            if sampling_metadata.max_num_logprobs is not None and not self.is_processed_logprobs_mode:
                raw_logits = logits.clone()  # processing below works in place
            first_rows = first_rows_of(metadata, logits)  # unprocessed, for the fallback
            output_token_ids, processed = self._sjdpp_step(plan, metadata, logits, sampling_metadata)
        except Exception as error:  # never take the engine down: a plain step is exact
            req_ids = input_batch.req_ids[:num_reqs]
            self.runtime.fallbacks.record("step", error, req_ids)
            rows = first_rows if first_rows is not None else first_rows_of(metadata, logits)
            output_token_ids, processed = self._plain_step(metadata, rows, sampling_metadata), None
        logprobs = self._logprobs(metadata, sampling_metadata, raw_logits, processed, output_token_ids)
        return SamplerOutput(sampled_token_ids=output_token_ids.to(torch.int32), logprobs_tensors=logprobs)

    def _logprobs(self, metadata, sampling_metadata, raw_logits, processed, output_token_ids):
        """vLLM's logprobs of the committed tokens, from the raw or the processed logits as the
        engine's logprobs mode says; None where none are asked for."""
        if sampling_metadata.max_num_logprobs is None:
            return None
        source = processed if self.is_processed_logprobs_mode and processed is not None else raw_logits.float()
        return self._get_logprobs_tensors(
            sampling_metadata.max_num_logprobs,
            metadata,
            source,
            source[metadata.target_logits_indices],
            source[metadata.bonus_logits_indices],
            output_token_ids,
        )

    def _sjdpp_step(self, plan: StepPlan, metadata, logits, sampling_metadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Verify, commit and build the next windows: ([requests, max drafts + 1] committed
        tokens, PLACEHOLDER after each request's last), and the processed logits."""
        num_reqs = len(plan.counts)
        counts, start, states, next_len = plan.counts, plan.start, plan.states, plan.next_len
        jacobi = self.runtime.states
        processed = self._process_all_rows(logits, metadata, sampling_metadata, plan.per_request)
        probs = processed.softmax(-1, dtype=torch.float32)
        configs = [s.config or jacobi.config for s in states]
        keys = {i: (s.noise_key, n0) for i, (s, n0) in enumerate(zip(states, start)) if s.noise_key is not None}

        device = probs.device
        # The per-request settings are read on the host, where the step's plan runs (vLLM keeps
        # them there too: drafts, counts and temperatures), so the step starts with no read of
        # the device.
        rows = np.array(plan.prob_rows, dtype=np.int64)
        step_batch = StepBatch(
            cu_num_draft_tokens=np.cumsum(counts, dtype=np.int64),
            target_probs=probs,
            draft_token_ids=np.array([t for d in plan.per_request for t in d], dtype=np.int64),
            draft_probs=jacobi.proposals,
            draft_is_onehot=rows < 0,
            greedy=greedy_on_host(sampling_metadata, self.runner.input_batch, num_reqs),
            reuse=np.array([REUSE_CODES[c.reuse] for c in configs], dtype=np.int64),
            threshold=np.array([c.threshold for c in configs], dtype=np.float32),
            next_window_len=np.array(next_len, dtype=np.int64),
            draft_prob_rows=np.maximum(rows, 0),
            gumbel=np.array([s.noise_key is not None for s in states]),
        )
        grids = self.runtime.request_grids(num_reqs)
        # A request's image rows are its grid's, where the model has one (Emu3: a size per request).
        widths = [c.row_width for c in configs] if grids is None else [g.row_width for g in grids]
        fresh = FreshTokens.build(
            [c.init for c in configs],
            [s.fresh_vocab or range(1) for s in states],  # plain requests draw no fresh tokens
            self.runtime.history(start, max(w or 1 for w in widths)),
            widths,
            self.runtime.grid,
            np.asarray(start) - self.runner.input_batch.num_prompt_tokens[:num_reqs],
            grids,
        )
        noise = StepNoise.sample_per_request(
            [n + 1 for n in counts], next_len, probs.shape[1], sampling_metadata.generators, device, keys
        )
        out_buffer = jacobi.next_buffer(sum(next_len), probs.shape[1], probs.dtype, device)
        out = sjdpp_step(step_batch, noise, fresh, next_probs_out=out_buffer)
        self.runtime.record_windows(plan, out)
        return out.output_token_ids, processed

    def _plain_decoding_step(self, plan: StepPlan, logits, sampling_metadata) -> SamplerOutput:
        """A windowless step is plain decoding: nothing to verify, nothing to draft.  So the
        runner's sampler takes it, logprobs included: vLLM's, whose seeded rows race the same
        position-keyed noise as the step below (`race_sampler`), so a seed's token does not depend
        on whether its batch drafts."""
        output = self.sampler(logits, sampling_metadata)
        self.runtime.close_windows(plan)  # after sampling: the controller times the step at its end
        return output

    def _plain_step(self, metadata, first_rows, sampling_metadata) -> torch.Tensor:
        """Plain sampling of each request's first row (its next token after what it committed,
        as exact as decoding without drafts), with vLLM's sampler; the windows are dropped, so
        the next pass has no drafts and the step after it drafts afresh."""
        self.runtime.drop_windows(self.runner.input_batch.req_ids[: first_rows.shape[0]])
        sampled = self.sampler(first_rows, replace(sampling_metadata, max_num_logprobs=None)).sampled_token_ids
        out = torch.full(
            (first_rows.shape[0], max(metadata.num_draft_tokens, default=0) + 1), PLACEHOLDER_TOKEN_ID,
            dtype=torch.long, device=first_rows.device,
        )
        out[:, 0] = sampled.view(-1).long()
        return out

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
