"""Families of image AR models (one small interface each, `base.ImageFamily`) and how a folder
finds its own.  Importing this package imports neither vLLM nor a family's heavy libraries.

Owns: what a folder's configs say (unconditional rule, `rule`; SJD++ defaults; logits per
position; the image's grid and tokens, and the generated stream's layout (`stream_grid`); the
start-up checks of a folder) and what a client needs
(text to prompt ids, tokens to an image through the family's decoder).

May import: the bundled digit model's formats (`vllm_sjdpp.digits.vq`, `.tokens`) and
transformers.  Never the engine, guidance, serving or vLLM."""

from __future__ import annotations

import json
import re
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


def resolve(folder: str | Path, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A model folder: `folder` itself, or a hub id ("owner/name") looked up offline in
    `download_dir` (vLLM's --download-dir) and the local Hugging Face cache, where `vllm serve`
    stores what it downloads.  Raises FileNotFoundError naming where it looked and how to fetch
    the folder."""
    path = Path(folder)
    if path.is_dir() or not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", str(folder)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    caches = [c for c in (download_dir, constants.HF_HUB_CACHE) if c]
    for cache in caches:
        try:
            return Path(snapshot_download(str(folder), revision=revision, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):
            continue
    raise FileNotFoundError(
        f"{folder}: neither a folder nor in the local Hugging Face cache ({', '.join(map(str, caches))}); "
        f"download it first (hf download {folder})"
    )


def foreign_format(folder: Path) -> str | None:
    """Why a folder is in a format no family reads (a checkpoint's original release layout where
    transformers has its own), naming the folder to use instead; None when it is not."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return next((why for why in (f.foreign_format(raw) for f in FAMILIES) if why), None)


def load(folder: str | Path, revision: str | None = None, download_dir: str | None = None) -> ImageFamily:
    """The family of a model folder (or a hub id in the local cache, `resolve`), ready to make
    prompts and images.  Raises FileNotFoundError (no such folder) or ValueError (a folder no
    family reads, naming why)."""
    from transformers import AutoConfig

    path = resolve(folder, revision, download_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    why = foreign_format(path)
    if why:
        raise ValueError(f"{folder}: {why}")
    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    if family is ImageFamily:
        names = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"{folder}: architectures {config.architectures} belong to no image family ({names})")
    return family(path, config)


def logits_size(model_config: Any) -> int:
    """Logits per position of a model vLLM serves (what samplers and drafts range over)."""
    return family_of(model_config.hf_config).image_vocab_size(model_config.hf_config) or model_config.get_vocab_size()


def stream_grid(model_config: Any):
    """The generated stream's layout of a model vLLM serves (`kernels.grid.StreamGrid`), or None."""
    return family_of(model_config.hf_config).stream_grid(model_config.hf_config)
