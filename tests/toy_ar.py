"""A tiny autoregressive model and a batched SJD++ decoding loop around it.

The model is a fixed table of next-token distributions given the last two tokens, small enough
that whole-sequence distributions can be counted.  It is where the step's exactness is checked
end to end (plain AR sampling against Jacobi decoding, in every mode) and where step compression
is measured without an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vllm_sjdpp.config import SJDPPConfig
from vllm_sjdpp.kernels import REUSE_CODES, FreshTokens, StepBatch, StepNoise, StepOutput, sjdpp_step
from vllm_sjdpp.kernels.noise import keyed_exponentials_numpy, row_keys


@dataclass
class TableARModel:
    table: torch.Tensor  # [V, V, V]: p(x_t | x_{t-2}, x_{t-1})
    prompt: tuple[int, int] = (0, 1)

    @classmethod
    def random(cls, vocab_size: int, sharpness: float = 2.0, seed: int = 0) -> "TableARModel":
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(vocab_size, vocab_size, vocab_size, generator=g) * sharpness
        return cls(torch.softmax(logits, -1))

    @property
    def vocab_size(self) -> int:
        return self.table.shape[-1]

    def next_probs(self, before_last: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return self.table[before_last, last]


def sample_plain(
    model: TableARModel, num_sequences: int, length: int, seed: int = 0, greedy: bool = False
) -> torch.Tensor:
    """Reference: one token per step. Returns [N, length]."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.tensor(model.prompt).repeat(num_sequences, 1)
    for _ in range(length):
        p = model.next_probs(seq[:, -2], seq[:, -1])
        nxt = p.argmax(-1, keepdim=True) if greedy else torch.multinomial(p, 1, generator=g)
        seq = torch.cat([seq, nxt], 1)
    return seq[:, 2:]


def sample_plain_race(model: TableARModel, keys: list[int], length: int) -> torch.Tensor:
    """Reference for Gumbel coupling: plain decoding racing p_t against the position-keyed noise
    E(key, t, .), t counted from the start of the prompt.  Returns [N, length]."""
    seq = torch.tensor(model.prompt).repeat(len(keys), 1)
    for t in range(len(model.prompt), len(model.prompt) + length):
        p = model.next_probs(seq[:, -2], seq[:, -1])
        e = keyed_exponentials_numpy(*row_keys(np.array(keys, dtype=np.uint64), np.full(len(keys), t)), model.vocab_size)
        seq = torch.cat([seq, (p / torch.from_numpy(e)).argmax(-1, keepdim=True)], 1)
    return seq[:, len(model.prompt):]


def position_keys(keys, active, start, steps):
    """What the engine passes: request i's key and the absolute position of its first row."""
    return {i: (keys[r], s) for i, (r, s) in enumerate(zip(active.tolist(), start.tolist()))}


def sample_sjdpp(
    model: TableARModel,
    num_sequences: int,
    length: int,
    config: SJDPPConfig,
    seed: int = 0,
    greedy: bool = False,
    backend: str | None = None,
    step: Callable[..., StepOutput] = sjdpp_step,
    keys: list[int] | None = None,
    noise_keys: Callable = position_keys,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobi decoding. Returns ([N, length] tokens, [N] forward passes).

    With `keys` (one per sequence), verification is Gumbel-coupled with the noise keyed as
    `noise_keys(keys, active, start, steps)` says.  `step` is `sjdpp_step` and `noise_keys`
    `position_keys` unless a test swaps in a deliberately broken one.
    """
    g = torch.Generator().manual_seed(seed)
    n, vocab, k = num_sequences, model.vocab_size, config.num_speculative_tokens
    prompt_len = len(model.prompt)
    seq = torch.full((n, prompt_len + length + k + 1), -1, dtype=torch.long)
    seq[:, :prompt_len] = torch.tensor(model.prompt)
    done = torch.zeros(n, dtype=torch.long)  # generated tokens
    steps = torch.zeros(n, dtype=torch.long)
    fresh_vocab = config.fresh_vocab(vocab)
    window_len = torch.zeros(n, dtype=torch.long)
    window = torch.zeros(0, dtype=torch.long)
    window_probs = torch.zeros(0, vocab)
    window_prob_rows = torch.zeros(0, dtype=torch.long)
    window_onehot = torch.zeros(0, dtype=torch.bool)
    active = torch.arange(n)
    history_len = config.row_width or 1
    while active.numel():
        b = active.numel()
        start = prompt_len + done[active]  # where this step's window begins
        ctx = seq[active]
        draft_req = torch.repeat_interleave(torch.arange(b), window_len)
        draft_local = torch.arange(window.numel()) - (torch.cumsum(window_len, 0) - window_len)[draft_req]
        ctx[draft_req, start[draft_req] + draft_local] = window
        # Row j of request i predicts position start + j from the prefix and drafts 0..j-1.
        req = torch.repeat_interleave(torch.arange(b), window_len + 1)
        local = torch.arange(req.numel()) - (torch.cumsum(window_len + 1, 0) - window_len - 1)[req]
        pos = start[req] + local
        probs = model.next_probs(ctx[req, pos - 2], ctx[req, pos - 1])

        hist_pos = start[:, None] - history_len + torch.arange(history_len)
        history = torch.where(hist_pos >= 0, ctx.gather(1, hist_pos.clamp_min(0)), -1)
        fresh = FreshTokens.build([config.init] * b, [fresh_vocab] * b, history, [config.row_width] * b)
        next_len = torch.full((b,), k)
        out = step(
            StepBatch(
                cu_num_draft_tokens=torch.cumsum(window_len, 0),
                target_probs=probs,
                draft_token_ids=window,
                draft_probs=window_probs,
                draft_is_onehot=window_onehot,
                greedy=torch.full((b,), greedy),
                reuse=torch.full((b,), REUSE_CODES[config.reuse]),
                threshold=torch.full((b,), float(config.threshold)),
                next_window_len=next_len,
                draft_prob_rows=window_prob_rows,
                gumbel=torch.full((b,), keys is not None),
            ),
            StepNoise.sample(probs.shape[0], vocab, b * k, generator=g) if keys is None
            else StepNoise.sample_per_request(
                (window_len + 1).tolist(), [k] * b, vocab, {}, keys=noise_keys(keys, active, start, steps[active])
            ),
            fresh,
            backend=backend,
        )
        committed = out.num_accepted + 1
        cols = torch.arange(out.output_token_ids.shape[1])
        rows, cols = (cols[None, :] < committed[:, None]).nonzero(as_tuple=True)
        seq[active[rows], start[rows] + cols] = out.output_token_ids[rows, cols]
        done[active] += committed
        steps[active] += 1
        # Near the end the window shrinks: a pass commits at most window + 1 tokens.
        window_len = torch.clamp(length - done[active] - 1, 0, k)
        still = done[active] < length
        slot_req = torch.repeat_interleave(torch.arange(b), next_len)
        slot = torch.arange(b * k) - slot_req * k
        kept = (slot < window_len[slot_req]) & still[slot_req]
        window_len = window_len[still]
        window = out.next_draft_token_ids[kept]
        window_probs = out.next_draft_probs
        window_prob_rows = out.next_draft_prob_rows[kept]
        window_onehot = out.next_draft_is_onehot[kept]
        active = active[still]
    return seq[:, prompt_len : prompt_len + length], steps
