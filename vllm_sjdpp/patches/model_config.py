"""Patches of vllm/config/model.py: the dtype a float32 checkpoint of this plugin's architectures
runs in on a CPU without native bf16.

vLLM's CPU platform lists bf16 first among its supported dtypes on every x86 and aarch64 CPU
(`CpuPlatform.supported_dtypes`), so `--dtype auto` (`_get_and_verify_dtype` ->
`_resolve_auto_dtype`) downcasts a float32 checkpoint to bf16 even where the CPU has no bf16
instructions and emulates them.  There a bf16 pass costs several times a float32 one, and a wide
pass costs far more than a narrow one (measured on an AVX2-only EPYC: 4.8x for 33 positions
against 1, float32 2.0x), so drafting cannot pay; and the emulation rounds a wide pass otherwise
than a narrow one, so a seed's image changes with SJD++ on.  For the guided architectures this
plugin registers, a float32 checkpoint on such a CPU keeps float32, with one log line saying why.
An explicit `--dtype` is never changed.
"""

from __future__ import annotations

import functools
import logging
import platform

import torch

from .. import machine
from ..machine import ARM_BF16_FEATURES, X86_BF16_FLAGS

logger = logging.getLogger("vllm.sjdpp")


def cpu_dtype(architectures, config_dtype: torch.dtype, chosen: torch.dtype, native: bool | None) -> torch.dtype:
    """The dtype a model served with `--dtype auto` on a CPU runs in: vLLM's `chosen`, except that a
    float32 checkpoint of a guided architecture stays float32 where bf16 is not native."""
    from .models import guided_architectures

    if (
        chosen == torch.bfloat16
        and config_dtype == torch.float32
        and native is False
        and set(architectures or ()) & set(guided_architectures())
    ):
        return torch.float32
    return chosen


def apply() -> None:
    """CPU platform only."""
    # vllm/config/model.py: ModelConfig.__post_init__ calls the module-level
    # _get_and_verify_dtype(model_id, config, dtype, *, is_pooling_model, ...) by name.
    from vllm.config import model as model_module

    get_and_verify_dtype = model_module._get_and_verify_dtype

    @functools.wraps(get_and_verify_dtype)
    def get_and_verify_cpu_dtype(model_id, config, dtype, *args, **kwargs):
        chosen = get_and_verify_dtype(model_id, config, dtype, *args, **kwargs)
        if not (isinstance(dtype, str) and dtype.lower() == "auto") or chosen != torch.bfloat16:
            return chosen
        config_dtype = model_module.ModelArchConfigConvertorBase.get_torch_dtype(
            config, model_id, revision=kwargs.get("revision"), config_format=kwargs.get("config_format", "hf")
        )
        native = machine.native_bf16()
        served = cpu_dtype(getattr(config, "architectures", None), config_dtype, chosen, native)
        if served != chosen:
            logger.info(
                "vllm-sjdpp: serving %s in float32, its checkpoint's dtype: this CPU (%s) has no native "
                "bf16 (none of %s), so bf16 would be emulated, several times slower and rounded "
                "differently in wide passes (--dtype bfloat16 to override)",
                model_id, platform.machine(), ", ".join(X86_BF16_FLAGS + ARM_BF16_FEATURES),
            )
        return served

    model_module._get_and_verify_dtype = get_and_verify_cpu_dtype
