"""The fixed layout of an image stream: which tokens are legal at each generated position.

An image model's generated stream is `rows` rows of `codes_per_row` image codes, each row
followed by an end-of-row token where the model has one, then closing tokens in order:

    c c ... c <eol> | c c ... c <eol> | ... (rows) | <close_0> <close_1> ...

(Emu3 and the bundled digit model; Janus has no end-of-row or closing tokens in its logits.)
Stream index g counts generated tokens from 0.  `slot_tokens` says what g may hold; the model
masks its logits with it (`guidance.cfg`) and fresh drafts follow it (`fresh`), so both read
this one definition.  Where each request chooses its image's size (Emu3), one grid holds the
model's ids and the size comes per request (`slot_tokens`' rows and codes_per_row); `resized`
is that request's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CODE = -1  # an image code, any of [code_start, code_stop)
FREE = -2  # outside the stream (the prompt, or after the closing tokens): any token


@dataclass(frozen=True)
class StreamGrid:
    code_start: int
    code_stop: int
    codes_per_row: int
    rows: int
    end_of_row: int | None = None
    closing: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.code_start < self.code_stop:
            raise ValueError(f"image codes [{self.code_start}, {self.code_stop}) must be a non-empty range of ids >= 0")
        if self.codes_per_row < 1 or self.rows < 1:
            raise ValueError(f"a grid of {self.rows} rows of {self.codes_per_row} codes: both must be >= 1")
        if any(t < 0 for t in self.forced_ids):
            raise ValueError(f"end-of-row and closing ids {list(self.forced_ids)} must be >= 0")
        inside = [t for t in self.forced_ids if self.code_start <= t < self.code_stop]
        if inside:
            raise ValueError(f"end-of-row and closing ids {inside} fall among the image codes [{self.code_start}, {self.code_stop})")

    @property
    def row_width(self) -> int:
        """Tokens per row in the stream, the end-of-row token included (SJD++'s `row_width`)."""
        return self.codes_per_row + (self.end_of_row is not None)

    @property
    def length(self) -> int:
        """Generated tokens of one image, closing tokens included."""
        return self.rows * self.row_width + len(self.closing)

    @property
    def forced_ids(self) -> tuple[int, ...]:
        """The ids a slot may be forced to: the end-of-row id, then the closing ids (distinct)."""
        ids = ((self.end_of_row,) if self.end_of_row is not None else ()) + self.closing
        return tuple(dict.fromkeys(ids))

    def resized(self, rows: int, codes_per_row: int) -> "StreamGrid":
        return replace(self, rows=rows, codes_per_row=codes_per_row)

    @property
    def max_token_id(self) -> int:
        return max(self.code_stop - 1, *self.forced_ids)

    def slot_tokens(self, index: np.ndarray, rows=None, codes_per_row=None) -> np.ndarray:
        """Stream indices (any shape, int) -> the one token each must be (>= 0), CODE or FREE.

        `rows`, `codes_per_row`: per index (broadcast with it), for grids whose size each request
        chooses (Emu3's); None: this grid's."""
        index = np.asarray(index, dtype=np.int64)
        rows = self.rows if rows is None else np.asarray(rows, dtype=np.int64)
        per_row = self.codes_per_row if codes_per_row is None else np.asarray(codes_per_row, dtype=np.int64)
        width = per_row + (self.end_of_row is not None)
        body = rows * width
        out = np.full(index.shape, FREE, dtype=np.int64)
        in_body = (index >= 0) & (index < body)
        out[in_body] = CODE
        if self.end_of_row is not None:
            out[in_body & (index % np.maximum(width, 1) == per_row)] = self.end_of_row
        if self.closing:
            tail = (index >= body) & (index < body + len(self.closing))
            out[tail] = np.asarray(self.closing, dtype=np.int64)[np.broadcast_to(index - body, index.shape)[tail]]
        return out

    def holds(self, index: np.ndarray, tokens: np.ndarray, rows=None, codes_per_row=None) -> np.ndarray:
        """Whether each token may stand at its stream index (same shapes)."""
        must, tokens = self.slot_tokens(index, rows, codes_per_row), np.asarray(tokens)
        is_code = (tokens >= self.code_start) & (tokens < self.code_stop)
        return np.where(must >= 0, tokens == must, (must == FREE) | is_code)

    def slot_classes(self, index: np.ndarray, rows=None, codes_per_row=None) -> np.ndarray:
        """Stream indices -> rows of `forbidden_masks`: 0 anything (FREE), 1 a code, 2 + i the
        i-th of `forced_ids` (the same classes for every size of the grid)."""
        slot = self.slot_tokens(index, rows, codes_per_row)
        classes = np.where(slot == FREE, 0, 1)
        for i, token in enumerate(self.forced_ids):
            classes[slot == token] = 2 + i
        return classes

    def forbidden_masks(self, vocab_size: int) -> np.ndarray:
        """[2 + len(forced_ids), vocab_size] bool: the ids each slot class forbids."""
        masks = np.ones((2 + len(self.forced_ids), vocab_size), dtype=bool)
        masks[0] = False
        masks[1, self.code_start : self.code_stop] = False
        for i, token in enumerate(self.forced_ids):
            masks[2 + i, token] = False
        return masks
