"""The row pass in PyTorch, vectorised over rows: what vLLM's CPU backend runs.

For each selected target row:
    w = max(0, p - s)      s = the draft's q row, one-hot(token), or 0
    token = argmax_v [w_v > 0] * w_v / E_v, or the same race over p where w is all zero
    next_probs[q_dest] = p (when q_dest >= 0)
The float operations are the ones `row_pass_triton` performs, element by element, so both
return the same tokens for the same noise.
"""

from __future__ import annotations

import torch


def race(weights: torch.Tensor, exponentials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential race per row: (winning index, winning score); score 0 means an empty row."""
    score = torch.where(weights > 0, weights / exponentials, 0.0)
    winner = score.argmax(-1)
    return winner, score.gather(-1, winner.unsqueeze(-1)).squeeze(-1)


def row_pass_torch(
    target_probs: torch.Tensor,  # [R, V]
    draft_probs: torch.Tensor | None,  # [T, V]
    exponentials: torch.Tensor,  # [R, V] float32
    rows: torch.Tensor,  # [S] rows to visit
    subtract_draft_row: torch.Tensor,  # [S] draft row to subtract, -1 for none
    subtract_onehot: torch.Tensor,  # [S] token whose one-hot to subtract, -1 for none
    draw: torch.Tensor,  # [S] bool: race this row
    q_dest: torch.Tensor,  # [S] row of next_probs to receive p, -1 for none
    next_probs: torch.Tensor,  # [T', V] written in place
) -> torch.Tensor:
    tokens = torch.zeros_like(rows)
    writes = q_dest >= 0
    if bool(writes.any()):
        next_probs[q_dest[writes]] = target_probs[rows[writes]].to(next_probs.dtype)
    if not bool(draw.any()):
        return tokens

    drawn = draw.nonzero().squeeze(1)
    p = target_probs[rows[drawn]].float()
    w = p.clone()
    with_row = (subtract_draft_row[drawn] >= 0).nonzero().squeeze(1)
    if with_row.numel():
        q = draft_probs[subtract_draft_row[drawn][with_row]].float()
        w[with_row] = p[with_row] - q
    with_onehot = (subtract_onehot[drawn] >= 0).nonzero().squeeze(1)
    if with_onehot.numel():
        tok = subtract_onehot[drawn][with_onehot]
        w[with_onehot, tok] = p[with_onehot, tok] - 1.0
    w.clamp_min_(0.0)

    e = exponentials[rows[drawn]]
    residual_winner, residual_score = race(w, e)
    p_winner, _ = race(p, e)
    tokens[drawn] = torch.where(residual_score > 0, residual_winner, p_winner)
    return tokens
