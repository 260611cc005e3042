r"""The exponential race over position-keyed noise, where a token can win.

Rows keyed (a_r, b_r) (`noise.row_keys`) race

    w_r = argmax_v p_r(v) / E(a_r, b_r, v)          (ties: the lowest v, as `torch.max` and Triton)

and a token with p_r(v) = 0 scores 0, below every token with p_r(v) > 0, so it never wins.  Under
top-k or an allowed-token constraint most of a row is such tokens (the digit model keeps 11 of
274, Emu3 2048 of 184622 under its default top-k, Lumina-mGPT 2000 of 65536), yet the dense race
hashes the whole row.  `KeyedRows.race` evaluates E only on the support of each row, in NumPy on
the host, with the dense race's float32 division, so it returns the dense race's winners exactly
(tests/test_keyed_race.py); `KeyedRows.exponentials` gives the dense rows where a caller needs
them (the ratio test, Triton).  `benchmarks/bench_keyed_race.py` times both as a CPU step runs
them (one thread; results/keyed_race.md, the 2-core EPYC with AVX2 only, 2026-12-08): the digit
model's 33 rows of a full window 0.20 against 0.63 ms, Lumina-mGPT's 16 rows under top-k 2000
2.5 against 20 ms, Emu3's under top-k 2048 6.9 against 58 ms, and over its 32768 visual tokens
17 against 50 ms; with half of each row positive 15 against 22 ms, with every token positive
the dense race is the faster (28 against 20 ms), hence MAX_SUPPORT.  E is the NumPy
reference's (`noise.exponentials_at`), as small blocks' dense noise on CPU is; TorchInductor's,
which large blocks' used, agrees with it except where a value sits within 2^-52 of a float32
rounding midpoint (`noise.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .noise import exponentials_at, keyed_exponentials


# Beyond this fraction of the rows' elements positive, the dense race: NumPy's passes over the
# support won at half (16 x 65536: 1.5x), drew level at three quarters and lost to TorchInductor's
# one fused pass over whole rows with every token positive (0.7x; bench_keyed_race.py).
MAX_SUPPORT = 1 / 2
# Rows are raced in chunks of at most this many supported elements (or one row, where a row has
# more), so that a chunk's passes (some 60 bytes per supported element at once: indices, hashes,
# float64 uniforms; some 4 MB) stay in the allocator's heap and the cache: bench_keyed_race.py
# run with each of 2^12, 2^14, 2^15, 2^16 and 2^18 (2026-12-08, one run each) took 146, 153,
# 171, 111 and 162 ms over Emu3's 128 rows of visual tokens.  Beside them the support's mask, a
# byte per row element (for those rows 22.5 MiB, where their dense noise takes 90 MiB: the
# step's memory reserve, engine/step_memory.py, counts the dense noise).
CHUNK_SUPPORT = 1 << 16


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
        if np.isnan(p).any():
            return None
        support = p > 0
        per_row = np.count_nonzero(support, axis=1)
        if not per_row.all() or per_row.sum() > support.size * MAX_SUPPORT:
            return None
        winners = np.empty(p.shape[0], dtype=np.int64)
        through = np.cumsum(per_row)  # supported elements up to and including each row
        start = 0
        while start < p.shape[0]:
            before = through[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(through, before + CHUNK_SUPPORT, side="right")))
            rows = slice(start, stop)
            winners[rows] = _first_winners(p[rows], support[rows], per_row[rows], self.a[rows], self.b[rows])
            start = stop
        return winners


def _first_winners(p: np.ndarray, support: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's race winner over its support, `counts` elements a row (every row has one;
    ties: the lowest token)."""
    width = p.shape[1]
    flat = np.flatnonzero(support)  # row-major: rows in order, tokens ascending within a row
    row = np.repeat(np.arange(p.shape[0]), counts)
    tokens = flat - row * width
    score = p.reshape(-1)[flat] / exponentials_at(np.repeat(a, counts), np.repeat(b, counts), tokens)
    best = np.maximum.reduceat(score, np.cumsum(counts) - counts)
    ties = np.flatnonzero(score == np.repeat(best, counts))  # each row's best, its lowest token first
    first = np.ones(ties.size, dtype=bool)
    first[1:] = row[ties[1:]] != row[ties[:-1]]
    return tokens[ties[first]]
