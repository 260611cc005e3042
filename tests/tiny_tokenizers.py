"""Byte-level BPE tokenizers for the tiny real-shaped folders: the 256 byte tokens where a folder
puts them, and every special token at its real id (no merges: text is spelled in bytes)."""

from __future__ import annotations

import json
from pathlib import Path


def byte_tokens(first: int) -> dict[str, int]:
    """The 256 byte tokens of a byte-level BPE at ids first..first + 255."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: first + b for b, char in bytes_to_unicode().items()}


def write_byte_level_tokenizer(out: Path, vocab: dict[str, int], special: dict[str, int], config: dict) -> None:
    """tokenizer.json (`vocab`, with `special` as added special tokens) and tokenizer_config.json
    (`config`) in `out`."""
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for t, i in sorted(special.items(), key=lambda x: x[1])
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
