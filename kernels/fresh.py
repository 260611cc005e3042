"""Fresh tokens: the window slots that no target row has proposed yet.

Their proposal is one-hot, so verification accepts them with probability p(d) and stays exact
whatever they are; the choice only moves the acceptance rate.  Image models repeat themselves
spatially, hence the priors besides uniform noise:
    random  uniform over the request's fresh-token vocabulary,
    left    the token before the slot (the last redraft or the last committed token),
    above   the token one image row (row_width tokens) before the slot.
A slot whose source is itself fresh follows the chain back to a known token, in closed form:
with w = 1 (left) or row_width (above) and r redrafted slots, slot m copies slot
m - c * w, c = (m - r) // w + 1, the first one before r.  No known source (before the image,
that is in the prompt, whose text ids a model may not embed as image codes; the caller marks
those -1 in `history`): random, drawn once per chain so that the copies still repeat it.

A model whose stream has a grid (`grid.StreamGrid`: end-of-row and closing tokens at fixed
places) gets those tokens at their slots, and a code slot never keeps a copied token that is
not a code ("left" at a row's start would copy the end-of-row token): it takes the random draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .grid import CODE, StreamGrid
from .host import host_array

INIT_RANDOM, INIT_LEFT, INIT_ABOVE = 0, 1, 2
INIT_CODES = {"random": INIT_RANDOM, "left": INIT_LEFT, "above": INIT_ABOVE}


@dataclass
class FreshTokens:
    """Per-request fresh-token settings and the recent history "above" and "left" copy from,
    on the host (part of the step's scalar plan).

    A request's fresh vocabulary is a range [start, start + size) of token ids, or, where
    `vocab_is_list`, the ids vocab_ids[start : start + size].
    """

    init: np.ndarray  # [B] int64, INIT_* codes
    row_width: np.ndarray  # [B] int64 (read for INIT_ABOVE)
    history: np.ndarray  # [B, H] last committed tokens before this step, right-aligned; -1: no source
    vocab_start: np.ndarray  # [B] int64
    vocab_size: np.ndarray  # [B] int64, >= 1
    vocab_is_list: np.ndarray  # [B] bool
    vocab_ids: np.ndarray  # [N] int64: the requests' explicit id lists, concatenated
    grid: StreamGrid | None = None  # the model's stream layout, if it has one
    stream_start: np.ndarray | None = None  # [B] int64: stream index of this step's first committed token
    grid_rows: np.ndarray | None = None  # [B] int64: each request's grid size (rows, codes per row)
    grid_codes_per_row: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        init: Sequence[str],
        vocabularies: Sequence[range | Sequence[int]],
        history,
        row_width: Sequence[int | None] | None = None,
        grid: StreamGrid | None = None,
        stream_start: Sequence[int] | None = None,
        grids: Sequence[StreamGrid] | None = None,
    ) -> "FreshTokens":
        """`grids`: each request's grid (its size; the ids are `grid`'s), None: `grid` for all."""
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
            init=np.array([INIT_CODES[m] for m in init], dtype=np.int64),
            row_width=np.array(widths, dtype=np.int64),
            history=host_array(history).astype(np.int64, copy=False),
            vocab_start=np.array(start, dtype=np.int64),
            vocab_size=np.array(size, dtype=np.int64),
            vocab_is_list=np.array([not isinstance(v, range) for v in vocabularies], dtype=bool),
            vocab_ids=np.array([t for v in lists for t in v], dtype=np.int64),
            grid=grid,
            stream_start=None if grid is None else np.asarray(stream_start, dtype=np.int64),
            grid_rows=None if grid is None else np.array([g.rows for g in grids or [grid] * len(init)], dtype=np.int64),
            grid_codes_per_row=None if grid is None else np.array(
                [g.codes_per_row for g in grids or [grid] * len(init)], dtype=np.int64
            ),
        )


def fill_fresh_tokens(
    next_tokens: np.ndarray,  # [T'] int64, slots < num_redrafted already set; filled in place
    next_is_onehot: np.ndarray,  # [T'] bool, set to True for fresh slots
    next_window_len: np.ndarray,  # [B]
    num_redrafted: np.ndarray,  # [B]
    committed: np.ndarray,  # [B, C] tokens committed this step, left-aligned
    num_committed: np.ndarray,  # [B]
    fresh: FreshTokens,
    uniforms: np.ndarray,  # [T'] float32 in [0, 1)
) -> None:
    num_slots = next_tokens.size
    if num_slots == 0:
        return
    num_reqs = next_window_len.size
    req = np.repeat(np.arange(num_reqs), next_window_len)
    start = np.cumsum(next_window_len) - next_window_len
    slot = np.arange(num_slots) - start[req]
    r = num_redrafted[req]
    is_fresh = slot >= r

    init = fresh.init[req]
    w = np.maximum(np.where(init == INIT_ABOVE, fresh.row_width[req], 1), 1)
    src = slot - ((slot - r) // w + 1) * w  # < r; negative: before the window

    # A chain with no known root draws once, at its first fresh slot, and the rest copy that.
    draw_slot = np.where((init == INIT_RANDOM) | ~is_fresh, slot, src + w)
    size = fresh.vocab_size[req]
    # float32 throughout: U * size rounded as the uniforms were drawn, then floored.
    scaled = uniforms[start[req] + draw_slot] * size.astype(np.float32)
    pick = fresh.vocab_start[req] + np.minimum(scaled.astype(np.int64), size - 1)
    if fresh.vocab_ids.size:
        listed = fresh.vocab_ids[np.minimum(pick, fresh.vocab_ids.size - 1)]
        random_token = np.where(fresh.vocab_is_list[req], listed, pick)
    else:
        random_token = pick

    # The source is in the window, among this step's committed tokens, in the history before
    # them, or nowhere (-1).
    c = num_committed[req]
    hist_len = fresh.history.shape[1]
    from_window = next_tokens[np.minimum(np.maximum(start[req] + src, 0), num_slots - 1)]
    from_committed = committed[req, np.minimum(np.maximum(c + src, 0), committed.shape[1] - 1)]
    copied = np.where(src >= 0, from_window, np.where(c + src >= 0, from_committed, -1))
    if hist_len:
        from_history = fresh.history[req, np.minimum(np.maximum(hist_len + c + src, 0), hist_len - 1)]
        copied = np.where((c + src < 0) & (hist_len + c + src >= 0), from_history, copied)
    token = np.where((init != INIT_RANDOM) & (copied >= 0), copied, random_token)
    if fresh.grid is not None:
        grid = fresh.grid
        must = grid.slot_tokens(fresh.stream_start[req] + c + slot, fresh.grid_rows[req], fresh.grid_codes_per_row[req])
        not_code = (token < grid.code_start) | (token >= grid.code_stop)
        token = np.where(must >= 0, must, np.where((must == CODE) & not_code, random_token, token))
    next_tokens[is_fresh] = token[is_fresh]
    next_is_onehot |= is_fresh
