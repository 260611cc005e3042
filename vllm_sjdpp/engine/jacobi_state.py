"""Per-request Jacobi windows kept between engine steps, and the buffers holding their q rows.

A window is trusted only as it was made: the drafts vLLM schedules must be a prefix of it and
follow the same committed length, and its q rows must still be in the buffer of the step that
wrote them.  Anything else (drafts vLLM made up, a preempted and resumed request, a request that
sat out a step) is verified with one-hot proposals, which is exact for any draft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import SJDPPConfig


def noise_key(seed: int | None) -> int:
    """A request's race-noise key: its seed, so that a seed names one image with SJD++ on or
    off; without one, a random key from the global generator (every worker of a tensor-parallel
    engine draws the same, as for the rest of their sampling)."""
    if seed is not None:
        return seed
    return int(torch.randint(0, 2**62, (1,)).item()) + 2**63  # never a 63-bit seed's key


@dataclass
class Window:
    start: int  # committed tokens (prompt + output) that the first draft follows
    tokens: list[int]
    prob_rows: list[int]  # row of the proposal buffer per draft, -1 for a one-hot q
    generation: int  # the step that wrote the rows


@dataclass
class RequestState:
    config: SJDPPConfig | None  # None: this request decodes plainly
    window: Window | None = None
    fresh_vocab: range | list[int] = field(default_factory=list)
    # The key of its position-keyed race noise (its seed, else a random one); None: verified by
    # the ratio test, its noise from its generator or the global one.
    noise_key: int | None = None


class JacobiStates:
    """Windows by request id, and two proposal buffers that steps write in turn."""

    def __init__(self, config: SJDPPConfig, vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size
        self.requests: dict[str, RequestState] = {}
        self.generation = 0
        self._buffers: list[torch.Tensor | None] = [None, None]

    def get(self, req_id: str, sampling_params) -> RequestState:
        state = self.requests.get(req_id)
        if state is None:
            # Options were validated when the request arrived (patches.input_processor).
            config = self.config.for_request(sampling_params.extra_args)
            vocab = config.fresh_vocab(self.vocab_size) if config else []
            keyed = config is None or config.verification == "gumbel"
            state = self.requests[req_id] = RequestState(
                config, fresh_vocab=vocab, noise_key=noise_key(sampling_params.seed) if keyed else None
            )
        return state

    def drop_windows(self, req_ids) -> None:
        """Forget these requests' windows: their next pass has no drafts to verify."""
        for req_id in req_ids:
            state = self.requests.get(req_id)
            if state is not None:
                state.window = None

    def release(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
        if not self.requests:  # idle: give the proposal buffers back
            self._buffers = [None, None]

    def drafts_usable(self, state: RequestState, start: int, drafts: list[int]) -> list[int]:
        """Proposal rows for `drafts` (-1: one-hot) after checking they are the window's."""
        w = state.window
        if (
            w is None
            or w.start != start
            or w.generation != self.generation
            or w.tokens[: len(drafts)] != drafts
        ):
            return [-1] * len(drafts)
        return w.prob_rows[: len(drafts)]

    @property
    def proposals(self) -> torch.Tensor | None:
        """The buffer the last step wrote its q rows to."""
        return self._buffers[self.generation % 2]

    def next_buffer(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer the coming step writes to (never the one it reads from)."""
        i = (self.generation + 1) % 2
        buf = self._buffers[i]
        fits = buf is not None and buf.shape[1] == vocab and buf.dtype == dtype
        if not fits or not rows <= buf.shape[0] <= max(4 * rows, 64):
            # Twice what is needed: batches vary from step to step, and a batch that shrank
            # gives its memory back.
            self._buffers[i] = None
            buf = self._buffers[i] = torch.empty(max(2 * rows, 1), vocab, dtype=dtype, device=device)
        return buf

    def advance(self) -> None:
        self.generation += 1

    def state_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers if b is not None)
