"""Janus and Janus-Pro (DeepSeek) in the Hugging Face format, `JanusForConditionalGeneration`
(deepseek-community/Janus-Pro-1B, -7B), generating images.

How text ids and image codes share one id space: positionally.  A request's prompt is text
(token ids of the Llama's vocabulary, made by the folder's chat template and processor), and
every token after the prompt is an image code 0..n-1 of the VQ codebook (n = 16384), the
generation head's output.  So the id 5 means the text token 5 inside the prompt and the image
code 5 after it: the model embeds prompt positions with the text embeddings and later positions
with the generation embeddings and aligner.  Samplers and SJD++ see only the n codes (the logits
have n columns, not the text vocabulary's 102400), and n <= the text vocabulary keeps every code
a valid id for vLLM.  The engine-side facts below come from config.json and
generation_config.json alone.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from .base import ImageFamily, blank_below, check_token_ids
from .rule import UnconditionalRule

ARCHITECTURE = "JanusForConditionalGeneration"
DEEPSEEK_MODEL_TYPE, DEEPSEEK_ARCHITECTURE = "multi_modality", "MultiModalityCausalLM"  # deepseek-ai/Janus-Pro-*


def _require(value: Any, where: str) -> Any:
    if value is None:
        raise ValueError(f"not a Janus image-generation folder: {where} is missing")
    return value


class JanusFamily(ImageFamily):
    name = "janus"

    @classmethod
    def matches(cls, hf_config: Any) -> bool:
        return ARCHITECTURE in (getattr(hf_config, "architectures", None) or [])

    @classmethod
    def foreign_format(cls, raw_config: dict) -> str | None:
        # deepseek-ai's release (github.com/deepseek-ai/Janus): a model_type transformers has no
        # class for, so AutoConfig asks to "upgrade Transformers".
        if raw_config.get("model_type") == DEEPSEEK_MODEL_TYPE or DEEPSEEK_ARCHITECTURE in (raw_config.get("architectures") or []):
            return (
                f"the deepseek-ai Janus format (model_type {DEEPSEEK_MODEL_TYPE!r}, {DEEPSEEK_ARCHITECTURE}), which "
                f"transformers does not read; use a transformers-format Janus folder, such as "
                f"deepseek-community/Janus-Pro-7B or deepseek-community/Janus-Pro-1B"
            )
        return None

    @classmethod
    def check(cls, hf_config: Any, generation_config: dict) -> None:
        text = _require(getattr(hf_config, "text_config", None), "config.json 'text_config'")
        if getattr(text, "model_type", None) != "llama":
            raise ValueError(f"Janus: the language model must be a Llama, got text_config.model_type={text.model_type!r}")
        codes = cls.image_vocab_size(hf_config)
        if codes > text.vocab_size:
            raise ValueError(
                f"Janus: vq_config.num_embeddings={codes} image codes exceed the text vocabulary "
                f"(text_config.vocab_size={text.vocab_size}); the codes share its ids"
            )
        grid = cls.grid(hf_config)
        vision = _require(getattr(hf_config, "vision_config", None), "config.json 'vision_config'")
        tokens = _require(getattr(vision, "num_image_tokens", None), "vision_config.num_image_tokens")
        if grid * grid != tokens:
            raise ValueError(f"Janus: vision_config.num_image_tokens={tokens} is not a {grid}x{grid} grid (vq_config.num_patches)")
        levels = len(getattr(hf_config.vq_config, "channel_multiplier", None) or [1])
        pixels = grid * 2 ** (levels - 1)  # the VQ decoder doubles the grid at every level but the first
        size = getattr(vision, "image_size", None)
        if size != pixels:
            raise ValueError(
                f"Janus: vision_config.image_size={size}, but the VQ decoder makes {pixels} px images "
                f"(vq_config.num_patches={grid}, {levels} levels of vq_config.channel_multiplier)"
            )
        ids = {key: [value] for key, value in cls.special_ids(generation_config).items()}
        check_token_ids(ids, text.vocab_size, "text_config.vocab_size", "generation_config.json")

    @classmethod
    def special_ids(cls, generation_config: dict) -> dict[str, int]:
        """generation_config.json's BOS, pad and image-start ids, by key."""
        where = "generation_config.json"
        ids = {
            "bos_token_id": _require(generation_config.get("bos_token_id"), f"{where} 'bos_token_id'"),
            "pad_token_id": _require(generation_config.get("pad_token_id"), f"{where} 'pad_token_id'"),
            # transformers' generate reads generation_kwargs; its conversion script sets a top-level key.
            "boi_token_id": _require(
                (generation_config.get("generation_kwargs") or {}).get("boi_token_id", generation_config.get("boi_token_id")),
                f"{where} 'generation_kwargs': {{'boi_token_id': ...}}",
            ),
        }
        bad = {k: v for k, v in ids.items() if isinstance(v, bool) or not isinstance(v, int)}
        if bad:
            raise ValueError(f"Janus: {where} {bad}: token ids must be integers")
        return ids

    @classmethod
    def unconditional_rule(cls, hf_config: Any, generation_config: dict) -> UnconditionalRule:
        """transformers' `generate(generation_mode="image")`: every prompt token but BOS and the
        image-start token becomes the pad token."""
        ids = cls.special_ids(generation_config)
        return UnconditionalRule(frozenset({ids["bos_token_id"], ids["boi_token_id"]}), ids["pad_token_id"])

    @classmethod
    def image_vocab_size(cls, hf_config: Any) -> int:
        vq = _require(getattr(hf_config, "vq_config", None), "config.json 'vq_config'")
        return int(_require(getattr(vq, "num_embeddings", None), "vq_config.num_embeddings"))

    @classmethod
    def grid(cls, hf_config: Any) -> int:
        """Image tokens per row (and rows): 24 for 384 px images of 16 px patches."""
        return int(_require(getattr(hf_config.vq_config, "num_patches", None), "vq_config.num_patches"))

    @classmethod
    def image_tokens(cls, hf_config: Any) -> int:
        return int(hf_config.vision_config.num_image_tokens)

    @classmethod
    def sjdpp_defaults(cls, hf_config: Any) -> dict[str, Any]:
        """Fresh tokens are image codes copied from the row above, rows are grid codes wide (no
        end-of-row tokens); config.json "sjdpp" overrides."""
        implied = {
            "fresh_token_range": [0, cls.image_vocab_size(hf_config)],
            "row_width": cls.grid(hf_config),
            "init": "above",
        }
        return {**implied, **super().sjdpp_defaults(hf_config)}

    # Client side: the folder's processor, chat template and VQ decoder (transformers') ----------

    @cached_property
    def processor(self):
        from transformers import JanusProcessor

        return JanusProcessor.from_pretrained(self.folder)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config.vision_config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def prompt_ids(self, text: str, size: tuple[int, int] | None = None) -> list[int]:
        """As `JanusProcessor` prepares image generation: the chat template with a generation
        prompt, then the image-start token."""
        if not text or not text.strip():
            raise ValueError("the prompt is empty")
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        chat = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.processor(text=[chat], generation_mode="image", return_tensors="pt")["input_ids"][0].tolist()

    @cached_property
    def decoder(self):
        """The folder's own VQ model (transformers' `JanusVQVAE`), loaded alone from the
        checkpoint (sharded or not) under its key prefix."""
        import torch
        from transformers import JanusVQVAE
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # every other weight of the folder is "unexpected"
        try:
            decoder, info = JanusVQVAE.from_pretrained(
                self.folder, config=self.config.vq_config, key_mapping={r"^model\.vqmodel\.": ""},
                dtype=torch.float32, output_loading_info=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            raise ValueError(f"{self.folder}: the VQ decoder's weights are missing: {sorted(info['missing_keys'])[:5]}")
        return decoder.eval()

    def to_partial_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        grid = self.grid(self.config)
        rows = min(len(tokens) // grid, grid)
        done = list(tokens[: rows * grid])
        image = self.to_image(done + [0] * (self.tokens_per_image - len(done)))
        return blank_below(image, rows * self.image_size[1] // grid)

    def to_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        import torch

        if len(tokens) != self.tokens_per_image:
            raise ValueError(f"a Janus image is {self.tokens_per_image} tokens, got {len(tokens)}")
        codes = self.image_vocab_size(self.config)
        if not all(0 <= t < codes for t in tokens):
            raise ValueError(f"image tokens must be codes in [0, {codes})")
        with torch.no_grad():
            pixels = self.decoder.decode(torch.tensor([tokens]))  # [1, 3, H, W], normalised
        return self.processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"][0]
