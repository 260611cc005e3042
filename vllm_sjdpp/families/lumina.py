"""Lumina-mGPT (Alpha-VLLM) and other Chameleon folders (`ChameleonXLLMXForConditionalGeneration`,
`ChameleonForConditionalGeneration`), generating images.

The stream, as Alpha-VLLM's code writes it (github.com/Alpha-VLLM/Lumina-mGPT:
`lumina_mgpt/data/item_processor.py`, `inference_solver.py`):

    <s> "Generate an image of {W}x{H} according to the following prompt:\\n{caption}" <eot>
    <racm3:break> <size H> <size W>   H/16 rows of W/16 codes, each closed by <new line>   <eoss>

where <eot> is the end of a turn (`<reserved08706>`, id 8710, also the generation's EOS), the
size tokens count 32-px units (`<reserved{8800 + n:05d}>`), the codes are the `IMGIMG*` tokens
(8192 of them, ids 4..8195) and <new line> is `<reserved08799>`.  Lumina-mGPT lets the model write
the image header itself; here the prompt ends with it, so that each request chooses its size
(`request_grid` reads it back), and ends with the image: 2353 generated tokens at 768x768 (48 x 49,
then <eoss>; the turn's end that follows in Lumina-mGPT's stream is text, outside the grid).

Guidance (classifier-free, on the raw logits, as `inference_solver.py`'s processor): the
unconditional context is the stream from <racm3:break> on, without the text or <s>: another length
than the prompt, so every request runs paired (`guidance.pairing`).  Defaults: scale 3.0 and image
top-k 2000 (Lumina-mGPT's and the SJD papers'), where generation_config.json is silent.

Every id comes from config.json's `vocabulary_map` (the tokenizer's vocabulary, as transformers'
conversion writes it); a code's VQ index is read from its token's name, not its id.  Images are
decoded by the user's Chameleon VQGAN (`chameleon_vqgan`; `vqgan_folder` says where it is looked
for), never bundled: without it token ids are served and images are refused (`check_decoder`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .base import RequestSizedFamily, blank_below, check_vocabulary_ids, per_vocabulary

ARCHITECTURES = ("ChameleonXLLMXForConditionalGeneration", "ChameleonForConditionalGeneration")
SPECIAL = {
    "image_start": "<racm3:break>", "image_end": "<eoss>", "end_of_row": "<reserved08799>",
    "end_of_turn": "<reserved08706>", "size_zero": "<reserved08800>",
}
CODE_PREFIX = "IMGIMG"
CODES = 8192
PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{caption}"
SIZE_UNIT = 32  # pixels per size token unit
PIXELS_PER_CODE = 16
STANDARD_SIDES = (512, 768, 1024)  # Lumina-mGPT's checkpoints
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_TOP_K = 2000
VQGAN_ENV = "SJDPP_CHAMELEON_VQGAN"  # a folder holding the user's vqgan.yaml and vqgan.ckpt


def code_name(code: int) -> str:
    """The token name of VQ code `code` (its digits as letters A-J, then a closing letter), the
    inverse of transformers' `ChameleonImageVocabularyMapping.bpe2img`."""
    return CODE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


@dataclass(frozen=True)
class ImageHeaderRule:
    """The unconditional context as Lumina-mGPT's guidance builds it: the prompt from its last
    <racm3:break> on (the image header), with positions from 0.  Another length than the prompt
    (a paired request)."""

    image_start_id: int
    pairs = True

    def apply(self, prompt: list[int]) -> list[int]:
        if self.image_start_id not in prompt:
            raise ValueError(
                f"a Lumina-mGPT prompt must end with its image header (<racm3:break>, id {self.image_start_id}, then "
                "the height and width size tokens)"
            )
        return prompt[len(prompt) - 1 - prompt[::-1].index(self.image_start_id):]


class LuminaFamily(RequestSizedFamily):
    name = "lumina-mgpt"
    guidance_scale = DEFAULT_GUIDANCE_SCALE
    sampling = {"top_k": DEFAULT_TOP_K}

    @classmethod
    def matches(cls, hf_config: Any) -> bool:
        return any(a in ARCHITECTURES for a in (getattr(hf_config, "architectures", None) or []))

    @classmethod
    def ids(cls, hf_config: Any) -> dict[str, int]:
        """The special ids and the codes' range ("code_start", "code_stop") from config.json
        `vocabulary_map` (ValueError naming what is missing or out of place)."""
        if not isinstance(getattr(hf_config, "vocabulary_map", None), dict):
            raise ValueError("Chameleon: config.json 'vocabulary_map' (the tokenizer's vocabulary) is missing")
        return dict(_ids(hf_config))

    @classmethod
    def code_of_id(cls, hf_config: Any) -> dict[int, int]:
        """Token id -> VQ code, from the `IMGIMG*` names (transformers' `bpe2img`)."""
        return _code_of_id(hf_config)

    @classmethod
    def check(cls, hf_config: Any, generation_config: dict) -> None:
        if getattr(hf_config, "swin_norm", False):
            raise ValueError("Chameleon: config.json 'swin_norm' is true (Chameleon-34B's norm placement), which this "
                             "plugin does not run")
        check_vocabulary_ids(cls.ids(hf_config), hf_config.vocab_size, "vocab_size", "Chameleon")
        cls.stream_grid(hf_config)  # the special ids apart from the codes

    @classmethod
    def unconditional_rule(cls, hf_config: Any, generation_config: dict) -> ImageHeaderRule:
        return ImageHeaderRule(cls.ids(hf_config)["image_start"])

    @classmethod
    def default_side(cls, hf_config: Any) -> int:
        """Pixels per side of the default image: the largest of Lumina-mGPT's sizes whose stream
        (with a short prompt) fits the context."""
        context = getattr(hf_config, "max_position_embeddings", 0)
        fitting = [s for s in STANDARD_SIDES if stream_length(s, s) + 128 <= context]
        return max(fitting, default=STANDARD_SIDES[0])

    @classmethod
    def stream_grid(cls, hf_config: Any):
        """The grid at the default size; each request's own is `request_grid`."""
        from ..kernels import StreamGrid

        ids = cls.ids(hf_config)
        side = cls.default_side(hf_config) // PIXELS_PER_CODE
        return StreamGrid(ids["code_start"], ids["code_stop"], side, side, ids["end_of_row"], (ids["image_end"],))

    @classmethod
    def request_grid(cls, hf_config: Any, prompt: list[int], grid=None):
        """The grid of the image a prompt asks for: its size tokens read from its header
        (ValueError naming what is wrong)."""
        grid = grid or cls.stream_grid(hf_config)
        ids = cls.ids(hf_config)
        header = ImageHeaderRule(ids["image_start"]).apply(prompt)
        units = [t - ids["size_zero"] for t in header[1:]]
        if len(units) != 2 or min(units) < 1 or max(units) > 256:
            raise ValueError(
                "a Lumina-mGPT prompt must end with <racm3:break> and two size tokens, height then width "
                f"(<reserved{8800 + 1:05d}> and on: 32 px each)"
            )
        height, width = (u * SIZE_UNIT // PIXELS_PER_CODE for u in units)
        return grid.resized(height, width)

    # Client side ---------------------------------------------------------------------------

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    @property
    def image_size(self) -> tuple[int, int]:
        side = self.default_side(self.config)
        return side, side

    def parse_size(self, size: str | None) -> tuple[int, int]:
        """"WxH" in multiples of 32 px, or "auto" (the default square)."""
        if size in (None, "auto"):
            return self.image_size
        match = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
        if match is None or int(match[1]) % SIZE_UNIT or int(match[2]) % SIZE_UNIT or min(int(match[1]), int(match[2])) < SIZE_UNIT:
            raise ValueError(
                f"size {size!r}: Lumina-mGPT makes WxH images in multiples of {SIZE_UNIT} px "
                f"(or 'auto', {self.image_size[0]}x{self.image_size[1]})"
            )
        return int(match[1]), int(match[2])

    def tokens_for(self, size: tuple[int, int] | None = None) -> int:
        width, height = size or self.image_size
        return stream_length(width, height)

    def prompt_ids(self, text: str, size: tuple[int, int] | None = None) -> list[int]:
        """Lumina-mGPT's prompt for an image of `size` (width, height in px; multiples of 32),
        with its image header."""
        width, height = size or self.image_size
        if width % SIZE_UNIT or height % SIZE_UNIT or min(width, height) < SIZE_UNIT:
            raise ValueError(f"Lumina-mGPT makes images in multiples of {SIZE_UNIT} px, got {width}x{height}")
        ids = self.ids(self.config)
        words = self.tokenizer.encode(PROMPT_TEMPLATE.format(width=width, height=height, caption=text), add_special_tokens=False)
        bos = self.tokenizer.bos_token_id
        header = [ids["image_start"], ids["size_zero"] + height // SIZE_UNIT, ids["size_zero"] + width // SIZE_UNIT]
        return [bos, *words, ids["end_of_turn"], *header]

    @cached_property
    def vqgan_folder(self) -> Path | None:
        """Where the user's Chameleon VQGAN (vqgan.yaml, vqgan.ckpt) is: $SJDPP_CHAMELEON_VQGAN,
        else the model folder, else its tokenizer/ (Lumina-mGPT's ckpts/chameleon/tokenizer/
        layout); None if none holds both."""
        from .chameleon_vqgan import CONFIG_FILE, WEIGHTS_FILE

        candidates = [Path(os.environ[VQGAN_ENV])] if os.environ.get(VQGAN_ENV) else [self.folder, self.folder / "tokenizer"]
        return next((c for c in candidates if (c / CONFIG_FILE).is_file() and (c / WEIGHTS_FILE).is_file()), None)

    def check_decoder(self) -> None:
        from .chameleon_vqgan import CONFIG_FILE, WEIGHTS_FILE

        if self.vqgan_folder is None:
            where = os.environ.get(VQGAN_ENV) or f"{self.folder} or {self.folder / 'tokenizer'}"
            raise ValueError(
                f"Lumina-mGPT images are decoded by the Chameleon VQGAN, whose {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"(Meta's Chameleon release) are not in {where}: put them there or name their folder in "
                f"${VQGAN_ENV}; token ids are served without them"
            )

    @cached_property
    def vq(self):
        from . import chameleon_vqgan

        self.check_decoder()
        return chameleon_vqgan.load(self.vqgan_folder)

    def codes(self, tokens: list[int], rows: int, per_row: int):
        """Generated tokens -> [rows, per_row] VQ codes (new lines dropped; codes read from the
        tokens' names)."""
        import numpy as np

        body = np.asarray(tokens[: rows * (per_row + 1)], dtype=np.int64).reshape(rows, per_row + 1)
        return self.code_table[body[:, :per_row]]

    @cached_property
    def code_table(self):
        """[vocab_size] token id -> VQ code (0 off the codes)."""
        import numpy as np

        table = np.zeros(self.config.vocab_size, dtype=np.int64)
        for token, code in self.code_of_id(self.config).items():
            table[token] = code
        return table

    def to_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        """Generated tokens (the whole stream) -> a PIL image through the user's VQGAN."""
        from .chameleon_vqgan import decode

        width, height = size or self.image_size
        return decode(self.vq, self.codes(tokens, height // PIXELS_PER_CODE, width // PIXELS_PER_CODE))

    def to_partial_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        width, height = size or self.image_size
        per_row = width // PIXELS_PER_CODE
        rows = len(tokens) // (per_row + 1)
        first = self.ids(self.config)["code_start"]
        pad = ([first] * per_row + [0]) * (height // PIXELS_PER_CODE - rows)
        return blank_below(self.to_image(list(tokens[: rows * (per_row + 1)]) + pad, size), rows * PIXELS_PER_CODE)


@per_vocabulary
def _code_of_id(vocabulary: dict[str, int]) -> dict[int, int]:
    digits = str.maketrans({chr(ord("A") + i): str(i) for i in range(10)})
    return {int(i): int(name[len(CODE_PREFIX): -1].translate(digits)) for name, i in vocabulary.items() if name.startswith(CODE_PREFIX)}


@per_vocabulary
def _ids(vocabulary: dict[str, int]) -> dict[str, int]:
    lacking = [name for name in SPECIAL.values() if name not in vocabulary]
    if lacking:
        raise ValueError(f"Chameleon: config.json 'vocabulary_map' lacks {lacking}")
    ids = {key: int(vocabulary[name]) for key, name in SPECIAL.items()}
    codes = _code_of_id.__wrapped__(vocabulary)
    if len(codes) != CODES:
        raise ValueError(f"Chameleon: config.json 'vocabulary_map' has {len(codes)} {CODE_PREFIX}* tokens, not {CODES}")
    ids["code_start"], ids["code_stop"] = min(codes), max(codes) + 1
    if ids["code_stop"] - ids["code_start"] != CODES:
        raise ValueError(f"Chameleon: the {CODE_PREFIX}* tokens of 'vocabulary_map' are not consecutive ids")
    return ids


def stream_length(width: int, height: int) -> int:
    """Generated tokens of a WxH image: its rows of codes, each closed, then <eoss>."""
    return (height // PIXELS_PER_CODE) * (width // PIXELS_PER_CODE + 1) + 1
