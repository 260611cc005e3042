"""Chameleon folders in vLLM (Lumina-mGPT's `ChameleonXLLMXForConditionalGeneration`, and
`ChameleonForConditionalGeneration`), generating images with classifier-free guidance (the
family's facts, prompt and stream are in `families.lumina`).

Chameleon's text model is a Llama whose attention normalizes queries and keys per head before the
rotary embedding: a LayerNorm over each head's dimensions, then that head's own weight and bias
(transformers' `ChameleonLayerNorm`, the checkpoint's `self_attn.q_norm` / `k_norm` of shape
[heads, head_dim]).  The guided Llama runs it with that norm added (`GuidedChameleonAttention`);
nothing masks the image logits (transformers' `ChameleonForConditionalGeneration` sets them to the
dtype's minimum, for text chat).  The VQ model is not loaded: images are decoded on the API server.

Not supported, refused when the engine is built, naming the setting: `swin_norm` (Chameleon-34B's
norm placement; `families.lumina` checks the folder) and --tensor-parallel-size above 1 (the
per-head norms are not sharded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.models.llama import LlamaDecoderLayer

from .cfg import BRANCH_HEADS_ATTR
from .llama import GuidedLlamaAttention, GuidedLlamaForCausalLM

UNLOADED_PREFIXES = ("model.vqmodel.",)
NORM_EPS = 1e-5  # transformers' ChameleonLayerNorm's, whatever the config says


class HeadNorm(nn.Module):
    """[N, heads * head_dim] -> the same, each head normalized over its head_dim, then scaled and
    shifted by its own row of `weight` and `bias` ([heads, head_dim])."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.view(-1, self.heads, self.head_dim), (self.head_dim,), eps=NORM_EPS)
        return (x * self.weight + self.bias).flatten(1)


class GuidedChameleonAttention(GuidedLlamaAttention):
    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int, **kwargs):
        super().__init__(config, hidden_size, num_heads, num_kv_heads, **kwargs)
        heads, kv_heads = getattr(config, BRANCH_HEADS_ATTR)
        self.q_norm = HeadNorm(heads, self.head_dim)
        self.k_norm = HeadNorm(kv_heads, self.head_dim)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class GuidedChameleonDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config, prefix, config, attn_layer_type=GuidedChameleonAttention)


class GuidedChameleonForConditionalGeneration(GuidedLlamaForCausalLM):
    decoder_layer = GuidedChameleonDecoderLayer

    def __init__(self, *, vllm_config, prefix: str = ""):
        tp = vllm_config.parallel_config.tensor_parallel_size
        if tp > 1:
            raise ValueError(
                f"--tensor-parallel-size {tp}: {vllm_config.model_config.architecture} normalizes each attention "
                "head with weights this plugin does not shard; use --tensor-parallel-size 1"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights):
        return super().load_weights((n, t) for n, t in weights if not n.startswith(UNLOADED_PREFIXES))
