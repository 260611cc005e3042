"""`GuidedLlamaForCausalLM`: vLLM's Llama with classifier-free guidance (see `guidance`).

config.json names this architecture and holds the unconditional rule under "sjdpp_guidance";
the weights are an ordinary Llama's (transformers loads the folder as `LlamaForCausalLM`).

In the "stacked" layout (`cfg`) the engine sees a model with twice the attention and KV heads
(`apply_layout`, run when vLLM builds the model config), so the KV cache pages, the attention
backends and their metadata all size themselves for both branches.  Inside, the dense layers run
the two branches as one stack of 2T rows (cond rows, then uncond rows); attention regroups them
into T rows of 2H heads, [cond heads | uncond heads], so that with grouped queries every query
head still reads its own branch's KV heads (interleaving them would not).  In the "paired"
layout the engine sees the checkpoint's heads and each sequence runs its T rows once: the
guidance is all in compute_logits, which combines each row with its companion's.

The branches are stacked inside the module vLLM compiles (`GuidedLlamaModel`, or the module that
holds a `LlamaStack`): its inputs are the runner's T-row ids and positions and the guidance
inputs, buffers that never move, so vLLM's compile ranges (in tokens of the batch, up to
--max-num-batched-tokens) and its CUDA graphs (which replay captured input addresses) hold.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from vllm.compilation.decorators import ignore_torch_compile, support_torch_compile
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.sequence import IntermediateTensors

from ..families import family_of
from .cfg import BRANCH_HEADS_ATTR, LAYOUT_ATTR, STACKED, GuidanceBatch, chosen_layout, combine


def guided_llama_config_hook(model_config) -> None:
    """vLLM's per-architecture config hook: refuse a folder whose facts contradict each other
    (naming the keys), give the engine the heads of its guidance layout, and the family's
    sampling defaults where generation_config.json is silent (Emu3's top-k 2048, Lumina-mGPT's
    2000)."""
    hf_config = model_config.hf_config
    family = family_of(hf_config)
    given = model_config.try_get_generation_config()
    family.check(hf_config, given)
    apply_layout(model_config)
    defaults = {k: v for k, v in family.default_sampling().items() if k not in given}
    if defaults:
        model_config.override_generation_config = {**defaults, **(model_config.override_generation_config or {})}


def check_parallelism(vllm_config) -> None:
    """Refuse, at start-up and naming the flag, the parallel modes a guided model cannot run:
    - --enable-dbo: dual-batch overlap splits a forward's tokens into micro-batches, while the
      guidance inputs (`cfg.GuidanceBatch`) describe the whole batch from token 0;
    - --pipeline-parallel-size > 1: the branches are stacked before the first layer and combined
      after the last, ends that no single pipeline stage holds;
    - --tensor-parallel-size above the checkpoint's KV heads, in the stacked layout: a rank's
      attention holds half of the doubled heads' KV for each branch (`GuidedLlamaAttention`),
      whole heads only while every rank has at least one KV head of each branch; past that vLLM
      replicates KV heads.
    Raises ValueError."""
    parallel = vllm_config.parallel_config
    arch = vllm_config.model_config.architecture
    if parallel.enable_dbo:
        raise ValueError(f"--enable-dbo: dual-batch overlap is not supported with {arch} (classifier-free guidance)")
    if parallel.pipeline_parallel_size > 1:
        raise ValueError(
            f"--pipeline-parallel-size {parallel.pipeline_parallel_size}: pipeline parallelism is not supported with "
            f"{arch} (classifier-free guidance); use --tensor-parallel-size"
        )
    text = vllm_config.model_config.hf_text_config
    _, kv_heads = getattr(text, BRANCH_HEADS_ATTR, None) or (
        text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    )
    if getattr(text, LAYOUT_ATTR, STACKED) == STACKED and parallel.tensor_parallel_size > kv_heads:
        raise ValueError(
            f"--tensor-parallel-size {parallel.tensor_parallel_size}: {arch} has {kv_heads} KV heads per guidance "
            f"branch, and guidance needs every rank to hold whole KV heads of both branches: at most {kv_heads}"
        )


def check_async_speculation(vllm_config) -> None:
    """Refuse, when the model runner starts, asynchronous scheduling with speculative decoding
    (`--async-scheduling` with vLLM's own EAGLE or n-gram drafters; SJD++ turns it off): vLLM
    then counts drafts as computed before they are verified, while the guidance inputs read the
    prompt's place and the grid's positions from those counts.  Raises ValueError."""
    if vllm_config.scheduler_config.async_scheduling and vllm_config.speculative_config is not None:
        raise ValueError(
            f"--async-scheduling with speculative decoding is not supported with "
            f"{vllm_config.model_config.architecture} (classifier-free guidance); use --no-async-scheduling"
        )


def apply_layout(model_config) -> None:
    """Mark the model as served with guidance, in the layout its config chooses
    (`cfg.chosen_layout`; ValueError naming the key): the engine's view of the model has 2H heads
    in the stacked layout, the checkpoint's H in the paired one.

    Idempotent (the config travels to worker processes already set).
    """
    text = model_config.hf_text_config
    if getattr(text, BRANCH_HEADS_ATTR, None) is not None:
        return
    layout = chosen_layout(model_config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    text.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    setattr(text, BRANCH_HEADS_ATTR, (heads, kv_heads))
    setattr(text, LAYOUT_ATTR, layout)
    if layout == STACKED:
        text.num_attention_heads, text.num_key_value_heads = 2 * heads, 2 * kv_heads
        model_config.model_arch_config = model_config.get_model_arch_config()


class GuidedLlamaAttention(LlamaAttention):
    """Stacked layout: built with the doubled head counts (so its `attn` has 2H query and 2H_kv
    KV heads), then given projections of one branch's size, the checkpoint's.  Paired layout:
    vLLM's Llama attention, with the checkpoint's heads."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int, **kwargs):
        super().__init__(config, hidden_size, num_heads, num_kv_heads, **kwargs)
        self.stacked = getattr(config, LAYOUT_ATTR, STACKED) == STACKED
        if not self.stacked:
            return
        heads, kv_heads = getattr(config, BRANCH_HEADS_ATTR)
        prefix, quant_config = kwargs.get("prefix", ""), kwargs.get("quant_config")
        self.qkv_proj = QKVParallelLinear(
            hidden_size, self.head_dim, heads, kv_heads, bias=kwargs.get("bias", False),
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            heads * self.head_dim, hidden_size, bias=kwargs.get("bias_o_proj", False),
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        # Per tensor-parallel rank, one branch.
        self.q_size //= 2
        self.kv_size //= 2

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [2T, D] stacked (cond rows, then uncond rows), [T, D] paired; positions alike.
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, *self.qk_norm(q, k))
        if self.stacked:  # [2T, n] -> [T, 2n]: each token's cond heads, then its uncond heads.
            q, k, v = (torch.cat(x.chunk(2), dim=-1) for x in (q, k, v))
        out = self.attn(q, k, v)
        if self.stacked:
            out = torch.cat(out.chunk(2, dim=-1))
        output, _ = self.o_proj(out)
        return output


    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys [branches * T, n] before the rotary embedding: as they are
        (Chameleon's are normalized, `guidance.chameleon`)."""
        return q, k


class GuidedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config, prefix, config, attn_layer_type=GuidedLlamaAttention)


# vLLM's dynamic dimension for the compiled forwards below: dim 0, the batch's T tokens.
BATCH_DIMS = {"input_ids": {0: "b"}, "positions": {0: "b"}, "intermediate_tensors": {0: "b"}, "inputs_embeds": {0: "b"}}


class BranchForward:
    """The forward of the module vLLM compiles in a guided model: it takes the batch's T tokens
    and runs its branches, [T] ids -> [T, branches * D + 2] (`run_branches`).  A subclass calls
    `hold_guidance` when built and gives `branch_stack()`, its Llama stack's forward, and
    `branch_embed`, None or a method [branches * T] ids -> input embeddings."""

    branch_embed = None

    def hold_guidance(self, guidance: GuidanceBatch) -> None:
        """Keep `guidance`, and its input of the forward as a buffer of this module (not
        persistent: no checkpoint has it).  The compiled forward then takes it as the module's
        state, as it takes the weights, also when vLLM loads the forward from its AOT compile
        cache at a later start; `guidance` writes the same storage in place each step."""
        self.guidance = guidance
        self.branches = guidance.branches
        self.register_buffer("uncond_override", guidance.uncond_override, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return run_branches(
            self.branch_stack(), self.uncond_override, input_ids, positions, intermediate_tensors, self.branch_embed,
            self.branches,
        )


@support_torch_compile(dynamic_arg_dims=BATCH_DIMS)
class GuidedLlamaModel(BranchForward, LlamaModel):
    """vLLM's Llama stack (the checkpoint's `model.*`), compiled with the branches inside."""

    def __init__(self, *, vllm_config, prefix: str = "", layer_type=GuidedLlamaDecoderLayer, guidance_config=None):
        """`guidance_config`: the engine's config, where `vllm_config` is its text model's (Emu3)."""
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.hold_guidance(GuidanceBatch.for_model(guidance_config or vllm_config, self.embed_tokens.weight.device))

    def branch_stack(self):
        return functools.partial(LlamaModel.forward, self)


@ignore_torch_compile
class LlamaStack(LlamaModel):
    """vLLM's Llama stack, not compiled on its own: a guided model compiles the module that holds
    it, whose forward stacks the branches (see the module docstring)."""


class GuidedLlamaForCausalLM(LlamaForCausalLM):
    decoder_layer = GuidedLlamaDecoderLayer  # a subclass's layers (Chameleon's norm queries and keys)

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=self.decoder_layer)
        self.guidance = self.model.guidance

    def _init_model(self, vllm_config, prefix: str = "", layer_type=GuidedLlamaDecoderLayer):
        return GuidedLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return guided_logits(hidden_states, self.config.hidden_size, super().compute_logits, self.guidance)


def run_branches(
    stack: Callable[..., torch.Tensor],
    uncond_override: torch.Tensor,
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    intermediate_tensors,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    branches: int = 2,
) -> torch.Tensor:
    """The branches of T tokens through a Llama stack built of `GuidedLlamaDecoderLayer`s: with 2
    (stacked), [T, 2D + 2] = cond hidden states | uncond hidden states | each row's index in the
    batch; with 1 (paired), [T, D + 2] = each sequence's own hidden states | the index.

    stack: a LlamaModel's forward (ids, positions, intermediate tensors, embeddings) -> [branches * T, D];
    embed: token ids [branches * T] (cond, then uncond) -> input embeddings; None: the stack's own."""
    if input_ids is None:
        raise NotImplementedError("guided models take token ids, not prompt embeddings")
    num_tokens = input_ids.shape[0]
    if branches == 2:
        ids = torch.cat([input_ids, GuidanceBatch.unconditional_ids(uncond_override, input_ids)])
        positions = torch.cat([positions, positions])
    else:
        ids = input_ids
    if embed is None:
        hidden = stack(ids, positions, intermediate_tensors, None)
    else:
        hidden = stack(None, positions, intermediate_tensors, embed(ids))
    index = GuidanceBatch.index_columns(num_tokens, hidden.dtype, hidden.device)
    return torch.cat([*hidden.chunk(branches), index], dim=-1)


def guided_logits(hidden_states: torch.Tensor, hidden_size: int, head, guidance: GuidanceBatch) -> torch.Tensor | None:
    """`run_branches`' rows -> guided logits, each row at its request's scale, then held to the
    stream's grid; `head` maps hidden states to logits (None on a tensor-parallel rank that does
    not gather).  One branch per sequence: a row's unconditional logits are its companion's
    (`GuidanceBatch.guide_pairs`)."""
    branches = guidance.branches
    *hidden, index = hidden_states.split([hidden_size] * branches + [2], dim=-1)
    logits = head(torch.cat(hidden))
    if logits is None:
        return None
    if branches == 1:
        return guidance.constrain(guidance.guide_pairs(logits, index), index)
    cond_logits, uncond_logits = logits.chunk(2)
    uncond_logits = guidance.unconditional_rows(guidance.rows(index), cond_logits, uncond_logits)
    return guidance.constrain(combine(cond_logits, uncond_logits, guidance.row_scales(index)), index)
