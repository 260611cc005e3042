"""The bundled digit model (`vllm_sjdpp.digits`) as a family: a guided Llama whose config.json
names the family, with its own word-level tokenizer and k-means VQ codebook in the folder."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from .base import FAMILY_KEY, ImageFamily, blank_below
from .rule import GUIDED_LLAMA


class DigitsFamily(ImageFamily):
    name = "digits"

    @classmethod
    def matches(cls, hf_config: Any) -> bool:
        return GUIDED_LLAMA in (getattr(hf_config, "architectures", None) or []) and getattr(
            hf_config, FAMILY_KEY, None
        ) == cls.name

    @classmethod
    def stream_grid(cls, hf_config: Any):
        """16 rows of 16 codes, each row closed by <eol>, the image by <eoi> (`digits.tokens`)."""
        from ..digits.tokens import STREAM_GRID

        return STREAM_GRID

    @classmethod
    def image_tokens(cls, hf_config: Any) -> int:
        from ..digits.tokens import GENERATED_LENGTH

        return GENERATED_LENGTH

    @property
    def image_size(self) -> tuple[int, int]:
        from ..digits.vq import IMAGE_SIZE

        return IMAGE_SIZE, IMAGE_SIZE

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    @cached_property
    def codebook(self):
        from ..digits.vq import Codebook

        return Codebook.load(self.folder)

    def prompt_ids(self, text: str, size: tuple[int, int] | None = None) -> list[int]:
        """The folder's tokenizer: "a handwritten 7" -> <bos> a handwritten 7 <boi>."""
        ids = self.tokenizer(text)["input_ids"]
        if self.tokenizer.unk_token_id in ids:
            raise ValueError(f"the digit model knows only 'a handwritten 0' ... 'a handwritten 9', got {text!r}")
        return ids

    def to_partial_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        import warnings

        from ..digits.tokens import EOL
        from ..digits.vq import GRID, IMAGE_SIZE

        rows = min(list(tokens).count(EOL), GRID)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unfinished stream is malformed by design
            image = self.to_image(tokens)
        return blank_below(image, rows * IMAGE_SIZE // GRID)

    def to_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        """Best effort for a malformed stream (a warning); white digits on black, 32x32 grey."""
        import numpy as np
        from PIL import Image

        from ..digits.tokens import ids_to_image
        from ..digits.vq import GREY_LEVELS

        grey = ids_to_image(tokens, codebook=self.codebook)
        return Image.fromarray(np.rint(np.clip(grey, 0, GREY_LEVELS - 1) * 255 / (GREY_LEVELS - 1)).astype(np.uint8))
