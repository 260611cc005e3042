"""The seam: every vLLM internal this plugin relies on, named once and checked at start-up.

vLLM's public API has no place for a sampler, a drafter or guidance of our own, so the plugin
leans on members of vLLM 0.32 / 0.33 that may move in any release: private methods it wraps,
attributes of the model runner and its input batch it reads, dataclass fields it builds or
replaces, parameters it passes by name.  They are listed here and nowhere else.

- `CLASS_MEMBERS` are checked in every process before anything is patched (`missing()`): a
  member that is absent, or a method whose leading parameters are not the ones relied on, makes
  the plugin patch nothing and refuse `--speculative-config sjdpp`, naming what it lacks (plain
  vLLM stays unaffected), instead of an SJD++ that silently falls back to plain steps.
- `RUNNER_ATTRIBUTES`, `INPUT_BATCH_ATTRIBUTES` and `SAMPLER_ATTRIBUTES` exist only on live
  objects: they are checked on the runner right after vLLM built it (`check_runner`), and fail
  the engine's start-up naming the missing one.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    """`owner` ("module:Class" or "module") has `name`; for a callable, its leading parameters
    are `params` (None: not checked).  `cpu`: relied on by a CPU-only patch, checked on the CPU
    platform only.  `optional`: the patch that needs it is skipped without it (a fix of a vLLM
    bug that a later release may fix itself)."""

    owner: str
    name: str
    params: tuple[str, ...] | None = None
    cpu: bool = False
    optional: bool = False

    def __str__(self) -> str:
        return f"{self.owner}.{self.name}" + (f"({', '.join(self.params)}, ...)" if self.params else "")


RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
REJECTION = "vllm.v1.sample.rejection_sampler"
CLASS_MEMBERS = (
    # The model runner's methods the patches wrap or call (patches.gpu_model_runner).
    Member(RUNNER, "__init__", ("self", "vllm_config", "device")),
    Member(RUNNER, "_on_request_state_removed", ("self", "req_id", "req_state")),
    Member(RUNNER, "_update_streaming_request", ("self", "req_id", "new_req_data"), optional=True),
    Member(RUNNER, "_preprocess", ("self", "scheduler_output", "num_input_tokens")),
    Member(RUNNER, "_update_states", ("self", "scheduler_output")),
    Member("vllm.v1.worker.gpu_input_batch:CachedRequestState", "generator"),
    Member(RUNNER, "_calc_spec_decode_metadata", ("self", "num_draft_tokens", "cu_num_scheduled_tokens")),
    Member(RUNNER, "take_draft_token_ids", ("self",)),
    Member(RUNNER, "_sample", ("self", "logits", "spec_decode_metadata")),
    Member(RUNNER, "_bookkeeping_sync", ("self", "scheduler_output", "sampler_output"), cpu=True),
    Member(RUNNER, "execute_model", ("self", "scheduler_output"), cpu=True),
    Member(RUNNER, "sample_tokens", ("self", "grammar_output"), cpu=True),
    Member(RUNNER, "get_model", ("self",)),
    Member("vllm.v1.worker.gpu_input_batch:CachedRequestState", "prompt_token_ids"),
    Member("vllm.v1.worker.gpu_input_batch:CachedRequestState", "sampling_params"),
    # The rejection sampler the SJD++ sampler subclasses (engine.sampler).
    Member(f"{REJECTION}:RejectionSampler", "__init__", ("self", "sampler", "spec_config", "device")),
    Member(f"{REJECTION}:RejectionSampler", "forward", ("self", "metadata", "draft_probs", "logits", "sampling_metadata")),
    Member(f"{REJECTION}:RejectionSampler", "apply_logits_processors", ("self", "logits", "sampling_metadata", "metadata")),
    Member(f"{REJECTION}:RejectionSampler", "_get_logprobs_tensors",
           ("self", "max_num_logprobs", "metadata", "logits", "target_logits", "bonus_logits", "sampled_token_ids")),
    Member(REJECTION, "apply_sampling_constraints", ("logits", "cu_num_draft_tokens", "sampling_metadata")),
    Member(REJECTION, "PLACEHOLDER_TOKEN_ID"),
    *(Member("vllm.v1.sample.metadata:SamplingMetadata", f) for f in (
        "generators", "max_num_logprobs", "all_greedy", "all_random", "temperature", "spec_token_ids")),
    *(Member("vllm.v1.spec_decode.metadata:SpecDecodeMetadata", f) for f in (
        "draft_token_ids", "num_draft_tokens", "cu_num_draft_tokens", "cu_num_sampled_tokens",
        "target_logits_indices", "bonus_logits_indices", "logits_indices")),
    # vLLM's sampler, whose draw the race sampler replaces for seeded rows (engine.race_sampler):
    # Sampler.sample calls self.topk_topp_sampler(logits, generators, top_k, top_p).
    Member("vllm.v1.sample.sampler:Sampler", "sample", ("self", "logits", "sampling_metadata")),
    Member("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_top_p", ("logits", "k", "p")),
    Member("vllm.v1.sample.ops.topk_topp_sampler", "sample_with_exponential_noise", ("probs", "q")),
    Member("vllm.v1.outputs:SamplerOutput", "sampled_token_ids"),
    Member("vllm.v1.outputs:SamplerOutput", "logprobs_tensors"),
    # The scheduler the paired scheduler subclasses (patches.scheduler).
    *(Member(SCHEDULER, name, params) for name, params in (
        ("add_request", ("self", "request")),
        ("finish_requests", ("self", "request_ids", "finished_status")),
        ("schedule", ("self",)),
        ("_reserve_prefill_lookahead", ("self", "request", "num_computed_tokens", "num_new_tokens")),
        ("_preempt_request", ("self", "request", "timestamp")),
        ("update_from_output", ("self", "scheduler_output", "model_runner_output")),
        ("update_draft_token_ids", ("self", "draft_token_ids")),
        ("make_spec_decoding_stats", ("self", "spec_decoding_stats", "num_draft_tokens", "num_accepted_tokens",
                                      "num_invalid_spec_tokens", "request_id")),
    )),
    Member("vllm.v1.request:Request", "__init__", ("self", "request_id", "prompt_token_ids", "sampling_params")),
    *(Member("vllm.v1.core.sched.output:SchedulerOutput", f) for f in (
        "num_scheduled_tokens", "total_num_scheduled_tokens", "scheduled_spec_decode_tokens")),
    Member("vllm.config:SchedulerConfig", "scheduler_cls"),
    # Engine arguments (patches.arg_utils).
    Member("vllm.engine.arg_utils:EngineArgs", "add_cli_args", ("parser",)),
    Member("vllm.engine.arg_utils:EngineArgs", "create_speculative_config",
           ("self", "target_model_config", "target_parallel_config")),
    Member("vllm.engine.arg_utils:EngineArgs", "create_model_config", ("self",)),
    Member("vllm.engine.arg_utils:EngineArgs", "speculative_config"),
    Member("vllm.engine.arg_utils:EngineArgs", "additional_config"),
    # The images route's stand-in (patches.plugins); attach_endpoint_plugins looks it up at each call.
    Member("vllm.plugins", "load_endpoint_plugins", ("supported_tasks",), optional=True),
    # Requests (patches.input_processor).
    Member("vllm.v1.engine.input_processor:InputProcessor", "process_inputs", ("self", "request_id", "prompt", "params")),
    Member("vllm.v1.engine:EngineCoreRequest", "prompt_token_ids"),
    Member("vllm.v1.engine:EngineCoreRequest", "sampling_params"),
    Member("vllm.v1.engine:EngineCoreRequest", "cache_salt"),
    # Model Runner V2 kept from guided models (patches.vllm_config).
    Member("vllm.config:VllmConfig", "_get_v2_model_runner_unsupported_features", ("self",)),
    Member("vllm.config:VllmConfig", "use_v2_model_runner"),
    # The seed probe (patches.engine_core): requests of its own through the engine, once built.
    *(Member("vllm.v1.engine.core:EngineCore", name, params) for name, params in (
        ("__init__", ("self", "vllm_config")),
        ("preprocess_add_request", ("self", "request")),
        ("add_request", ("self", "request", "request_wave")),
        ("post_step", ("self", "model_executed")),
        ("abort_requests", ("self", "request_ids")),
        ("reset_prefix_cache", ("self",)),
        ("collective_rpc", ("self", "method", "timeout", "args")),
    )),
    Member("vllm.v1.engine.core:EngineCoreProc", "run_busy_loop", ("self",)),
    # Memory (patches.gpu_worker) and the CPU build's expand kernel (patches.cpu_triton_utils).
    Member("vllm.v1.worker.gpu_worker:Worker", "determine_available_memory", ("self",)),
    Member("vllm.v1.worker.gpu_worker:Worker", "_make_model_runner", ("self",)),
    Member("vllm.utils.cpu_triton_utils", "_expand_kernel_impl",
           ("output", "input_val", "cu_num_tokens", "replace_from", "replace_to"), cpu=True, optional=True),
    # The dtype of float32 checkpoints on CPUs without native bf16 (patches.model_config).
    Member("vllm.config.model", "_get_and_verify_dtype", ("model_id", "config", "dtype"), cpu=True),
    Member("vllm.config.model:ModelArchConfigConvertorBase", "get_torch_dtype",
           ("hf_config", "model_id", "revision", "config_format"), cpu=True),
    # Models and their configs (patches.models, guidance).
    Member("vllm.model_executor.models.config", "MODELS_CONFIG_MAP"),
    Member("vllm.model_executor.models.config:VerifyAndUpdateConfig", "verify_and_update_model_config", ("model_config",)),
    Member("vllm.model_executor.models.config:VerifyAndUpdateConfig", "verify_and_update_config", ("vllm_config",)),
    *(Member("vllm.config:ParallelConfig", f) for f in ("enable_dbo", "pipeline_parallel_size", "tensor_parallel_size")),
    Member("vllm.config:ModelConfig", "hf_config"),
    Member("vllm.config:ModelConfig", "hf_text_config"),
    Member("vllm.config:ModelConfig", "max_model_len"),
    Member("vllm.config:ModelConfig", "get_model_arch_config", ("self",)),
    Member("vllm.config:ModelConfig", "get_vocab_size", ("self",)),
    Member("vllm.config:ModelConfig", "try_get_generation_config", ("self",)),
    Member("vllm.config:VllmConfig", "with_hf_config", ("self", "hf_config", "architectures")),
    Member("vllm.model_executor.models.llama:LlamaAttention", "__init__",
           ("self", "config", "hidden_size", "num_heads", "num_kv_heads")),
    Member("vllm.model_executor.models.llama:LlamaDecoderLayer", "__init__",
           ("self", "vllm_config", "prefix", "config", "attn_layer_type")),
    Member("vllm.model_executor.models.llama:LlamaModel", "embed_input_ids"),
    Member("vllm.model_executor.models.llama:LlamaForCausalLM", "compute_logits", ("self", "hidden_states")),
    Member("vllm.model_executor.models.utils:AutoWeightsLoader", "load_weights"),
)

# Set by GPUModelRunner.__init__ (read by the engine step and the runner patches).
RUNNER_ATTRIBUTES = (
    "vllm_config", "model_config", "parallel_config", "speculative_config", "device", "max_num_reqs", "sampler",
    "drafter", "rejection_sampler", "requests", "input_batch", "input_ids.gpu", "query_start_loc.np",
    "query_start_loc.gpu", "discard_request_mask.np", "_draft_token_ids", "_draft_token_req_ids",
    "use_async_scheduling", "model_config.is_hybrid",
)
INPUT_BATCH_ATTRIBUTES = (
    "req_ids", "num_reqs", "num_tokens_no_spec", "num_prompt_tokens", "token_ids_cpu", "generators",
    "num_computed_tokens_cpu", "spec_token_ids", "temperature_cpu",
)
# What the race sampler reads on every runner it is installed on, SJD++'s or not.
RACE_SAMPLER_ATTRIBUTES = (
    "sampler.topk_topp_sampler.logprobs_mode", "requests", "input_batch.req_ids", "input_batch.num_reqs",
    "input_batch.num_tokens_no_spec",
    "input_batch.generators",
)
# Set by RejectionSampler.__init__ (the SJD++ sampler calls them).
SAMPLER_ATTRIBUTES = ("sampler", "is_processed_logprobs_mode")


def _resolve(owner: str):
    module, _, cls = owner.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, cls) if cls else obj


def _has(obj, name: str) -> bool:
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return True
    if name in (getattr(obj, "__struct_fields__", None) or ()):  # msgspec structs
        return True
    return hasattr(obj, name)


def _leading_params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(inspect.unwrap(fn)).parameters)


def problem(member: Member) -> str | None:
    """Why `member` cannot be relied on in this vLLM; None if it can."""
    try:
        owner = _resolve(member.owner)
    except (ImportError, AttributeError):
        return f"{member}: {member.owner} not found"
    except Exception as e:  # a vLLM module that fails to import: never take the process down
        return f"{member}: importing {member.owner} raised {type(e).__name__}: {e}"
    if not _has(owner, member.name):
        return f"{member}: no {member.name!r}"
    if member.params is not None:
        try:
            got = _leading_params(getattr(owner, member.name))
        except (TypeError, ValueError) as e:
            return f"{member}: no signature ({e})"
        if got[: len(member.params)] != member.params:
            return f"{member}: its parameters are ({', '.join(got)})"
    return None


def missing(on_cpu: bool | None = None, members=CLASS_MEMBERS) -> list[str]:
    """What this vLLM lacks of the members the plugin needs on this platform (None: the current
    one; empty: all there).  Optional members are not needed: their patches check for them
    (`available`)."""
    if on_cpu is None:
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
    return [p for m in members if (on_cpu or not m.cpu) and not m.optional for p in [problem(m)] if p is not None]


def available(owner: str, name: str) -> bool:
    """Whether an optional member is there in the form relied on (its patch is skipped if not)."""
    member = next(m for m in CLASS_MEMBERS if (m.owner, m.name) == (owner, name))
    return problem(member) is None


def _missing_attributes(obj, names) -> list[str]:
    out = []
    for dotted in names:
        value = obj
        for part in dotted.split("."):
            if not hasattr(value, part):
                out.append(dotted)
                break
            value = getattr(value, part)
    return out


def check_runner(runner) -> None:
    """Raise RuntimeError naming what a freshly built model runner lacks of what SJD++ reads."""
    lacking = [f"GPUModelRunner.{a}" for a in _missing_attributes(runner, RUNNER_ATTRIBUTES)]
    if not lacking:
        batch = runner.input_batch
        lacking = [f"InputBatch.{a}" for a in _missing_attributes(batch, INPUT_BATCH_ATTRIBUTES)]
    if lacking:
        raise RuntimeError(f"vllm-sjdpp cannot run SJD++ on this vLLM: the model runner lacks {', '.join(lacking)}")


def check_race_sampler(runner) -> None:
    lacking = _missing_attributes(runner, RACE_SAMPLER_ATTRIBUTES)
    if lacking:
        raise RuntimeError(
            f"vllm-sjdpp cannot sample seeded requests on this vLLM: the model runner lacks {', '.join(lacking)}"
        )


def check_sampler(sampler) -> None:
    lacking = _missing_attributes(sampler, SAMPLER_ATTRIBUTES)
    if lacking:
        raise RuntimeError(
            f"vllm-sjdpp cannot run SJD++ on this vLLM: RejectionSampler lacks {', '.join(lacking)}"
        )
