"""`JanusForConditionalGeneration` folders in vLLM, generating images with classifier-free
guidance (the family's facts are in `families.janus`, the guidance in `guidance`).

Only the image-generation path of Janus is built: the Llama (with both guidance branches, as
`GuidedLlamaForCausalLM`), the generation embeddings and aligner that embed image codes, and the
generation head whose logits cover the codebook.  The vision encoder, its aligner, the VQ model
and the text head are not loaded (the VQ decoder runs where images are made, `families.janus`).
The generation aligner and head are vLLM's linear layers with the checkpoint's names, as the
Llama's are: on the CPU vLLM's GEMM gives a row the same bits whatever the number of rows beside
it, which torch's float32 linear (MKL / oneDNN chosen by the row count) does not, and the seed
promise rests on that (`engine.seed_probe`).

Prompt positions are embedded as text, later positions as image codes (see `families.janus` for
the id space): the model learns which is which from the guidance inputs the model runner fills
before each forward.  Both embeddings are computed for every row and one is selected, which
keeps the forward free of data-dependent shapes (CUDA graphs); the aligner is two small
matmuls against the Llama's layers.  vLLM compiles `JanusGenerationModel`, whose forward takes
the batch's T tokens and stacks the branches inside (see `guidance.llama`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.utils import AutoWeightsLoader

from ..families import family_of
from ..families.janus import JanusFamily
from .cfg import GuidanceBatch
from .llama import BATCH_DIMS, BranchForward, GuidedLlamaDecoderLayer, LlamaStack, apply_layout, guided_logits

# Weights of the checkpoint that image generation does not use.
UNUSED_PREFIXES = ["model.vision_model.", "model.aligner.", "model.vqmodel.", "lm_head."]


def janus_config_hook(model_config) -> None:
    """vLLM's per-architecture config hook: refuse a folder that is not a Janus image generator
    (naming what it lacks), then give the engine the heads of its guidance layout."""
    JanusFamily.check(model_config.hf_config, model_config.try_get_generation_config())
    apply_layout(model_config)


class GenerationAligner(nn.Module):
    """transformers' `JanusVQVAEAlignerMLP` (the same weights and names) in vLLM's layers:
    [N, embed_dim] code embeddings -> [N, projection_dim], the Llama's hidden size."""

    def __init__(self, vq, prefix: str = ""):
        super().__init__()
        self.fc1 = ReplicatedLinear(vq.embed_dim, vq.projection_dim, bias=True, prefix=f"{prefix}.fc1")
        self.hidden_layers = nn.ModuleList(
            ReplicatedLinear(vq.projection_dim, vq.projection_dim, bias=True, prefix=f"{prefix}.hidden_layers.{i}")
            for i in range(vq.num_hidden_layers - 1)
        )
        self.activation_fn = ACT2FN[vq.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.fc1(hidden_states)
        for layer in self.hidden_layers:
            hidden_states, _ = layer(self.activation_fn(hidden_states))
        return hidden_states


class GenerationHead(nn.Module):
    """transformers' `JanusVQVAEHead` (the same weights and names) in vLLM's layers:
    [N, image_token_embed_dim] hidden states -> [N, num_embeddings] logits over the codebook."""

    def __init__(self, vq, prefix: str = ""):
        super().__init__()
        self.proj_out = ReplicatedLinear(vq.image_token_embed_dim, vq.projection_dim, bias=True, prefix=f"{prefix}.proj_out")
        self.activation_fn = ACT2FN[vq.hidden_act]
        self.vision_head = ReplicatedLinear(vq.projection_dim, vq.num_embeddings, bias=True, prefix=f"{prefix}.vision_head")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.proj_out(hidden_states)
        hidden_states, _ = self.vision_head(self.activation_fn(hidden_states))
        return hidden_states


@support_torch_compile(dynamic_arg_dims=BATCH_DIMS)
class JanusGenerationModel(BranchForward, nn.Module):
    """`model.*` of the checkpoint, the parts that generate images (the names are the checkpoint's),
    compiled with the branches inside (`BranchForward`)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_vllm_config = vllm_config.with_hf_config(config.text_config, architectures=["LlamaForCausalLM"])
        self.language_model = LlamaStack(
            vllm_config=text_vllm_config, prefix=f"{prefix}.language_model", layer_type=GuidedLlamaDecoderLayer
        )
        vq = config.vq_config
        self.generation_embeddings = nn.Embedding(vq.num_embeddings, vq.embed_dim)
        self.generation_aligner = GenerationAligner(vq, prefix=f"{prefix}.generation_aligner")
        self.generation_head = GenerationHead(vq, prefix=f"{prefix}.generation_head")
        self.hold_guidance(GuidanceBatch.for_model(vllm_config, self.generation_embeddings.weight.device))

    def branch_embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[branches * T] ids (cond rows, then uncond rows) -> embeddings: text for prompt
        positions, the aligned generation embedding for image codes."""
        prompt = GuidanceBatch.prompt_mask(self.uncond_override, ids.shape[0] // self.branches).repeat(self.branches)
        text = self.language_model.embed_input_ids(torch.where(prompt, ids, 0))
        codes = self.generation_embeddings(torch.where(prompt, 0, ids))
        image = self.generation_aligner(codes).to(text.dtype)
        return torch.where(prompt[:, None], text, image)

    def branch_stack(self):
        return self.language_model


class GuidedJanusForImageGeneration(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        assert family_of(model_config.hf_config) is JanusFamily
        self.config = model_config.hf_config
        self.model = JanusGenerationModel(vllm_config=vllm_config, prefix="model")
        self.guidance = self.model.guidance

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (what vLLM asks of a model for prompt tokens)."""
        return self.model.language_model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the image codebook (the generation head), guided."""
        size = self.config.text_config.hidden_size
        return guided_logits(hidden_states, size, self.model.generation_head, self.guidance)

    def load_weights(self, weights):
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=UNUSED_PREFIXES).load_weights(weights)
