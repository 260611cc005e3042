"""Patches of vllm/v1/worker/gpu_model_runner.py (`GPUModelRunner`, which the CPU runner
subclasses).

- `__init__`: a runner whose drafter is SJD++'s gets its `SJDPPRuntime` (`runner.sjdpp`, the one
  owner of per-request SJD++ state), our sampler in place of its rejection sampler, and the
  spec-decode metadata of steps without drafts from tensors made once, and no handover of a
  proposal without drafts to the scheduler.  It, and any runner of a
  guided architecture this plugin registers, draws seeded rows by the position-keyed race
  (`engine.race_sampler`): one meaning of a seed, with SJD++ or without.
- `_on_request_state_removed`, vLLM's hook for request-scoped caches, and
  `_update_streaming_request`, a streaming session's new turn under the same request id (new
  prompt, new options): where a request's SJD++ state and guidance inputs are forgotten.
- `_update_states`: on runners with the race sampler, requests raced by position-keyed noise lose
  their generators (never drawn from), so vLLM has none to rewind after a partial prefill.
- `_preprocess`: a guided model's per-token guidance inputs are filled before each forward
  (paired requests running without their partner are discarded there: `guidance.pairing`).
- `_sample`: a guided request's companion takes the tokens its request sampled.
- On the CPU platform only, on SJD++'s runners, `execute_model`, `_sample` and `sample_tokens`: a
  step that verifies no drafts takes vLLM's path without a speculative config, but for the
  sampling, SJD++'s, and the proposal (`_patch_windowless_steps_off_the_spec_path`).
- On the CPU platform only, `_sample` and `_bookkeeping_sync`: a seeded request whose prompt is
  prefilled in chunks crashed the engine: for the token sampled and discarded after a partial
  prefill, `_bookkeeping_sync` rewinds the request's generator with `set_offset`, which CPU
  generators do not have ("CPU Generator does not use offset").  Those generators' states are
  restored instead.
"""

from __future__ import annotations

import functools

import torch


def apply(on_cpu: bool) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ..engine import race_sampler
    from ..engine.proposer import SJDPPProposer
    from ..engine.runtime import SJDPPRuntime
    from ..engine.sampler import SJDPPSampler
    from ..guidance.llama import check_async_speculation
    from .internals import RUNNER, available, check_race_sampler, check_runner, check_sampler
    from .models import guided_architectures

    init = GPUModelRunner.__init__

    @functools.wraps(init)
    def init_with_sjdpp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        drafter = getattr(self, "drafter", None)
        guided = bool(set(self.model_config.architectures or ()) & set(guided_architectures()))
        if guided:
            check_async_speculation(self.vllm_config)
        if isinstance(drafter, SJDPPProposer) or guided:
            check_race_sampler(self)
            race_sampler.install(self)
        if isinstance(drafter, SJDPPProposer):
            check_runner(self)
            self.sjdpp = drafter.runtime = SJDPPRuntime(self)
            self.rejection_sampler = SJDPPSampler(self, self.sjdpp)
            check_sampler(self.rejection_sampler)
            without_drafts = _patch_spec_metadata_without_drafts(self)
            _patch_no_empty_draft_handover(self)
            if on_cpu and not self.use_async_scheduling and not self.model_config.is_hybrid:
                _patch_windowless_steps_off_the_spec_path(self, without_drafts)

    GPUModelRunner.__init__ = init_with_sjdpp

    removed = GPUModelRunner._on_request_state_removed

    @functools.wraps(removed)
    def release_request_state(self, req_id, req_state):
        removed(self, req_id, req_state)
        _forget_request(self, req_id)

    GPUModelRunner._on_request_state_removed = release_request_state

    if available(RUNNER, "_update_streaming_request"):
        new_turn = GPUModelRunner._update_streaming_request

        @functools.wraps(new_turn)
        def update_streaming_request_afresh(self, req_id, *args, **kwargs):
            _forget_request(self, req_id)
            return new_turn(self, req_id, *args, **kwargs)

        GPUModelRunner._update_streaming_request = update_streaming_request_afresh

    update_states = GPUModelRunner._update_states

    @functools.wraps(update_states)
    def update_states_without_keyed_generators(self, scheduler_output, *args, **kwargs):
        out = update_states(self, scheduler_output, *args, **kwargs)
        if getattr(self, "sjdpp_race_sampler", False) and self.input_batch.generators:
            race_sampler.drop_generators(self)
        return out

    GPUModelRunner._update_states = update_states_without_keyed_generators
    _patch_guidance_inputs()
    if on_cpu:
        _patch_cpu_seeded_chunked_prefill()


def _forget_request(runner, req_id: str) -> None:
    """Drop what SJD++ and guidance keep for a request: it is gone, or a streaming session's new
    turn keeps its id with a new prompt and new options (vLLM's `_update_streaming_request`)."""
    runtime = getattr(runner, "sjdpp", None)
    if runtime is not None:
        runtime.release(req_id)
    guidance = getattr(runner.get_model(), "guidance", None)
    if guidance is not None:
        guidance.forget(req_id)


def _patch_guidance_inputs() -> None:
    # vllm/v1/worker/gpu_model_runner.py: _preprocess runs after _prepare_inputs (batch order,
    # query_start_loc, num_computed_tokens_cpu are this step's) and right before the forward.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    preprocess = GPUModelRunner._preprocess

    @functools.wraps(preprocess)
    def preprocess_with_guidance(self, scheduler_output, num_input_tokens, *args, **kwargs):
        out = preprocess(self, scheduler_output, num_input_tokens, *args, **kwargs)
        guidance = getattr(self.get_model(), "guidance", None)
        if guidance is not None:
            guidance.prepare(self, num_input_tokens)
        return out

    GPUModelRunner._preprocess = preprocess_with_guidance

    sample = GPUModelRunner._sample

    @functools.wraps(sample)
    def sample_with_companions(self, *args, **kwargs):
        output = sample(self, *args, **kwargs)
        guidance = getattr(self.get_model(), "guidance", None)
        if guidance is not None:
            guidance.mirror_samples(output.sampled_token_ids)
        return output

    GPUModelRunner._sample = sample_with_companions


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

    @functools.wraps(sample)
    def sample_keeping_discarded_generators(self, *args, **kwargs):
        discarded = _discarded_cpu_generators(self)
        states = {i: g.get_state() for i, g in discarded.items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for i, state in states.items():
                discarded[i].set_state(state)

    @functools.wraps(bookkeeping)
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


class MetadataWithoutDrafts:
    """What `GPUModelRunner._calc_spec_decode_metadata` returns when no request has drafts: each
    request's one sampled row is its last scheduled position, and it is its bonus row.

    The logits indices are the step's `query_start_loc` on the device less one, as vLLM's own
    path without a speculative config takes them (`_prepare_inputs` has copied it there before it
    asks for this metadata, or before `_sample` asks on a step off the speculative path), written
    into a buffer of vLLM's dtype for them under a speculative config (int64); everything else
    depends on the batch size alone, so one metadata object per batch size holds views of tensors
    made once (vLLM and the sampler only read them), and a step costs one device op and no
    host-to-device copy (building the metadata afresh each step took 48-55 us right after the
    forward pass against 29-30 us now, with the check for drafts: the digit model at 1-32
    requests on 2 CPU cores, 1-2% of a step).
    """

    def __init__(self, max_num_reqs: int, device, token_dtype: torch.dtype, query_start_loc):
        self.query_start_loc = query_start_loc  # vLLM's CpuGpuBuffer, [max_num_reqs + 1] int32
        self.logits_indices = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        self.rows = torch.arange(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.zeros = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.no_rows = torch.empty(0, dtype=torch.int32, device=device)
        self.no_tokens = torch.empty(0, dtype=token_dtype, device=device)
        self.by_size: dict[int, object] = {}

    def __call__(self, n: int):
        torch.sub(self.query_start_loc.gpu[1 : n + 1], 1, out=self.logits_indices[:n])
        metadata = self.by_size.get(n)
        if metadata is None:
            from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

            metadata = self.by_size[n] = SpecDecodeMetadata(
                draft_token_ids=self.no_tokens,
                num_draft_tokens=[0] * n,
                cu_num_draft_tokens=self.zeros[:n],
                cu_num_sampled_tokens=self.rows[1 : n + 1],
                target_logits_indices=self.no_rows,
                bonus_logits_indices=self.rows[:n],
                logits_indices=self.logits_indices[:n],
            )
        return metadata


def _patch_spec_metadata_without_drafts(runner) -> None:
    # vllm/v1/worker/gpu_model_runner.py: _prepare_inputs calls
    # self._calc_spec_decode_metadata(num_draft_tokens, cu_num_tokens) whenever a speculative
    # config is set.  Patched on SJD++'s runners only.
    general = runner._calc_spec_decode_metadata
    without_drafts = MetadataWithoutDrafts(runner.max_num_reqs, runner.device, runner.input_ids.gpu.dtype,
                                           runner.query_start_loc)

    def calc_spec_decode_metadata(num_draft_tokens, cu_num_scheduled_tokens):
        if num_draft_tokens.any():
            return general(num_draft_tokens, cu_num_scheduled_tokens)
        return without_drafts(len(cu_num_scheduled_tokens))

    runner._calc_spec_decode_metadata = calc_spec_decode_metadata
    return without_drafts


def _patch_no_empty_draft_handover(runner) -> None:
    # vllm/v1/engine/core.py: after each step EngineCore.post_step hands what
    # take_draft_token_ids returns to Scheduler.update_draft_token_ids, a loop over the batch
    # that sets each request's spec_token_ids.  A proposal without drafts changes nothing there:
    # the scheduler empties a request's spec_token_ids when it schedules the request (and when it
    # preempts it).  Skipping it saves most steps where drafting does not pay a pass over the
    # batch (about 1 us a request).  Not under guidance companions: `PairedScheduler` also hands
    # a request's drafts to its companion, which may have sat the step out.
    take = runner.take_draft_token_ids
    batch = runner.sjdpp.batch

    def take_draft_token_ids():
        drafts = runner._draft_token_ids
        if isinstance(drafts, list) and not batch.has_companions and not any(drafts):
            return None
        return take()

    runner.take_draft_token_ids = take_draft_token_ids


def _patch_windowless_steps_off_the_spec_path(runner, without_drafts: MetadataWithoutDrafts) -> None:
    # vllm/v1/worker/gpu_model_runner.py: with a speculative config, every step takes the spec
    # path: _prepare_inputs counts each request's drafts and builds their metadata,
    # _build_attention_metadata builds the drafter's, _preprocess clamps placeholder ids, and
    # sample_tokens asks the drafter, copies its drafts and finalizes the KV connector there.  A
    # step that verifies no drafts needs none of it: it runs as vLLM runs without a speculative
    # config (`runner.speculative_config` is None from execute_model to the end of
    # sample_tokens), but for the sampling, which stays SJD++'s (the plan, the windows the next
    # step verifies, the controller's timing), and the proposal, read from the runtime as the
    # drafter would (without vLLM's batch-wide `_input_fits_in_drafter` check: the runtime trims
    # each window to what its request may still generate).  On the CPU platform, without async
    # scheduling, and not for hybrid models (`_update_states_after_model_execute` keeps their
    # accepted-token counts only under a speculative config): on CUDA vLLM also picks its CUDA
    # graphs and attention kernels by these flags, untested there.
    spec_config = runner.speculative_config
    execute, sample, sample_tokens = runner.execute_model, runner._sample, runner.sample_tokens
    drafter = runner.drafter

    def execute_model(scheduler_output, *args, **kwargs):
        if scheduler_output.scheduled_spec_decode_tokens:
            return execute(scheduler_output, *args, **kwargs)
        runner.speculative_config = None
        try:
            out = execute(scheduler_output, *args, **kwargs)
        except BaseException:
            runner.speculative_config = spec_config
            raise
        if out is not None:  # no sample_tokens follows (nothing scheduled)
            runner.speculative_config = spec_config
        return out

    def sample_off_the_spec_path(logits, spec_decode_metadata):
        if spec_decode_metadata is None and runner.speculative_config is None:
            spec_decode_metadata = without_drafts(runner.input_batch.num_reqs)
        return sample(logits, spec_decode_metadata)

    def sample_tokens_off_the_spec_path(grammar_output):
        if runner.speculative_config is not None:
            return sample_tokens(grammar_output)
        try:
            out = sample_tokens(grammar_output)
        finally:
            runner.speculative_config = spec_config
        batch = runner.input_batch
        runner._draft_token_ids = drafter.propose(None, batch.num_tokens_no_spec, batch.token_ids_cpu)
        runner._draft_token_req_ids = batch.req_ids.copy()
        return out

    runner.execute_model = execute_model
    runner._sample = sample_off_the_spec_path
    runner.sample_tokens = sample_tokens_off_the_spec_path
