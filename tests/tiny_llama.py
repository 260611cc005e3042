"""A tiny Llama built locally (no hub), with moderately peaked next-token distributions."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Engines in tests: in-process, small KV cache, nothing fetched, no seed probe at start-up (its
# own tests, and the Janus and Emu3 servers', turn it on: SEED_PROBE_ON).
ENGINE_ENV = {
    "SJDPP_SEED_PROBE": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


SEED_PROBE_ON = {"SJDPP_SEED_PROBE": "1"}
# The tiny Llama's SJD++ server shared by the serving tests (tests/serving/conftest.py).
SJDPP_SERVER_K, SJDPP_SERVER_MAX_MODEL_LEN = 6, 64


def set_engine_env() -> None:
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)


# The tiny guided Llama's unconditional rule: every prompt token but BOS (0) becomes PAD (47).
GUIDED_PAD, GUIDED_KEEP = 47, (0,)
# The gridded tiny guided Llama's stream: 3 rows of 3 codes from [2, 44), each closed by 44, then
# 45 46 (14 tokens), with fresh drafts copying the left neighbour (which the grid must correct).
TINY_GRID = {"code_range": [2, 44], "codes_per_row": 3, "rows": 3, "end_of_row": 44, "closing": [45, 46]}
TINY_GRID_CONFIG = {"sjdpp_grid": TINY_GRID, "sjdpp": {"fresh_token_range": [2, 44], "init": "left"}}


def build_tiny_llama(
    path: Path, vocab_size: int = 48, sharpness: float = 12.0, seed: int = 0, guided: bool = False,
    num_key_value_heads: int = 2, extra_config: dict | None = None,
) -> Path:
    """`sharpness` scales the output head: larger is more peaked (and more predictable).

    guided: the folder is served as vllm-sjdpp's GuidedLlamaForCausalLM (classifier-free
    guidance) with the unconditional rule above; transformers still loads it as a Llama.
    extra_config: more keys for a guided folder's config.json (a stream grid, SJD++ defaults).
    """
    import json

    from vllm_sjdpp.families.rule import CONFIG_KEY, GUIDED_LLAMA, UnconditionalRule

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the CPU attention backend rejects 16
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    model.save_pretrained(path)
    if guided:
        config_path = Path(path) / "config.json"
        config = json.loads(config_path.read_text())
        config["architectures"] = [GUIDED_LLAMA]
        config[CONFIG_KEY] = UnconditionalRule(frozenset(GUIDED_KEEP), GUIDED_PAD).to_config()
        config.update(extra_config or {})
        config_path.write_text(json.dumps(config))
    return path
