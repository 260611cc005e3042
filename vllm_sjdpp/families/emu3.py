"""Emu3 (BAAI) in the Hugging Face format, `Emu3ForConditionalGeneration` (BAAI/Emu3-Gen-hf),
generating images.

The stream (transformers' `Emu3Processor(return_for_image_generation=True)` and the
`prefix_allowed_tokens_fn` of its docs): the prompt is

    <bos> text <|image start|> H*W <|image token|>

with the size H*W (codes; 8 px each) written as ordinary text, and the model generates H rows
of W visual tokens, each row closed by the end-of-line token `<|extra_200|>`, then `<|extra_201|>`
(end of frame), `<|image end|>` and `<|extra_204|>` (EOS): H*(W+1)+3 tokens, 8193 at 720 px.
Each request chooses its size, so each has its own grid (`request_grid`, read from its prompt).

Every id comes from config.json's `vocabulary_map` (the tokenizer's whole vocabulary, as the
conversion to the HF format writes it), so the engine needs no tokenizer: the size text of a
prompt is read back through it.  The unconditional context of a token-id request without a
negative prompt is the empty prompt (`<bos>` and the image header: what the processor makes of
""), of another length, so it runs paired (`guidance.pairing`); text clients (the images
endpoint) default to Emu3's documented negative prompt, through the processor like the prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .base import RequestSizedFamily, blank_below, check_vocabulary_ids, per_vocabulary

ARCHITECTURE = "Emu3ForConditionalGeneration"
SPECIAL = {
    "end_of_row": "<|extra_200|>", "end_of_frame": "<|extra_201|>", "bos": "<|extra_203|>", "eos": "<|extra_204|>",
    "image_token": "<|image token|>", "image_start": "<|image start|>", "image_end": "<|image end|>",
}
SPATIAL_FACTOR = 8  # pixels per code, each way (Emu3Processor's downsample ratio)
DEFAULT_AREA = 518400  # Emu3Processor's default image area (720 x 720 px: 90 x 90 codes)
# BAAI's sampling recipe for Emu3-Gen (github.com/baaivision/Emu3, image generation example).
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_TOP_K = 2048
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
SIZE_TEXT = re.compile(r"(\d+)\*(\d+)")


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


@dataclass(frozen=True)
class EmptyPromptRule:
    """The unconditional context as Emu3's processor makes it from an empty text: the prompt's
    first token (<bos>) and its image header, from `image_start_id` on.  Of another length than
    the prompt (a paired request)."""

    image_start_id: int
    pairs = True  # every request runs with its companion (`guidance.pairing`)

    def apply(self, prompt: list[int]) -> list[int]:
        if self.image_start_id not in prompt[1:]:
            raise ValueError(
                f"an Emu3 prompt must end with its image header (<|image start|>, id {self.image_start_id}, then "
                "the size and <|image token|>), as Emu3Processor(return_for_image_generation=True) makes it"
            )
        start = len(prompt) - 1 - prompt[::-1].index(self.image_start_id)
        return prompt[:1] + prompt[start:]


class Emu3Family(RequestSizedFamily):
    name = "emu3"
    default_negative_prompt = NEGATIVE_PROMPT
    guidance_scale = DEFAULT_GUIDANCE_SCALE
    sampling = {"top_k": DEFAULT_TOP_K}

    @classmethod
    def matches(cls, hf_config: Any) -> bool:
        return ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])

    @classmethod
    def ids(cls, hf_config: Any) -> dict[str, int]:
        """The special ids and the visual tokens' range ("code_start", "code_stop") from
        config.json `vocabulary_map` (ValueError naming what is missing)."""
        vocabulary = getattr(hf_config, "vocabulary_map", None)
        if not isinstance(vocabulary, dict):
            raise ValueError("Emu3: config.json 'vocabulary_map' (the tokenizer's vocabulary) is missing")
        codes = getattr(getattr(hf_config, "vq_config", None), "codebook_size", None)
        if not isinstance(codes, int) or codes < 1:
            raise ValueError(f"Emu3: config.json vq_config.codebook_size = {codes!r}")
        names = {**SPECIAL, "code_start": visual_token(0), "code_last": visual_token(codes - 1)}
        lacking = [name for name in names.values() if name not in vocabulary]
        if lacking:
            raise ValueError(f"Emu3: config.json 'vocabulary_map' lacks {lacking}")
        ids = {key: int(vocabulary[name]) for key, name in names.items()}
        ids["code_stop"] = ids.pop("code_last") + 1
        if ids["code_stop"] - ids["code_start"] != codes:
            raise ValueError(
                f"Emu3: the {codes} visual tokens of 'vocabulary_map' are not consecutive ids "
                f"({ids['code_start']} .. {ids['code_stop'] - 1})"
            )
        return ids

    @classmethod
    def check(cls, hf_config: Any, generation_config: dict) -> None:
        text = getattr(hf_config, "text_config", None)
        if text is None:
            raise ValueError("Emu3: config.json 'text_config' is missing")
        check_vocabulary_ids(cls.ids(hf_config), text.vocab_size, "text_config.vocab_size", "Emu3")
        cls.stream_grid(hf_config)  # the special ids apart from the codes

    @classmethod
    def unconditional_rule(cls, hf_config: Any, generation_config: dict) -> EmptyPromptRule:
        return EmptyPromptRule(cls.ids(hf_config)["image_start"])

    @classmethod
    def stream_grid(cls, hf_config: Any):
        """The grid at the processor's default size (90 x 90 codes); each request's own is
        `request_grid`."""
        from ..kernels import StreamGrid

        ids = cls.ids(hf_config)
        side = default_side()
        closing = (ids["end_of_frame"], ids["image_end"], ids["eos"])
        return StreamGrid(ids["code_start"], ids["code_stop"], side, side, ids["end_of_row"], closing)

    @classmethod
    def request_grid(cls, hf_config: Any, prompt: list[int], grid=None):
        """The grid of the image a prompt asks for: its size read from the header (ValueError
        naming what is wrong)."""
        grid = grid or cls.stream_grid(hf_config)
        ids = cls.ids(hf_config)
        start = EmptyPromptRule(ids["image_start"]).apply(prompt)
        if start[-1] != ids["image_token"]:
            raise ValueError("an Emu3 prompt must end with <|image token|>, after its image header's size")
        words = _words(hf_config)
        text = "".join(words.get(t, "\0") for t in start[2:-1])
        size = SIZE_TEXT.fullmatch(text)
        if size is None or min(int(size[1]), int(size[2])) < 1:
            raise ValueError(f"an Emu3 prompt's image header must give its size as H*W codes, got {text!r}")
        return grid.resized(int(size[1]), int(size[2]))

    # Client side ---------------------------------------------------------------------------

    @cached_property
    def processor(self):
        from transformers import Emu3Processor

        return Emu3Processor.from_pretrained(self.folder)

    @property
    def image_size(self) -> tuple[int, int]:
        side = default_side() * SPATIAL_FACTOR
        return side, side

    def parse_size(self, size: str | None) -> tuple[int, int]:
        """"WxH" in multiples of 8 px (a code each way), or "auto" (720x720)."""
        if size in (None, "auto"):
            return self.image_size
        match = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
        if match is None or int(match[1]) % SPATIAL_FACTOR or int(match[2]) % SPATIAL_FACTOR or min(int(match[1]), int(match[2])) < SPATIAL_FACTOR:
            raise ValueError(f"size {size!r}: Emu3 makes WxH images in multiples of {SPATIAL_FACTOR} px (or 'auto', {self.image_size[0]}x{self.image_size[1]})")
        return int(match[1]), int(match[2])

    def tokens_for(self, size: tuple[int, int] | None = None) -> int:
        width, height = size or self.image_size
        return (height // SPATIAL_FACTOR) * (width // SPATIAL_FACTOR + 1) + len(self.stream_grid(self.config).closing)

    def prompt_ids(self, text: str, size: tuple[int, int] | None = None) -> list[int]:
        """The processor's prompt for an image of `size` (width, height in px; multiples of 8)."""
        width, height = size or self.image_size
        if width % SPATIAL_FACTOR or height % SPATIAL_FACTOR or min(width, height) < SPATIAL_FACTOR:
            raise ValueError(f"Emu3 makes images in multiples of {SPATIAL_FACTOR} px, got {width}x{height}")
        out = self.processor(
            text=[text], return_for_image_generation=True, ratio=f"{width}:{height}", image_area=width * height,
        )
        return [int(t) for t in out["input_ids"][0]]

    @cached_property
    def vq(self):
        """The folder's `Emu3VQVAE` alone (the text model is not loaded)."""
        import torch
        from safetensors import safe_open
        from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

        model = Emu3VQVAE(self.config.vq_config)
        state = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    for prefix in ("vqmodel.", "model.vqmodel."):
                        if key.startswith(prefix):
                            state[key[len(prefix):]] = f.get_tensor(key)
        model.load_state_dict(state)
        return model.to(torch.float32).eval()

    def codes(self, tokens: list[int], rows: int, per_row: int):
        """Generated tokens -> [rows, per_row] codes (the end-of-row and closing tokens dropped)."""
        import numpy as np

        start = self.ids(self.config)["code_start"]
        body = np.asarray(tokens[: rows * (per_row + 1)], dtype=np.int64).reshape(rows, per_row + 1)
        return body[:, :per_row] - start

    def to_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        """Generated tokens (the whole stream) -> a PIL image through the folder's VQ decoder."""
        import torch

        width, height = size or self.image_size
        codes = torch.from_numpy(self.codes(tokens, height // SPATIAL_FACTOR, width // SPATIAL_FACTOR))
        with torch.no_grad():
            pixels = self.vq.decode(codes[None])
        return self.processor.postprocess(pixels, return_tensors="PIL.Image.Image")["pixel_values"][0]

    def to_partial_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        width, height = size or self.image_size
        per_row = width // SPATIAL_FACTOR
        rows = len(tokens) // (per_row + 1)
        full = list(tokens[: rows * (per_row + 1)])
        start = self.ids(self.config)["code_start"]
        pad = ([start] * per_row + [0]) * (height // SPATIAL_FACTOR - rows)
        return blank_below(self.to_image(full + pad, size), rows * SPATIAL_FACTOR)


def default_side() -> int:
    """Codes per side at the processor's default area and ratio 1:1 (its calculate_generate_size)."""
    return int(round(math.sqrt(DEFAULT_AREA) / SPATIAL_FACTOR))


@per_vocabulary
def _words(vocabulary: dict[str, int]) -> dict[int, str]:
    """id -> token string of `vocabulary_map` (byte-level BPE: ASCII digits and '*' are themselves)."""
    return {i: w for w, i in vocabulary.items()}
