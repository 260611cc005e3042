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
(`models.check_model_runner`, from the guided models' config hook).
"""

from __future__ import annotations

import functools

from .models import guided_architecture


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
