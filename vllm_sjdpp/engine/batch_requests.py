"""The running batch's per-request facts in batch order, for the step's plan.

A step's plan needs, per request, its Jacobi state and what bounds its next window (its SJD++
options, max_tokens, whether its windows are pinned), and which request a guidance companion
runs for.  None of that changes while a request runs, so it is
gathered once per batch composition into arrays, and each step computes the windows wanted with
a few array operations instead of a Python loop over the requests (at 64 requests the loop took
about 0.3 ms of a 12 ms digit-model step); the bounds that do not move while a request runs
(where its drafting starts, where its sequence must end) are folded once per batch as well.  A
streaming session's new turn, which keeps its request id with a new prompt, is forgotten first
(`patches.gpu_model_runner`), so its facts are gathered afresh.
"""

from __future__ import annotations

import numpy as np

from ..config import COMPANION_OF_KEY
from .jacobi_state import JacobiStates

NO_LIMIT = np.iinfo(np.int64).max // 2


class BatchRequests:
    """Per-request facts of the runner's batch, rebuilt when the batch's requests or order change."""

    def __init__(self, states: JacobiStates, runner):
        self.states = states
        self.runner = runner
        self.max_model_len = runner.model_config.max_model_len
        self.req_ids: tuple[str, ...] = ()
        self.request_states: list = []
        self.pinned: list[bool] = []
        self.companion_of: list[str | None] = []  # per request: the request it is the companion of
        self.has_companions = False
        self._window = self._first_draft = self._end = np.zeros(0, dtype=np.int64)

    def update(self, req_ids: list[str], prompt_len: np.ndarray) -> None:
        """The batch's requests in batch order, with their prompts' lengths."""
        key = tuple(req_ids)
        if key == self.req_ids:
            return
        requests = [self.runner.requests[r] for r in req_ids]
        prompt_len = np.asarray(prompt_len, dtype=np.int64)
        self.req_ids = key
        self.request_states = [self.states.get(r, q.sampling_params) for r, q in zip(req_ids, requests)]
        configs = [s.config for s in self.request_states]
        # A request decoded plainly (no config) never wants drafts: a window of 0.
        self._window = np.array([c.num_speculative_tokens if c else 0 for c in configs], dtype=np.int64)
        # The first committed length from which a request drafts (its jacobi_start-th generated
        # token is committed by the pass that verifies them), and the most tokens its sequence
        # may reach (max_tokens generated, the context).
        jacobi_start = np.array([c.jacobi_start if c else 0 for c in configs], dtype=np.int64)
        self._first_draft = prompt_len + jacobi_start - 1
        max_tokens = np.array(
            [NO_LIMIT if q.sampling_params.max_tokens is None else q.sampling_params.max_tokens for q in requests],
            dtype=np.int64,
        )
        self._end = np.minimum(prompt_len + max_tokens, self.max_model_len)
        # Seeded and verified by the ratio test: their draws, hence their tokens, follow the
        # window lengths, so these keep their full windows.
        self.pinned = [q.sampling_params.seed is not None and s.noise_key is None for q, s in zip(requests, self.request_states)]
        self.companion_of = [
            (q.sampling_params.extra_args or {}).get(COMPANION_OF_KEY) if q.sampling_params is not None else None
            for q in requests
        ]
        self.has_companions = any(c is not None for c in self.companion_of)

    def forget(self, req_id: str) -> None:
        """A request is gone: rebuild at the next update, even if a new request reuses its id
        in the same place."""
        if req_id in self.req_ids:
            self.req_ids = ()

    def drafts_allowed(self, committed: np.ndarray) -> np.ndarray:
        """The most drafts a pass may verify after `committed` tokens: it commits its accepted
        drafts plus one, and never past max_tokens or the context."""
        return np.maximum(self._end - committed - 1, 0)

    def windows_wanted(self, start: np.ndarray, discard: np.ndarray) -> np.ndarray:
        """Drafts worth making for each request's next pass: none before jacobi_start, none for a
        request whose sampled token is thrown away (a partial prefill), and at most what the next
        pass may verify, after this pass commits at least one token."""
        wanted = np.minimum(self._window, self._end - start - 2)
        wanted[discard | (start < self._first_draft)] = 0
        return np.maximum(wanted, 0, out=wanted)
