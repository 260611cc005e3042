"""Patch of vllm/config/vllm.py: the guided architectures this plugin registers never run on vLLM's
Model Runner V2.

On CUDA with Triton, vLLM 0.32 runs Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`) unless
a feature it lacks is set (`VllmConfig.use_v2_model_runner`).  `--speculative-config sjdpp`
(vLLM's custom_class) is such a feature, a plain guided server is not.  Everything the guided
models need lives in the V1 runner this plugin patches (`patches.gpu_model_runner`): the guidance
inputs before each forward (without them Janus embeds text ids as image codes: a device-side
assert), the paired companions, the stream grid, and the keyed race that makes a seed name one
image.  So a guided architecture counts among V2's unsupported features (vLLM then logs that it
uses V1), and a server forced onto V2 (`VLLM_USE_V2_MODEL_RUNNER=1`) is refused at start-up
(`check_model_runner`, from the guided models' config hook).
"""

from __future__ import annotations

import functools


def guided_architecture(vllm_config) -> str | None:
    """The guided architecture this plugin registers that `vllm_config`'s model names, if any."""
    from .models import guided_architectures

    names = set(getattr(vllm_config.model_config, "architectures", None) or ()) & set(guided_architectures())
    return min(names) if names else None


def check_model_runner(vllm_config) -> None:
    """Raise ValueError, naming the variable to set, where a guided model would run on Model Runner V2."""
    architecture = guided_architecture(vllm_config)
    if architecture is not None and vllm_config.use_v2_model_runner:
        raise ValueError(
            f"{architecture} (vllm-sjdpp) runs on vLLM's V1 model runner only (guidance, the image grid, paired "
            "requests and seeds live there); this server would run on Model Runner V2: set VLLM_USE_V2_MODEL_RUNNER=0"
        )


def apply() -> None:
    # vllm/config/vllm.py: VllmConfig.use_v2_model_runner (a property) returns False when
    # _get_v2_model_runner_unsupported_features() names anything, unless the environment forces V2.
    from vllm.config import VllmConfig

    unsupported = VllmConfig._get_v2_model_runner_unsupported_features

    @functools.wraps(unsupported)
    def unsupported_with_guided_models(self):
        features = unsupported(self)
        architecture = guided_architecture(self)
        if architecture is not None:
            features = [*features, f"vllm-sjdpp's guided architecture {architecture}"]
        return features

    VllmConfig._get_v2_model_runner_unsupported_features = unsupported_with_guided_models
