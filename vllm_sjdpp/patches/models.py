"""Patches of vllm/model_executor/models: the guided Llama, Janus, Emu3 and Chameleon are registered with vLLM's
ModelRegistry (loaded from `vllm_sjdpp.guidance` only when a folder names them), and their config
hooks (MODELS_CONFIG_MAP, run when vLLM builds a ModelConfig and a VllmConfig) check the folder
whole, double the attention heads the engine sees, and refuse the parallel modes guidance cannot run."""

from __future__ import annotations



def guided_architectures() -> tuple[str, ...]:
    """The architectures `apply` registers (their families' names; no model is imported)."""
    from ..families.emu3 import ARCHITECTURE as EMU3
    from ..families.janus import ARCHITECTURE as JANUS
    from ..families.lumina import ARCHITECTURES as CHAMELEON
    from ..families.rule import GUIDED_LLAMA

    return GUIDED_LLAMA, JANUS, EMU3, *CHAMELEON


def guided_architecture(vllm_config) -> str | None:
    """The guided architecture this plugin registers that `vllm_config`'s model names, if any."""
    names = set(getattr(vllm_config.model_config, "architectures", None) or ()) & set(guided_architectures())
    return min(names) if names else None


V1_ONLY = ("(vllm-sjdpp) runs on vLLM's V1 model runner only (guidance, the image grid, paired requests and "
           "seeds live there)")
USE_V1 = "set VLLM_USE_V2_MODEL_RUNNER=0"


def check_model_runner(vllm_config) -> None:
    """Raise ValueError, naming the variable to set, where a guided model would run on Model Runner V2."""
    architecture = guided_architecture(vllm_config)
    if architecture is not None and vllm_config.use_v2_model_runner:
        raise ValueError(f"{architecture} {V1_ONLY}; this server would run on Model Runner V2: {USE_V1}")


def check_live_runner(vllm_config, runner) -> None:
    """The same at start-up, on the runner a worker built: vLLM's V1 runner (or a subclass), the
    one `patches.gpu_model_runner` patches.  RuntimeError else."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    architecture = guided_architecture(vllm_config)
    if architecture is not None and not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"{architecture} {V1_ONLY}; the worker built {type(runner).__module__}.{type(runner).__name__}: {USE_V1}"
        )


def guided_engine_hook(vllm_config) -> None:
    """vLLM's per-architecture hook on the whole config of a guided model: the parallel modes
    guidance refuses, Model Runner V2 refused, and the scheduler that pairs requests
    (`guidance.pairing`), which the paired layout cannot run without (ValueError naming the
    options)."""
    from ..guidance.llama import check_parallelism
    from .scheduler import check_paired_layout, install

    check_parallelism(vllm_config)
    check_model_runner(vllm_config)
    install(vllm_config)
    check_paired_layout(vllm_config)


def apply() -> None:
    # vllm/model_executor/models/config.py: MODELS_CONFIG_MAP, architecture -> a class whose
    # verify_and_update_model_config(model_config) ModelConfig.__post_init__ calls.
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from ..families.emu3 import ARCHITECTURE as EMU3
    from ..families.janus import ARCHITECTURE as JANUS
    from ..families.lumina import ARCHITECTURES as CHAMELEON
    from ..families.rule import GUIDED_LLAMA

    # The models (and the hooks beside them) are imported only when a folder needs them: every
    # vLLM process loads this plugin.
    ModelRegistry.register_model(GUIDED_LLAMA, f"vllm_sjdpp.guidance.llama:{GUIDED_LLAMA}")
    ModelRegistry.register_model(JANUS, "vllm_sjdpp.guidance.janus:GuidedJanusForImageGeneration")
    # vLLM 0.32 serves Emu3 through its Transformers backend, without images: replaced.
    ModelRegistry.register_model(EMU3, "vllm_sjdpp.guidance.emu3:GuidedEmu3ForConditionalGeneration")
    # vLLM 0.28 removed Chameleon: Lumina-mGPT's and transformers' names.
    for name in CHAMELEON:
        ModelRegistry.register_model(name, "vllm_sjdpp.guidance.chameleon:GuidedChameleonForConditionalGeneration")

    def call(function: str):
        def hook(config):
            import importlib

            module, name = function.split(":")
            getattr(importlib.import_module(module), name)(config)

        return staticmethod(hook)

    def config_hook(function: str):
        # verify_and_update_config runs on the whole VllmConfig: the parallel modes guidance refuses,
        # and the scheduler that pairs requests.
        return type("GuidedConfig", (VerifyAndUpdateConfig,), {
            "verify_and_update_model_config": call(function),
            "verify_and_update_config": call("vllm_sjdpp.patches.models:guided_engine_hook"),
        })

    MODELS_CONFIG_MAP[GUIDED_LLAMA] = config_hook("vllm_sjdpp.guidance.llama:guided_llama_config_hook")
    MODELS_CONFIG_MAP[JANUS] = config_hook("vllm_sjdpp.guidance.janus:janus_config_hook")
    for name in (EMU3, *CHAMELEON):
        MODELS_CONFIG_MAP[name] = config_hook("vllm_sjdpp.guidance.llama:guided_llama_config_hook")
