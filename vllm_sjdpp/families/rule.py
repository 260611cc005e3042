"""How a folder names its unconditional context for classifier-free guidance, and the
architecture name of a guided Llama: facts a folder's config.json holds, read by the families
(and written by the digit model's training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# config.json: {"architectures": [GUIDED_LLAMA], "sjdpp_guidance": {"keep_token_ids": [...], "pad_token_id": N}}
GUIDED_LLAMA = "GuidedLlamaForCausalLM"
CONFIG_KEY = "sjdpp_guidance"


@dataclass(frozen=True)
class UnconditionalRule:
    """Janus's rule (LlamaGen's null class is the case keep = {}): every prompt token that is
    not kept becomes the pad token, so the unconditional prompt has the prompt's length and is a
    per-token function of it (prefix caching stays correct)."""

    keep_token_ids: frozenset[int]
    pad_token_id: int
    pairs = False  # the unconditional prompt never runs as a sequence of its own

    @classmethod
    def from_config(cls, options: Any) -> "UnconditionalRule":
        if not isinstance(options, dict) or set(options) != {"keep_token_ids", "pad_token_id"}:
            raise ValueError(
                f"config.json {CONFIG_KEY!r} must be {{'keep_token_ids': [ids], 'pad_token_id': id}}, "
                f"got {options!r}"
            )
        return cls(frozenset(int(t) for t in options["keep_token_ids"]), int(options["pad_token_id"]))

    def to_config(self) -> dict:
        return {"keep_token_ids": sorted(self.keep_token_ids), "pad_token_id": self.pad_token_id}

    def apply(self, prompt: list[int]) -> list[int]:
        return [t if t in self.keep_token_ids else self.pad_token_id for t in prompt]
