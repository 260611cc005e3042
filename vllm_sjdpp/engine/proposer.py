"""The drafter vLLM calls each step (method "custom_class"): it hands back SJD++ windows.

The windows are made by `SJDPPSampler` during verification, where the target distributions of
every window position are at hand, and kept by the runner's `SJDPPRuntime`; proposing is only
reading them out (`SJDPPRuntime.windows`: trimmed to what each request may still generate,
through the draft guard).
"""

from __future__ import annotations

from typing import Any

from .runtime import SJDPPRuntime


class SJDPPProposer:
    def __init__(self, vllm_config: Any):
        self.runtime: SJDPPRuntime | None = None  # attached by the runner patch

    def load_model(self, model: Any) -> None:
        """Nothing to load: SJD++ drafts from the target model's own distributions."""

    def propose(
        self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None, **_: Any
    ) -> list[list[int]]:
        runtime = self.runtime
        try:
            return runtime.windows(num_tokens_no_spec)
        except Exception as error:  # never take the engine down: a step without drafts is exact
            req_ids = runtime.runner.input_batch.req_ids
            runtime.fallbacks.record("proposal", error, req_ids)
            runtime.drop_windows(req_ids)
            return [[] for _ in req_ids]
