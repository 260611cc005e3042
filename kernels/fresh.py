"""Fresh tokens: the window slots that no target row has proposed yet.

Their proposal is one-hot, so verification accepts them with probability p(d) and stays exact
whatever they are; the choice only moves the acceptance rate.  Image models repeat themselves
spatially, hence the priors besides uniform noise:
    random  uniform over the request's fresh-token vocabulary,
    left    the token before the slot (the last redraft or the last committed token),
    above   the token one image row (row_width tokens) before the slot.
A slot whose source is itself fresh follows the chain back to a known token, in closed form:
with w = 1 (left) or row_width (above) and r redrafted slots, slot m copies slot
m - c * w, c = (m - r) // w + 1, the first one before r.  No known source: random, drawn once
per chain so that the copies still repeat it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

INIT_RANDOM, INIT_LEFT, INIT_ABOVE = 0, 1, 2
INIT_CODES = {"random": INIT_RANDOM, "left": INIT_LEFT, "above": INIT_ABOVE}


@dataclass
class FreshTokens:
    """Per-request fresh-token settings and the recent history "above" and "left" copy from.

    A request's fresh vocabulary is a range [start, start + size) of token ids, or, where
    `vocab_is_list`, the ids vocab_ids[start : start + size].
    """

    init: torch.Tensor  # [B] int64, INIT_* codes
    row_width: torch.Tensor  # [B] int64 (read for INIT_ABOVE)
    history: torch.Tensor  # [B, H] last committed tokens before this step, right-aligned, -1 pad
    vocab_start: torch.Tensor  # [B] int64
    vocab_size: torch.Tensor  # [B] int64, >= 1
    vocab_is_list: torch.Tensor  # [B] bool
    vocab_ids: torch.Tensor  # [N] int64: the requests' explicit id lists, concatenated

    @classmethod
    def build(
        cls,
        init: Sequence[str],
        vocabularies: Sequence[range | Sequence[int]],
        history: torch.Tensor,
        row_width: Sequence[int | None] | None = None,
    ) -> "FreshTokens":
        device = history.device
        long = dict(dtype=torch.long, device=device)
        lists = [v for v in vocabularies if not isinstance(v, range)]
        start, size, offset = [], [], 0
        for v in vocabularies:
            if isinstance(v, range):
                if v.step != 1 or len(v) == 0:
                    raise ValueError(f"fresh vocabulary {v} must be a non-empty range with step 1")
                start.append(v.start)
            else:
                start.append(offset)
                offset += len(v)
            size.append(len(v))
        widths = [w or 1 for w in (row_width or [None] * len(init))]
        return cls(
            init=torch.tensor([INIT_CODES[m] for m in init], **long),
            row_width=torch.tensor(widths, **long),
            history=history.long(),
            vocab_start=torch.tensor(start, **long),
            vocab_size=torch.tensor(size, **long),
            vocab_is_list=torch.tensor([not isinstance(v, range) for v in vocabularies], device=device),
            vocab_ids=torch.tensor([t for v in lists for t in v], **long),
        )


def fill_fresh_tokens(
    next_tokens: torch.Tensor,  # [T'] int64, slots < num_redrafted already set; filled in place
    next_is_onehot: torch.Tensor,  # [T'] bool, set to True for fresh slots
    next_window_len: torch.Tensor,  # [B]
    num_redrafted: torch.Tensor,  # [B]
    committed: torch.Tensor,  # [B, C] tokens committed this step, left-aligned
    num_committed: torch.Tensor,  # [B]
    fresh: FreshTokens,
    uniforms: torch.Tensor,  # [T'] in [0, 1)
) -> None:
    num_slots = next_tokens.numel()
    if num_slots == 0:
        return
    device = next_tokens.device
    num_reqs = next_window_len.numel()
    req = torch.repeat_interleave(
        torch.arange(num_reqs, device=device), next_window_len, output_size=num_slots
    )
    start = torch.cumsum(next_window_len, 0) - next_window_len
    slot = torch.arange(num_slots, device=device) - start[req]
    r = num_redrafted[req]
    is_fresh = slot >= r

    init = fresh.init[req]
    w = torch.where(init == INIT_ABOVE, fresh.row_width[req], 1).clamp_min(1)
    src = slot - ((slot - r) // w + 1) * w  # < r; negative: before the window

    # A chain with no known root draws once, at its first fresh slot, and the rest copy that.
    draw_slot = torch.where((init == INIT_RANDOM) | ~is_fresh, slot, src + w)
    size = fresh.vocab_size[req]
    pick = fresh.vocab_start[req] + (uniforms[start[req] + draw_slot] * size).long().clamp_max(size - 1)
    if fresh.vocab_ids.numel():
        listed = fresh.vocab_ids[pick.clamp_max(fresh.vocab_ids.numel() - 1)]
        random_token = torch.where(fresh.vocab_is_list[req], listed, pick)
    else:
        random_token = pick

    # The source is in the window, among this step's committed tokens, in the history before
    # them, or nowhere (-1).  Every row reads all three at clamped positions and keeps the one
    # that applies: cheaper than selecting the rows of each (a nonzero and a gather apiece).
    c = num_committed[req]
    hist_len = fresh.history.shape[1]
    from_window = next_tokens[(start[req] + src).clamp(0, num_slots - 1)]
    from_committed = committed[req, (c + src).clamp(0, committed.shape[1] - 1)]
    copied = torch.where(src >= 0, from_window, torch.where(c + src >= 0, from_committed, -1))
    if hist_len:
        from_history = fresh.history[req, (hist_len + c + src).clamp(0, hist_len - 1)]
        copied = torch.where((c + src < 0) & (hist_len + c + src >= 0), from_history, copied)
    token = torch.where((init != INIT_RANDOM) & (copied >= 0), copied, random_token)
    next_tokens.copy_(torch.where(is_fresh, token, next_tokens))
    next_is_onehot |= is_fresh
