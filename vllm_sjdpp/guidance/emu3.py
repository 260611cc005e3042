"""`Emu3ForConditionalGeneration` folders in vLLM, generating images with classifier-free guidance
(the family's facts, prompt and stream are in `families.emu3`).

Emu3's text model is a Llama (transformers' `Emu3TextModel` is `LlamaModel`; its decoder layer
adds dropout, a no-op at inference), over a vocabulary that holds the visual tokens, so the
guided Llama runs it as it is (`GuidedLlamaForCausalLM` on `text_config`).  The VQ model is not
loaded: images are decoded where they are made (`families.emu3`).  The checkpoint's names are
either transformers 5's (`model.text_model.*`, `lm_head.*`, `model.vqmodel.*`) or the hub's
(`text_model.model.*`, `text_model.lm_head.*`, `vqmodel.*`): both load.
"""

from __future__ import annotations

from .llama import GuidedLlamaDecoderLayer, GuidedLlamaForCausalLM, GuidedLlamaModel

# checkpoint prefix -> vLLM's Llama prefix; None: not loaded.
PREFIXES = (
    ("text_model.model.", "model."), ("model.text_model.", "model."), ("text_model.lm_head.", "lm_head."),
    ("vqmodel.", None), ("model.vqmodel.", None),
)


def renamed(weights):
    for name, tensor in weights:
        for old, new in PREFIXES:
            if name.startswith(old):
                if new is not None:
                    yield new + name[len(old):], tensor
                break
        else:
            yield name, tensor


class GuidedEmu3ForConditionalGeneration(GuidedLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        self._guidance_config = vllm_config  # the guidance inputs read the whole folder's facts
        super().__init__(
            vllm_config=vllm_config.with_hf_config(config.text_config, architectures=["LlamaForCausalLM"]), prefix=prefix
        )

    def _init_model(self, vllm_config, prefix: str = "", layer_type=GuidedLlamaDecoderLayer):
        return GuidedLlamaModel(
            vllm_config=vllm_config, prefix=prefix, layer_type=layer_type, guidance_config=self._guidance_config
        )

    def load_weights(self, weights):
        return super().load_weights(renamed(weights))
