"""The drafter vLLM calls each step (method "custom_class"): it hands back SJD++ windows.

The windows are made by `SJDPPSampler` during verification, where the target distributions of
every window position are at hand; proposing is only reading them out, trimmed to what the
request may still generate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ADDITIONAL_CONFIG_KEY, SJDPPConfig
from .families import logits_size
from .jacobi_state import JacobiStates
from .sampler import SJDPPSampler, logger


class SJDPPProposer:
    def __init__(self, vllm_config: Any):
        options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        self.max_model_len = vllm_config.model_config.max_model_len
        self.states = JacobiStates(SJDPPConfig.from_dict(options), logits_size(vllm_config.model_config))
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
            drafts.append(window.tokens[: max(0, left - 1)])
        return drafts
