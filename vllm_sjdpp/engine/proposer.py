"""The drafter vLLM calls each step (method "custom_class"): it hands back SJD++ windows.

The windows are made by `SJDPPSampler` during verification, where the target distributions of
every window position are at hand; proposing is only reading them out, trimmed to what the
request may still generate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ADDITIONAL_CONFIG_KEY, SJDPPConfig
from ..families import logits_size
from .jacobi_state import JacobiStates
from .sampler import SJDPPSampler, logger


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


class SJDPPProposer:
    def __init__(self, vllm_config: Any):
        options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        self.max_model_len = vllm_config.model_config.max_model_len
        vocab_size = logits_size(vllm_config.model_config)
        self.states = JacobiStates(SJDPPConfig.from_dict(options), vocab_size)
        self.guard = DraftGuard(vocab_size)
        self.runner = None

    def load_model(self, model: Any) -> None:
        """Nothing to load: SJD++ drafts from the target model's own distributions."""

    def attach(self, runner: Any) -> None:
        self.runner = runner
        runner.rejection_sampler = SJDPPSampler(runner, self.states)

    @property
    def config(self) -> SJDPPConfig:
        """The server's SJD++ options (the Jacobi states hold the one copy)."""
        return self.states.config

    def set_draft_token_budget(self, budget: int | None) -> None:
        """Change the server's draft-token budget while it runs (in-process benchmarks, tests)."""
        self.states.config = dataclasses.replace(self.states.config, draft_token_budget=budget)

    def release(self, req_id: str) -> None:
        self.states.release(req_id)

    def propose(
        self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_: Any
    ) -> list[list[int]]:
        try:
            return self._windows(num_tokens_no_spec)
        except Exception:  # never take the engine down: a step without drafts is exact
            req_ids = self.runner.input_batch.req_ids
            logger.exception("SJD++ proposer failed for requests %s: no drafts this step", req_ids)
            self.states.drop_windows(req_ids)
            return [[] for _ in req_ids]

    def _windows(self, num_tokens_no_spec) -> list[list[int]]:
        runner = self.runner
        self.states.retain(set(runner.requests))
        drafts = []
        for row, req_id in enumerate(runner.input_batch.req_ids):
            state = self.states.requests.get(req_id)
            window = state.window if state else None
            start = int(num_tokens_no_spec[row])
            if window is None or window.start != start:
                drafts.append([])
                continue
            request = runner.requests[req_id]
            left = self.max_model_len - start
            max_tokens = request.sampling_params.max_tokens
            if max_tokens is not None:
                left = min(left, max_tokens - len(request.output_token_ids))
            # A pass commits its accepted drafts plus one token: never draft past the end.
            drafts.append(self.guard(req_id, window.tokens[: max(0, left - 1)]))
        return drafts
