"""The digit model's token stream: class prompt, rows of image codes with end-of-row tokens, image end.

    <bos> a handwritten 7 <boi> | c.. c.. ... c.. <eol> (x 16 rows) <eoi>
    ----------- prompt --------   --------- generated: 16 x 17 + 1 tokens ---------

Image tokens are the codes 0..255 of `vq` (one per 2x2 patch of a 32x32 image); a row is GRID
codes then an end-of-row token, so the row width in the stream is GRID + 1.  Only the prompt
names the class, so that the unconditional prompt (`unconditional_prompt_ids`: every prompt
token but <bos> and <boi> becomes <pad>, Janus's rule, at the same length) conditions on
nothing; classifier-free guidance then strengthens the class.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..families.rule import UnconditionalRule
from ..kernels import StreamGrid
from .vq import CODES, GREY_LEVELS, GRID, IMAGE_SIZE, Codebook, bundled

ROW_WIDTH = GRID + 1
SPECIAL = ["<eol>", "<boi>", "<eoi>", "<bos>", "<pad>", "<unk>"]
WORDS = ["a", "handwritten"] + [str(d) for d in range(10)]
VOCAB = [f"<c{i}>" for i in range(CODES)] + SPECIAL + WORDS
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
EOL, BOI, EOI, BOS, PAD = (TOKEN_ID[t] for t in ("<eol>", "<boi>", "<eoi>", "<bos>", "<pad>"))
# The unconditional prompt: every prompt token but <bos> and <boi> becomes <pad> (config.json
# "sjdpp_guidance").
UNCONDITIONAL = UnconditionalRule(frozenset({BOS, BOI}), PAD)
IMAGE_TOKENS = (0, CODES)  # [lo, hi)
# What each generated position may hold; the engine enforces it.
STREAM_GRID = StreamGrid(*IMAGE_TOKENS, codes_per_row=GRID, rows=GRID, end_of_row=EOL, closing=(EOI,))
GENERATED_LENGTH = STREAM_GRID.length
assert STREAM_GRID.row_width == ROW_WIDTH


def prompt_ids(digit: int) -> list[int]:
    """What the tokenizer makes of "a handwritten {digit}"."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0..9, got {digit!r}")
    return [BOS, TOKEN_ID["a"], TOKEN_ID["handwritten"], TOKEN_ID[str(digit)], BOI]


def unconditional_prompt_ids(prompt: list[int]) -> list[int]:
    """The prompt with its class removed: what class dropout trains and guidance runs."""
    return UNCONDITIONAL.apply(prompt)


def codes_to_ids(codes: np.ndarray) -> list[int]:
    """[GRID, GRID] codes -> the generated part of the stream."""
    if codes.shape != (GRID, GRID):
        raise ValueError(f"codes must be {GRID}x{GRID}, got {codes.shape}")
    rows = np.concatenate([codes.astype(np.int64), np.full((GRID, 1), EOL)], 1)
    return rows.reshape(-1).tolist() + [EOI]


def ids_to_codes(ids: list[int], strict: bool = False) -> np.ndarray:
    """The generated stream -> [GRID, GRID] codes.

    A malformed stream (wrong length, non-image tokens, rows cut short or too long) raises
    ValueError when `strict`, else gives a best-effort grid (missing codes 0, the darkest) and a warning.
    """
    problems = []
    ids = list(ids)
    if ids and ids[-1] == EOI:
        ids = ids[:-1]
    elif EOI in ids:
        problems.append("tokens after <eoi>")
        ids = ids[: ids.index(EOI)]
    else:
        problems.append("no <eoi>")
    rows, row = [], []
    for t in ids:
        if t == EOL:
            rows.append(row)
            row = []
        elif IMAGE_TOKENS[0] <= t < IMAGE_TOKENS[1]:
            row.append(t)
        else:
            problems.append(f"non-image token {t}")
    if row:
        rows.append(row)
        problems.append("last row without <eol>")
    if len(rows) != GRID or any(len(r) != GRID for r in rows):
        problems.append(f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}, not {GRID}x{GRID}")
    codes = np.zeros((GRID, GRID), dtype=np.int64)
    for r, values in enumerate(rows[:GRID]):
        values = values[:GRID]
        codes[r, : len(values)] = values
    if problems:
        message = "malformed image stream: " + "; ".join(dict.fromkeys(problems))
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return codes


def image_to_ids(image: np.ndarray, codebook: Codebook | None = None) -> list[int]:
    """[IMAGE_SIZE, IMAGE_SIZE] grey levels -> the generated stream (bundled codebook by default)."""
    return codes_to_ids((codebook or bundled()).encode(image))


def ids_to_image(ids: list[int], strict: bool = False, codebook: Codebook | None = None) -> np.ndarray:
    """The generated stream -> [IMAGE_SIZE, IMAGE_SIZE] grey levels; malformed streams as `ids_to_codes`."""
    return (codebook or bundled()).decode(ids_to_codes(ids, strict))


def to_png(images: list[np.ndarray], path, columns: int = 10, scale: int = 3) -> None:
    """Grey-level images (0..16, white on black as in the data) -> one PNG grid."""
    from PIL import Image

    if not images:
        raise ValueError("no images to write")
    rows = -(-len(images) // columns)
    pad = 2
    cell = IMAGE_SIZE + pad
    grid = np.zeros((rows * cell + pad, min(columns, len(images)) * cell + pad), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * cell : pad + r * cell + IMAGE_SIZE, pad + c * cell : pad + c * cell + IMAGE_SIZE] = np.rint(
            np.clip(image, 0, GREY_LEVELS - 1) * 255 / (GREY_LEVELS - 1)
        )
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def build_tokenizer():
    """A word-level tokenizer: "a handwritten 7" -> prompt_ids(7); image tokens are <cN>, <eol>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <boi>", special_tokens=[("<bos>", BOS), ("<boi>", BOI)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eoi>", pad_token="<pad>", unk_token="<unk>"
    )
