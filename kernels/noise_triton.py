"""Position-keyed race noise as a Triton kernel: what the CUDA backend runs (see `noise.py`
for the hash; the integer steps are the same, in native uint32 arithmetic)."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .host import upload


@triton.jit
def _mix(x):
    # lowbias32; uint32 products wrap modulo 2^32 as the hash wants.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _keyed_exponentials_kernel(a_ptr, b_ptr, out_ptr, out_stride, vocab_size, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    a = tl.load(a_ptr + row).to(tl.uint32)
    b = tl.load(b_ptr + row).to(tl.uint32)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    for start in range(0, vocab_size, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        h = _mix(_mix(cols.to(tl.uint32) + a) ^ b)
        u = ((h >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08  # 2^-24
        tl.store(out_row + cols, (-tl.log(u)).to(tl.float32), mask=cols < vocab_size)


def keyed_exponentials_triton(a, b, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """Same contract as `noise.keyed_exponentials_torch`."""
    # int64 carriers: the uint32 words as non-negative values, which torch has no dtype for.
    a_t, b_t = upload(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64), device=device)
    out = torch.empty(a_t.numel(), vocab_size, dtype=torch.float32, device=device)
    if a_t.numel():
        block = min(triton.next_power_of_2(vocab_size), 4096)
        _keyed_exponentials_kernel[(a_t.numel(),)](a_t, b_t, out, out.stride(0), vocab_size, BLOCK_SIZE=block)
    return out
