"""The row pass as one fused Triton kernel: what the CUDA backend runs.

One program per selected row walks the vocabulary in blocks, as the fused-softmax tutorial does
for rows too long for one block.  In a single pass over the row it reads p (and, where the
residual needs it, the draft's q row), writes p as the next proposal where asked, and keeps two
exponential races going, over the residual and over p, so that the fallback to p for an empty
residual costs no second pass.  Ties go to the lowest index, as `torch.argmax` does, so the result
equals `row_pass_torch` token for token (see that module for the math).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _race_block(best_score, best_index, weights, exponentials, start):
    # Correctly rounded, as PyTorch divides: the default fp32 division on GPUs is approximate.
    score = tl.math.div_rn(weights, exponentials)
    block_best = tl.max(score, axis=0)
    block_index = start + tl.argmax(score, axis=0, tie_break_left=True)
    better = block_best > best_score
    return tl.where(better, block_best, best_score), tl.where(better, block_index, best_index)


@triton.jit
def _row_pass_kernel(
    target_probs_ptr,
    target_stride,
    draft_probs_ptr,
    draft_stride,
    exponentials_ptr,
    exponentials_stride,
    rows_ptr,
    subtract_draft_row_ptr,
    subtract_onehot_ptr,
    draw_ptr,
    q_dest_ptr,
    next_probs_ptr,
    next_stride,
    tokens_ptr,
    vocab_size,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(rows_ptr + pid).to(tl.int64)
    draft_row = tl.load(subtract_draft_row_ptr + pid).to(tl.int64)
    onehot_token = tl.load(subtract_onehot_ptr + pid)
    draw_flag = tl.load(draw_ptr + pid)
    draw = draw_flag != 0
    q_dest = tl.load(q_dest_ptr + pid).to(tl.int64)
    # Row-wide conditions as blocks: the interpreter rejects a scalar mask operand.
    zeros = tl.zeros((BLOCK_SIZE,), dtype=tl.int64)
    read_q = (zeros + draft_row >= 0) & (zeros + draw_flag != 0)
    write_q = zeros + q_dest >= 0

    p_row = target_probs_ptr + row * target_stride
    q_row = draft_probs_ptr + draft_row * draft_stride
    e_row = exponentials_ptr + row * exponentials_stride
    out_row = next_probs_ptr + q_dest * next_stride

    residual_score = 0.0
    residual_index = 0
    p_score = 0.0
    p_index = 0
    for start in range(0, vocab_size, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        in_vocab = cols < vocab_size
        p_raw = tl.load(p_row + cols, mask=in_vocab, other=0.0)
        tl.store(out_row + cols, p_raw.to(next_probs_ptr.dtype.element_ty), mask=in_vocab & write_q)
        if draw:
            p = p_raw.to(tl.float32)
            q = tl.load(q_row + cols, mask=in_vocab & read_q, other=0.0).to(tl.float32)
            q = tl.where(cols == onehot_token, 1.0, q)
            w = tl.maximum(p - q, 0.0)
            e = tl.load(e_row + cols, mask=in_vocab, other=1.0)
            residual_score, residual_index = _race_block(residual_score, residual_index, w, e, start)
            p_score, p_index = _race_block(p_score, p_index, p, e, start)

    if draw:
        token = tl.where(residual_score > 0, residual_index, p_index)
        tl.store(tokens_ptr + pid, token.to(tl.int64))


def row_pass_triton(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    exponentials: torch.Tensor,
    rows: torch.Tensor,
    subtract_draft_row: torch.Tensor,
    subtract_onehot: torch.Tensor,
    draw: torch.Tensor,
    q_dest: torch.Tensor,
    next_probs: torch.Tensor,
    block_size: int | None = None,
) -> torch.Tensor:
    """Same contract as `row_pass_torch.row_pass_torch`."""
    tokens = torch.zeros_like(rows)
    if rows.numel() == 0:
        return tokens
    vocab_size = target_probs.shape[1]
    if block_size is None:
        block_size = min(triton.next_power_of_2(vocab_size), 4096)
    has_q = draft_probs is not None and draft_probs.numel() > 0
    q = draft_probs if has_q else target_probs
    out = next_probs if next_probs.numel() else target_probs.new_empty(1, vocab_size)
    _row_pass_kernel[(rows.numel(),)](
        target_probs,
        target_probs.stride(0),
        q,
        q.stride(0),
        exponentials,
        exponentials.stride(0),
        rows,
        subtract_draft_row,
        subtract_onehot,
        draw.to(torch.int8),
        q_dest,
        out,
        out.stride(0),
        tokens,
        vocab_size,
        BLOCK_SIZE=block_size,
    )
    return tokens
