"""The interface every family of image AR models implements (`ImageFamily`).

A family answers two kinds of questions:
- the engine's, from the folder's config.json and generation_config.json only (no weights, no
  tokenizer): its unconditional rule, its SJD++ defaults, how many logits a position has;
- a client's (or the images endpoint's), from the whole folder: a text prompt as token ids, the
  tokens per image, and tokens to an image through the family's own image decoder.
The sampler never asks a family anything: a new family (LlamaGen, Emu3) is a new subclass here.

Where the image is: every family's prompt ends with its image-start token, so a request's
generated tokens are the image, in rows of the SJD++ default `row_width`.  The step relies on
it: spatial priors copy generated tokens only, never prompt ids.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .rule import CONFIG_KEY, GUIDED_LLAMA, UnconditionalRule

# config.json of a folder served with SJD++ defaults of its own: {"sjdpp": {option: value}}.
SJDPP_DEFAULTS_KEY = "sjdpp"
# config.json of a folder whose architecture alone does not say its family: {"sjdpp_family": name}.
FAMILY_KEY = "sjdpp_family"
# config.json of a folder whose generated stream has a fixed layout (`kernels.grid.StreamGrid`):
# {"code_range": [start, stop], "codes_per_row": n, "rows": n, "end_of_row": id, "closing": [ids]}.
GRID_KEY = "sjdpp_grid"
GRID_FIELDS = {"code_range", "codes_per_row", "rows", "end_of_row", "closing"}


class ImageFamily:
    """The base class is also the engine's view of a folder that names no family (a guided Llama
    with its rule under config.json "sjdpp_guidance"); it cannot make images."""

    name: ClassVar[str] = "guided-llama"
    # The negative prompt (text) a client sends when the user names none; None: the engine's
    # unconditional rule.
    default_negative_prompt: ClassVar[str | None] = None
    guidance_scale: ClassVar[float] = 1.0  # where generation_config.json names none
    sampling: ClassVar[dict[str, Any]] = {}  # the authors' sampling, where generation_config.json is silent

    # Engine side ---------------------------------------------------------------------------

    @classmethod
    def matches(cls, hf_config: Any) -> bool:
        return False

    @classmethod
    def foreign_format(cls, raw_config: dict) -> str | None:
        """Why a folder's config.json (as parsed JSON) is this family's checkpoint in a layout no
        loader here reads, naming the folder to use instead; None otherwise."""
        return None

    @classmethod
    def check(cls, hf_config: Any, generation_config: dict) -> None:
        """Raise ValueError naming what a folder of this family lacks, or the keys whose values
        contradict each other (vLLM start-up): nothing a folder holds may fail a request later."""
        rule = cls.unconditional_rule(hf_config, generation_config)
        ids = {"keep_token_ids": sorted(rule.keep_token_ids), "pad_token_id": [rule.pad_token_id]}
        check_token_ids(ids, getattr(hf_config, "vocab_size", None), "vocab_size", f"config.json {CONFIG_KEY!r}")
        grid = cls.stream_grid(hf_config)
        logits = cls.image_vocab_size(hf_config) or getattr(hf_config, "vocab_size", None)
        if grid is not None and logits is not None and grid.max_token_id >= logits:
            raise ValueError(
                f"config.json {GRID_KEY!r}: token id {grid.max_token_id} outside the model's {logits} logits"
            )

    @classmethod
    def unconditional_rule(cls, hf_config: Any, generation_config: dict) -> UnconditionalRule:
        return UnconditionalRule.from_config(getattr(hf_config, CONFIG_KEY, None))

    @classmethod
    def sjdpp_defaults(cls, hf_config: Any) -> dict[str, Any]:
        """SJD++ options the folder implies; config.json "sjdpp" overrides them, and the
        server's --speculative-config overrides both."""
        defaults = getattr(hf_config, SJDPP_DEFAULTS_KEY, None) or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"the model's config.json has {SJDPP_DEFAULTS_KEY!r} = {defaults!r}; expected an object")
        grid = cls.stream_grid(hf_config)
        implied = {} if grid is None else {
            "fresh_token_range": [grid.code_start, grid.code_stop], "row_width": grid.row_width, "init": "above",
        }
        return {**implied, **defaults}

    @classmethod
    def image_vocab_size(cls, hf_config: Any) -> int | None:
        """The number of logits per position when the model samples from a vocabulary of its own
        (image codes 0..n-1) narrower than its input vocabulary; None: the input vocabulary."""
        return None

    @classmethod
    def stream_grid(cls, hf_config: Any):
        """The generated stream's layout (`kernels.grid.StreamGrid`: which tokens each position
        may hold, which the model enforces), from config.json "sjdpp_grid"; None: no layout, or
        a folder not served as a guided Llama (only a guided model masks its logits).  Raises
        ValueError naming the key."""
        spec = getattr(hf_config, GRID_KEY, None)
        if spec is None or GUIDED_LLAMA not in (getattr(hf_config, "architectures", None) or []):
            return None
        from ..kernels import StreamGrid

        if not isinstance(spec, dict) or not {"code_range", "codes_per_row", "rows"} <= set(spec) <= GRID_FIELDS:
            raise ValueError(
                f"config.json {GRID_KEY!r} = {spec!r}: expected an object with code_range, codes_per_row, rows "
                "and optionally end_of_row, closing"
            )
        try:
            (start, stop), closing = spec["code_range"], tuple(spec.get("closing") or ())
            values = [start, stop, spec["codes_per_row"], spec["rows"], spec.get("end_of_row"), *closing]
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values):
                raise ValueError("ids and counts must be integers")
            return StreamGrid(start, stop, spec["codes_per_row"], spec["rows"], spec.get("end_of_row"), closing)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.json {GRID_KEY!r} = {spec!r}: {e}") from None

    @classmethod
    def request_grid(cls, hf_config: Any, prompt: list[int], grid=None):
        """The grid of the image a request's prompt asks for (`grid`: the model's, if known);
        a family whose size each request chooses reads it from the prompt (ValueError naming
        what is wrong).  Here: the model's."""
        return grid if grid is not None else cls.stream_grid(hf_config)

    @classmethod
    def default_guidance_scale(cls) -> float:
        """The guidance scale when generation_config.json names none (`guidance_scale`; 1: no
        guidance)."""
        return cls.guidance_scale

    @classmethod
    def default_sampling(cls) -> dict[str, Any]:
        """Sampling defaults the family's authors use, where generation_config.json is silent
        (`sampling`)."""
        return dict(cls.sampling)

    @classmethod
    def image_tokens(cls, hf_config: Any) -> int | None:
        """Generated tokens per image (a request's max_tokens, with ignore_eos); None: no images."""
        return None

    @classmethod
    def request_image_tokens(cls, hf_config: Any, prompt: list[int]) -> int | None:
        """Generated tokens of the image a prompt asks for (ValueError naming what is wrong with
        the prompt); here every image's."""
        return cls.image_tokens(hf_config)

    # Client side ---------------------------------------------------------------------------

    def __init__(self, folder: str | Path, config: Any = None):
        self.folder = Path(folder)
        if config is not None:  # already read by whoever found the family
            self.config = config

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder)

    @property
    def tokens_per_image(self) -> int:
        tokens = self.image_tokens(self.config)
        if tokens is None:
            raise NotImplementedError(f"{self.name} folders cannot make images")
        return tokens

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels: the default size."""
        raise NotImplementedError(f"{self.name} folders cannot make images")

    def parse_size(self, size: str | None) -> tuple[int, int]:
        """An images request's `size` ("WxH" or "auto", OpenAI's) -> (width, height) in pixels
        (ValueError saying which sizes this family makes).  Here: the one size."""
        width, height = self.image_size
        if size not in (None, "auto", f"{width}x{height}"):
            raise ValueError(f"size {size!r}: this model makes {width}x{height} images ('auto' or '{width}x{height}')")
        return width, height

    def tokens_for(self, size: tuple[int, int] | None = None) -> int:
        """Generated tokens of an image of `size` (None: the default)."""
        return self.tokens_per_image

    # `size`, below: (width, height) in pixels, from `parse_size`; None: the default.

    def prompt_ids(self, text: str, size: tuple[int, int] | None = None) -> list[int]:
        raise NotImplementedError(f"{self.name} folders cannot make images")

    def negative_prompt_ids(self, text: str | None, size: tuple[int, int] | None = None) -> list[int] | None:
        """The unconditional context of guidance: `text` (None: the family's documented negative
        prompt) inside the family's prompt, as transformers builds Emu3's and Janus's negative
        prompts; None where neither is given (the engine's rule).  ValueError as `prompt_ids`."""
        text = self.default_negative_prompt if text is None else text
        return None if text is None else self.prompt_ids(text, size)

    def check_decoder(self) -> None:
        """Raise ValueError naming what the image decoder lacks (files the user provides, where a
        family ships none); here nothing."""

    def to_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        """Generated tokens -> a PIL image."""
        raise NotImplementedError(f"{self.name} folders cannot make images")

    def to_partial_image(self, tokens: list[int], size: tuple[int, int] | None = None):
        """The first tokens of an image -> a PIL image of its complete rows, the rest grey."""
        raise NotImplementedError(f"{self.name} folders cannot make images")


class RequestSizedFamily(ImageFamily):
    """A family whose requests choose their image's size, read back from the prompt by
    `request_grid`: an image's tokens are its grid's."""

    @classmethod
    def image_tokens(cls, hf_config: Any) -> int:
        return cls.stream_grid(hf_config).length

    @classmethod
    def request_image_tokens(cls, hf_config: Any, prompt: list[int]) -> int:
        return cls.request_grid(hf_config, prompt).length


def per_vocabulary(build: Callable[[dict], Any]) -> Callable[[Any], Any]:
    """`build(vocabulary_map)` as a function of a config, built once per vocabulary (the last few
    kept, by identity): a family reads its ids from a 65536- or 184622-entry map, per request."""
    built: list[tuple[dict, Any]] = []

    @functools.wraps(build)
    def of(hf_config: Any) -> Any:
        vocabulary = hf_config.vocabulary_map
        for known, value in built:
            if known is vocabulary:
                return value
        value = build(vocabulary)
        built[:] = [(vocabulary, value), *built[:3]]
        return value

    return of


def check_vocabulary_ids(ids: dict[str, int], vocab_size: int, vocab_key: str, where: str) -> None:
    """Ids a folder's `vocabulary_map` gives ({key: id}; "code_stop" is one past the last code)
    must lie in the vocabulary the model embeds.  Raises ValueError naming them."""
    outside = {k: v for k, v in ids.items() if not 0 <= v < vocab_size + (k == "code_stop")}
    if outside:
        raise ValueError(f"{where}: ids {outside} of 'vocabulary_map' outside the vocabulary ({vocab_key}={vocab_size})")


def check_token_ids(ids: dict[str, list[int]], vocab_size: int | None, vocab_key: str, where: str) -> None:
    """Special ids a folder names ({key: ids}) must be text ids the model embeds: the uncond
    branch feeds the unconditional rule's ids to the forward.  Raises ValueError naming the key."""
    if vocab_size is None:
        return
    for key, values in ids.items():
        outside = [t for t in values if not 0 <= t < vocab_size]
        if outside:
            raise ValueError(f"{where} {key!r}: {outside} outside the text vocabulary ({vocab_key}={vocab_size})")


PARTIAL_FILL = 128  # the grey of rows not generated yet


def blank_below(image, top: int):
    """`image` with every pixel row from `top` down set to PARTIAL_FILL."""
    import numpy as np
    from PIL import Image

    pixels = np.array(image)
    pixels[top:] = PARTIAL_FILL
    return Image.fromarray(pixels)


def check_sampling_for_image_codes(params: Any, codes: int) -> None:
    """Refuse sampling options that address logits by text token id, for a model whose logits
    are n image codes (`ImageFamily.image_vocab_size`): vLLM would index outside them.  Raises
    ValueError naming the option."""

    def refuse(option: str, why: str) -> None:
        raise ValueError(f"sampling option {option!r} is not supported by this image model: {why}")

    if params.prompt_logprobs is not None:
        refuse("prompt_logprobs", "the prompt is text, the logits cover image codes only")
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(params, name) != neutral:
            refuse(name, "penalties count the text prompt's ids as image codes")
    if params.min_tokens:
        refuse("min_tokens", "an image has a fixed number of tokens: set max_tokens and ignore_eos")
    if params.bad_words:
        refuse("bad_words", "words are text, the logits cover image codes only")
    if params.allowed_token_ids is not None:
        refuse("allowed_token_ids", f"use the SJD++ option fresh_token_range to restrict drafts; logits are codes 0..{codes - 1}")
    if params.logit_bias and any(not 0 <= int(t) < codes for t in params.logit_bias):
        refuse("logit_bias", f"token ids must be image codes in [0, {codes})")
