"""Patch of vllm/v1/engine/core.py: an SJD++ engine runs the seed probe (`engine.seed_probe`) once
it is built, before it serves: a few greedy requests of its own, through the scheduler, the
compiled model and the SJD++ sampler it serves with, then its prefix cache is emptied.  One log
line gives the verdict; the workers keep it (`Worker.sjdpp_seed_probe("verdict")`) for the images
endpoint.

SJDPP_SEED_PROBE=0 skips it (the verdict is then unknown).  With the SJD++ option exact_seeds, a
verdict other than "identical" stops the server at start-up.
"""

from __future__ import annotations

import functools
import logging
import os
import time

from ..config import SJDPPConfig
from .arg_utils import is_sjdpp

logger = logging.getLogger("vllm.sjdpp")

PROBE_TEXT = "a handwritten 7"  # the digit model knows only such prompts; other families take any text
REFERENCE_TOKENS = 8  # generated tokens past a full window, so that several passes are full


def probe_prompt(model_config) -> list[int]:
    """The prompt the probe decodes: the family's for a short text, else a few token ids."""
    from ..families import load

    try:
        return list(load(model_config.model).prompt_ids(PROBE_TEXT))
    except Exception:  # a hub id, a folder without tokenizer, a family that makes no prompts
        return list(range(1, min(9, model_config.get_vocab_size())))


def probe_requests(vllm_config, prompt: list[int], k: int):
    """(phase, [EngineCoreRequest]) in the order they run."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    from ..engine.seed_probe import probe_request_id
    from ..families import family_of
    from ..guidance.cfg import NEGATIVE_PROMPT_KEY, SCALE_KEY, ServedGuidance

    model_config = vllm_config.model_config
    image = family_of(model_config.hf_config).image_tokens(model_config.hf_config)
    room = model_config.max_model_len - len(prompt) - 1
    max_tokens = max(1, min(k + REFERENCE_TOKENS, room, image or room))
    guidance = {}
    served = ServedGuidance.of(model_config)
    if served is not None and served.one_branch:
        # One branch per sequence: a sequence's rows are the plain model's, whether or not a
        # companion's rows are combined with them (and a server with its own scheduler pairs nothing).
        guidance = {SCALE_KEY: 1.0}
    elif served is not None:
        # The rule's unconditional prompt where it has the prompt's length (another length would
        # pair the request, which a server with its own scheduler cannot run): both branches run.
        negative = served.rule.apply(prompt)
        guidance = {NEGATIVE_PROMPT_KEY: negative if len(negative) == len(prompt) else list(prompt)}

    def request(phase: str, index: int, plain: bool):
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
            extra_args={**guidance, "sjdpp_disable": plain},
        )
        return EngineCoreRequest(
            request_id=probe_request_id(phase, index), prompt_token_ids=list(prompt), mm_features=None,
            sampling_params=params, pooling_params=None, arrival_time=time.time(), lora_request=None,
            cache_salt="sjdpp-seed-probe", data_parallel_rank=None,
        )

    return [
        ("reference", [request("reference", 0, True)]),
        ("window", [request("window", 0, False)]),
        ("batch", [request("batch", i, i % 2 == 0) for i in range(4)]),
    ], max_tokens


def run_seed_probe(core) -> dict | None:
    """Run the probe on a built EngineCore; its verdict (None where it was not run)."""
    from ..config import SEED_PROBE_METHOD
    from ..engine.seed_probe import Verdict

    vllm_config = core.vllm_config
    k = vllm_config.speculative_config.num_speculative_tokens
    phases, max_tokens = probe_requests(vllm_config, probe_prompt(vllm_config.model_config), k)
    core.collective_rpc(SEED_PROBE_METHOD, args=("start",))
    try:
        for phase, requests in phases:
            for r in requests:
                request, wave = core.preprocess_add_request(r)
                core.add_request(request, wave)
            # Each request ends after at most max_tokens passes (a partial prefill adds a few).
            for _ in range(len(requests) * (max_tokens + 8) + 16):
                if not core.scheduler.has_requests():
                    break
                _, executed = core.step_fn()
                core.post_step(executed)
            else:
                core.abort_requests([r.request_id for r in requests])
                raise RuntimeError(f"the probe's {phase} requests did not finish")
    finally:
        verdict = core.collective_rpc(SEED_PROBE_METHOD, args=("finish",))[0]
        core.reset_prefix_cache()
    if verdict is not None:
        logger.info(Verdict(**verdict).describe())
    return verdict


def probe_once(core) -> None:
    """Run the probe on a built engine, once, where it applies; raises only where exact_seeds
    is set and the verdict is not "identical"."""
    if getattr(core, "_sjdpp_probed", False):
        return
    core._sjdpp_probed = True
    vllm_config = core.vllm_config
    if not is_sjdpp(vllm_config.speculative_config) or os.environ.get("SJDPP_SEED_PROBE", "1") == "0":
        return
    parallel = vllm_config.parallel_config
    if parallel.world_size != 1 or parallel.data_parallel_size != 1:
        logger.info("SJD++ seed probe: skipped (more than one worker or engine)")
        return
    try:
        verdict = run_seed_probe(core)
    except Exception:  # never keep a server from starting: the verdict stays unknown
        logger.warning("SJD++ seed probe failed; whether a seed names one image is unknown", exc_info=True)
        verdict = None
    options = SJDPPConfig.of_server(vllm_config)
    if options.exact_seeds and (verdict is None or verdict["identical"] is not True):
        raise RuntimeError(
            "SJD++ option 'exact_seeds': this server's seed probe did not find a position's logits bit-identical "
            f"in narrow and wide passes ({verdict}), so a seed may name another image with SJD++ on than off"
        )


def apply() -> None:
    # vllm/v1/engine/core.py.  An in-process engine (vllm.LLM, VLLM_ENABLE_V1_MULTIPROCESSING=0)
    # is an EngineCore built after the plugins loaded: probed at the end of its __init__.  An
    # engine process (EngineCoreProc) loads the plugins inside EngineCore.__init__, too late for
    # a wrapper of it: probed when its busy loop starts, before it takes any request (requests
    # and utility calls that arrive meanwhile wait in its input queue).
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    init = EngineCore.__init__

    @functools.wraps(init)
    def init_and_probe(self, *args, **kwargs):
        init(self, *args, **kwargs)
        probe_once(self)

    EngineCore.__init__ = init_and_probe

    run_busy_loop = EngineCoreProc.run_busy_loop

    @functools.wraps(run_busy_loop)
    def probe_then_run_busy_loop(self, *args, **kwargs):
        probe_once(self)
        return run_busy_loop(self, *args, **kwargs)

    EngineCoreProc.run_busy_loop = probe_then_run_busy_loop
