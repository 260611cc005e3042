r"""The exponential race over position-keyed noise, where a token can win.

Rows keyed (a_r, b_r) (`noise.row_keys`) race

    w_r = argmax_v p_r(v) / E(a_r, b_r, v)          (ties: the lowest v, as `torch.max` and Triton)

and a token with p_r(v) = 0 scores 0, below every token with p_r(v) > 0, so it never wins.  Under
top-k or an allowed-token constraint most of a row is such tokens (the digit model keeps 11 of
274, Emu3 2048 of 184622 under its default top-k, Lumina-mGPT 2000 of 65536), yet the dense race
hashes the whole row.  `KeyedRows.race` evaluates E only on the support of each row, in NumPy on
the host, with the dense race's float32 division, so it returns the dense race's winners exactly
(tests/test_keyed_race.py); `KeyedRows.exponentials` gives the dense rows where a caller needs
them (the ratio test, Triton).  Timed against the dense noise and row pass as a CPU step runs them
(one thread, as vLLM's CPU worker runs; the 2-core EPYC with AVX2 only, 2026-12-07, a one-off
script): the digit model's 33 rows of a full window 0.13 against 0.56 ms, 80 rows 0.27 against
0.74 ms; Emu3's 16 rows under top-k 2048 16 against 52 ms, 128 rows 94 against 514 ms.  With
half of each row positive the dense race is the faster (16 rows of 65536 tokens: dense 20 ms,
here 33 ms), hence MAX_SUPPORT.  E is the NumPy reference's (`noise.exponentials_at`), as small
blocks' dense noise on CPU is; TorchInductor's, which large blocks' used, agrees with it except
where a value sits within 2^-52 of a float32 rounding midpoint (`noise.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .noise import exponentials_at, keyed_exponentials


# Beyond this fraction of the rows' elements, the dense race.  The passes here hold some 60 bytes
# per element of the support at once (indices, hashes, float64 uniforms; tracemalloc at Emu3's
# vocabulary), so at a sixteenth of the rows they hold what the dense noise would (4.25 bytes per
# row element against 4): the step's memory reserve (engine/step_memory.py) counts the dense noise.
MAX_SUPPORT = 1 / 16


@dataclass(frozen=True)
class KeyedRows:
    """Rows of noise keyed by position: a, b (uint32 [R], from `noise.row_keys`) over a
    vocabulary of `vocab_size` tokens, to live on `device`."""

    a: np.ndarray
    b: np.ndarray
    vocab_size: int
    device: torch.device

    def exponentials(self) -> torch.Tensor:
        """[R, V] float32 Exp(1) on `device` (`noise.keyed_exponentials`)."""
        return keyed_exponentials(self.a, self.b, self.vocab_size, self.device)

    def race(self, probs: torch.Tensor) -> np.ndarray | None:
        """int64 [R]: each row's race winner over probs ([R, V] float32 on the CPU), the noise
        computed only where probs > 0.  None where the rows are not on the CPU, hold a NaN (the
        dense race picks it) or have no positive probability, or where more than MAX_SUPPORT of
        them is positive: the caller races densely."""
        if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.shape != (self.a.size, self.vocab_size):
            return None
        p = probs.detach().numpy()
        support = p > 0
        if np.count_nonzero(support) > support.size * MAX_SUPPORT or np.isnan(p).any():
            return None
        rows, tokens = np.nonzero(support)
        counts = np.bincount(rows, minlength=p.shape[0])
        if not counts.all():
            return None
        score = p[rows, tokens] / exponentials_at(self.a[rows], self.b[rows], tokens)
        starts = np.cumsum(counts) - counts
        best = np.repeat(np.maximum.reduceat(score, starts), counts)
        # The first best token of each row (rows are in order, tokens ascending within a row).
        first = np.minimum.reduceat(np.where(score == best, np.arange(score.size), score.size), starts)
        return tokens[first].astype(np.int64, copy=False)
