"""Families of image AR models (one small interface each, `base.ImageFamily`) and how a folder
finds its own.  Importing this package imports neither vLLM nor a family's heavy libraries.

Owns: what a folder's configs say (unconditional rule, `rule`; SJD++ defaults; logits per
position; the image's grid and tokens, and the generated stream's layout (`stream_grid`); the
start-up checks of a folder) and what a client needs
(text to prompt ids, tokens to an image through the family's decoder).

May import: the bundled digit model's formats (`vllm_sjdpp.digits.vq`, `.tokens`) and
transformers.  Never the engine, guidance, serving or vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ImageFamily
from .digits import DigitsFamily
from .emu3 import Emu3Family
from .janus import JanusFamily
from .lumina import LuminaFamily

FAMILIES: tuple[type[ImageFamily], ...] = (JanusFamily, Emu3Family, LuminaFamily, DigitsFamily)


def family_of(hf_config: Any) -> type[ImageFamily]:
    """The family a config belongs to; the base class for a folder that names none."""
    return next((f for f in FAMILIES if f.matches(hf_config)), ImageFamily)


def load(folder: str | Path) -> ImageFamily:
    """The family of a model folder, ready to make prompts and images."""
    from transformers import AutoConfig

    path = Path(folder)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (not a model folder)")
    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    if family is ImageFamily:
        names = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"{path}: architectures {config.architectures} belong to no image family ({names})")
    return family(path, config)


def logits_size(model_config: Any) -> int:
    """Logits per position of a model vLLM serves (what samplers and drafts range over)."""
    return family_of(model_config.hf_config).image_vocab_size(model_config.hf_config) or model_config.get_vocab_size()


def stream_grid(model_config: Any):
    """The generated stream's layout of a model vLLM serves (`kernels.grid.StreamGrid`), or None."""
    return family_of(model_config.hf_config).stream_grid(model_config.hf_config)
