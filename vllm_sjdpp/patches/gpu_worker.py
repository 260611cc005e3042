"""Patches of vllm/v1/worker/gpu_worker.py and cpu_worker.py: the workers' KV sizing keeps the
SJD++ step's buffers out of the KV cache, `Worker.sjdpp_seed_probe`, the method the seed
probe calls through vLLM's collective_rpc (`patches.engine_core`, the images endpoint), and a
guided model's runner checked to be the V1 runner the plugin patches (`models.check_live_runner`)."""

from __future__ import annotations

import functools

import logging
from typing import Any

from ..config import SJDPPConfig
from .arg_utils import is_sjdpp

# Under "vllm." so that vLLM's logging configuration applies.
logger = logging.getLogger("vllm.sjdpp")


def step_reserve(vllm_config: Any) -> tuple[int, int]:
    """What an SJD++ engine keeps out of the KV cache for its step, in bytes, and the most drafts
    a pass verifies within it ((0, 0) for any other engine)."""
    from ..engine.step_memory import max_drafts, pass_drafts, step_memory_bytes
    from ..families import logits_size

    if not is_sjdpp(vllm_config.speculative_config):
        return 0, 0
    config = SJDPPConfig.of_server(vllm_config)
    scheduler = vllm_config.scheduler_config
    vocab = logits_size(vllm_config.model_config)
    dtype = vllm_config.model_config.dtype
    cap = max_drafts(config.step_memory_gib, scheduler.max_num_seqs, vocab, dtype)
    drafts = pass_drafts(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, config.num_speculative_tokens,
                         config.draft_token_budget, cap)
    return step_memory_bytes(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, drafts, vocab, dtype), drafts


def sjdpp_seed_probe(self, action: str) -> dict | None:
    """`action`: "start" and "finish" bracket the probe's requests (finish returns the verdict);
    "verdict" returns the one kept (None: not probed, or not an SJD++ engine)."""
    from ..engine import seed_probe

    runner = self.model_runner
    if getattr(runner, "sjdpp", None) is None:
        return None
    if action == "start":
        return seed_probe.start(runner)
    if action == "finish":
        return seed_probe.finish(runner)
    if action == "verdict":
        return getattr(runner, "sjdpp_seed_verdict", None)
    raise ValueError(f"sjdpp_seed_probe: unknown action {action!r}")


def apply() -> None:
    # vllm/v1/worker/gpu_worker.py and cpu_worker.py: determine_available_memory returns the
    # bytes the KV cache may take (after the profiling run on GPUs, VLLM_CPU_KVCACHE_SPACE on
    # CPU).  vLLM's profiling samples its dummy batch with vLLM's rejection sampler, so the
    # step's own buffers are reserved here explicitly.
    from vllm.v1.worker.gpu_worker import Worker

    from ..config import SEED_PROBE_METHOD

    setattr(Worker, SEED_PROBE_METHOD, sjdpp_seed_probe)  # the CPU worker subclasses it
    make_model_runner = Worker._make_model_runner  # the CPU worker builds its (V1) runner itself

    from .models import check_live_runner

    @functools.wraps(make_model_runner)
    def make_checked_model_runner(self):
        runner = make_model_runner(self)
        check_live_runner(self.vllm_config, runner)
        return runner

    Worker._make_model_runner = make_checked_model_runner
    classes = [Worker]
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker

        classes.append(CPUWorker)
    except ImportError:
        pass
    for cls in classes:
        if "determine_available_memory" not in vars(cls):
            continue
        original = vars(cls)["determine_available_memory"]

        @functools.wraps(original)
        def determine_available_memory(self, _original=original):
            available = _original(self)
            reserve, drafts = step_reserve(self.vllm_config)
            if reserve:
                gib = SJDPPConfig.of_server(self.vllm_config).step_memory_gib
                logger.info(
                    "SJD++ keeps %.1f MiB out of the KV cache for its step (of %.1f MiB available): "
                    "at most %d drafts in a pass (step_memory_gib %g)",
                    reserve / 2**20, available / 2**20, drafts, gib,
                )
                if drafts == 0:
                    logger.warning(
                        "SJD++: step_memory_gib %g holds no draft at this vocabulary and --max-num-seqs %d: every "
                        "pass decodes plainly; raise step_memory_gib or lower --max-num-seqs",
                        gib, self.vllm_config.scheduler_config.max_num_seqs,
                    )
                if reserve >= available:
                    raise ValueError(
                        f"SJD++ needs {reserve / 2**20:.0f} MiB for its step, more than the "
                        f"{available / 2**20:.0f} MiB left for the KV cache: lower --max-num-seqs, "
                        "--max-num-batched-tokens or draft_token_budget, or give the KV cache more memory"
                    )
            return available - reserve

        cls.determine_available_memory = determine_available_memory
