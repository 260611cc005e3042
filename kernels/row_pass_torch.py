"""The row pass in PyTorch, vectorised over rows: what vLLM's CPU backend runs.

Eager (`row_pass_torch`) or fused by TorchInductor (`row_pass_inductor`): the same functions,
compiled into one C++ loop each (while an SJD++ server starts: `compile_inductor`; else on first
use), which makes the pass memory-bound like a softmax.

For each selected target row:
    w = max(0, p - s)      s = the draft's q row, one-hot(token), or 0
    token = argmax_v w_v / E_v, or the same race over p where w is all zero
    next_probs[q_dest] = p (when q_dest >= 0)
The float operations are the ones `row_pass_triton` performs, element by element, so both
return the same tokens for the same noise.
"""

from __future__ import annotations

import torch


def race(weights: torch.Tensor, exponentials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential race per row: (winning score, winning index); score 0 means an empty row.

    Exponentials are > 0 (`StepNoise` guarantees it), so weights of 0 score 0, never NaN.
    """
    return torch.max(weights / exponentials, dim=-1)


def residual_race(target_probs, draft_probs, exponentials, rows, q_rows):
    w = target_probs[rows].float() - draft_probs[q_rows].float()
    return race(w.clamp_min(0.0), exponentials[rows])


def masked_race(target_probs, exponentials, rows, masked_token):
    """Race over p with one token per row (masked_token >= 0) taken out: p - one-hot(d)."""
    score = target_probs[rows].float() / exponentials[rows]
    at = torch.arange(rows.numel(), device=rows.device)
    col = masked_token.clamp_min(0)
    score[at, col] = torch.where(masked_token >= 0, 0.0, score[at, col])
    return torch.max(score, dim=-1)


def copy_rows(dest, dest_rows, src, src_rows):
    dest[dest_rows] = src[src_rows].to(dest.dtype)


_EAGER = (residual_race, masked_race, copy_rows)
_compiled: tuple | None = None


def _inductor_kernels() -> tuple:
    """The same functions fused by TorchInductor into one C++ loop each (each shape compiled on
    its first call: `compile_inductor` makes those calls ahead)."""
    global _compiled
    if _compiled is None:
        _compiled = tuple(torch.compile(fn, dynamic=True) for fn in _EAGER)
    return _compiled


def compile_inductor(vocab: int, device: torch.device | str = "cpu") -> None:
    """Compile the fused functions now, for float32 probabilities over `vocab` tokens, at the
    shapes a step meets (one row and several: dynamic shapes treat a size of 1 apart), so that no
    step waits for the compiler (about 4 s on two CPU cores, once per process).  Raises what
    TorchInductor raises where it cannot compile (no C++ compiler), after which `row_pass_inductor`
    runs the eager functions."""
    try:
        _compile_at_step_shapes(vocab, device)
    except Exception:
        global _compiled
        _compiled = _EAGER
        raise


def _compile_at_step_shapes(vocab: int, device) -> None:
    # Each function runs on h = 1 and h = 2 rows (dynamic shapes treat a size of 1 apart), and no
    # two sizes agree where a step's need not (Dynamo would guard on that equality): p rows,
    # q rows, next-window rows and the rows visited all differ, and p is not q.  Then the race
    # over every row of p that Gumbel-coupled steps run (`kernels.step`: as many rows visited as
    # p has, no q, no next window).
    gen = torch.Generator(device=device).manual_seed(0)
    for r in (1, 3):
        p = torch.rand(r, vocab, generator=gen, device=device).softmax(-1)
        rows = torch.arange(r, device=device)
        none = torch.full_like(rows, -1)
        row_pass_inductor(
            target_probs=p, draft_probs=None, exponentials=torch.rand(r, vocab, generator=gen, device=device) + 0.5,
            rows=rows, subtract_draft_row=none, subtract_onehot=none, draw=torch.ones_like(rows, dtype=torch.bool),
            q_dest=none, next_probs=p[:0],
        )
    for h, next_rows in ((1, 3), (2, 5), (1, 1)):  # a window of one next row as well
        n = 2 * h  # rows visited: the first h race against a q row, the others against p
        p = torch.rand(n + 5, vocab, generator=gen, device=device).softmax(-1)
        q = torch.rand(n + 3, vocab, generator=gen, device=device).softmax(-1)
        rows = torch.arange(n, device=device)
        row_pass_inductor(
            target_probs=p, draft_probs=q, exponentials=torch.rand(n + 5, vocab, generator=gen, device=device) + 0.5,
            rows=rows, subtract_draft_row=torch.where(rows < h, rows, -1), subtract_onehot=rows,
            draw=torch.ones(n, dtype=torch.bool, device=device), q_dest=torch.where(rows < h, rows, -1),
            next_probs=torch.empty(next_rows, vocab, device=device),
        )


def row_pass_torch(
    target_probs: torch.Tensor,  # [R, V]
    draft_probs: torch.Tensor | None,  # [T, V]
    exponentials: torch.Tensor,  # [R, V] float32, > 0
    rows: torch.Tensor,  # [S] rows to visit
    subtract_draft_row: torch.Tensor,  # [S] draft row to subtract, -1 for none
    subtract_onehot: torch.Tensor,  # [S] token whose one-hot to subtract, -1 for none
    draw: torch.Tensor,  # [S] bool: race this row
    q_dest: torch.Tensor,  # [S] row of next_probs to receive p, -1 for none
    next_probs: torch.Tensor,  # [T', V] written in place
    compiled: bool = False,
) -> torch.Tensor:
    residual, masked, copy = _inductor_kernels() if compiled else _EAGER
    tokens = torch.zeros_like(rows)
    writes = (q_dest >= 0).nonzero().squeeze(1)
    if writes.numel():
        copy(next_probs, q_dest[writes], target_probs, rows[writes])

    score = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    with_q = (draw & (subtract_draft_row >= 0)).nonzero().squeeze(1)
    if with_q.numel():
        score[with_q], tokens[with_q] = residual(
            target_probs, draft_probs, exponentials, rows[with_q], subtract_draft_row[with_q]
        )
    without_q = (draw & (subtract_draft_row < 0)).nonzero().squeeze(1)
    if without_q.numel():
        score[without_q], tokens[without_q] = masked(
            target_probs, exponentials, rows[without_q], subtract_onehot[without_q]
        )

    empty = (draw & (score <= 0)).nonzero().squeeze(1)
    if empty.numel():  # residual all zero (p = q up to rounding): race over p instead
        no_mask = torch.full_like(empty, -1)
        _, tokens[empty] = masked(target_probs, exponentials, rows[empty], no_mask)
    return tokens


def row_pass_inductor(**kwargs) -> torch.Tensor:
    return row_pass_torch(**kwargs, compiled=True)
