"""`PairedScheduler`: vLLM's scheduler (vllm/v1/core/sched/scheduler.py, `Scheduler`) keeping the
pairs of `guidance.pairing` together; vLLM takes it through `SchedulerConfig.scheduler_cls`,
which the guided architectures' config hook sets (`install`).

What it adds to vLLM's scheduling, each in the one method vLLM's own scheduler calls for it:
- `add_request`: a paired request (`ServedGuidance.companion_prompt`) brings its companion.
- `_reserve_prefill_lookahead` (every chunk of a running request passes through it): a running
  member goes past its last committed token only when its partner is there too, and the pair's
  windows come out of one token budget: the first member takes at most half of what is left, the
  second at most the first's window, so that no member samples alone for want of budget; a
  member being admitted stops short of that point (its partner joins it there next step);
  before it, each member prefills on its own, in chunks of any size.
- `schedule`: before vLLM's pass, each companion follows its request in the running queue (a
  pair that ran apart last step goes first); after it, the windows of a joint step are cut to
  the shorter one (vLLM's context limit may trim one member's drafts), and members held for a
  partner that cannot be admitted are preempted, each queued behind its partner: when nothing
  could be scheduled, and at every step of a pause that lets running requests drain (vLLM admits
  no one then, so a held member would never end and the pause never drain).
- `update_from_output`: a member the runner discarded (it ran without its partner) is rolled back
  to its last committed token; a companion's outputs never leave the engine; when one member
  ends, so does the other.
- `update_draft_token_ids`: the companion takes its request's drafts.
- `finish_requests`: aborting a request aborts its companion.
"""

from __future__ import annotations

import time

from vllm.logger import init_logger
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

from ..guidance.cfg import ServedGuidance
from ..guidance.pairing import COMPANION_SUFFIX, companion_id, companion_of, companion_params

logger = init_logger("vllm.sjdpp")

SCHEDULER_CLS = "vllm_sjdpp.patches.scheduler.PairedScheduler"


def install(vllm_config) -> None:
    """Run a guided model with the paired scheduler (synchronous: companions take their
    request's tokens when its step returns) where pairs come or cost nothing:
    - the model runs one guidance branch per sequence (`guidance.cfg`'s paired layout, Emu3's and
      Lumina-mGPT's: every guided request pairs);
    - the server runs synchronously anyway: SJD++ (vLLM has no asynchronous scheduling for its
      drafter), any other drafter with guidance (`guidance.llama.check_async_speculation`
      refuses the combination), the CPU platform (vLLM 0.32 schedules synchronously there), or
      --no-async-scheduling given (the way to opt in to negative prompts of another length).
    Elsewhere (the stacked layout: Janus, guided Llamas and the digit model by default, served
    without --speculative-config on a GPU) vLLM's asynchronous scheduling stays on, which hides
    the host's work at small batch, and a negative prompt of another length is refused with a 400
    naming it.  A scheduler or asynchronous scheduling chosen on the command line is kept (then
    such prompts are refused; the paired layout refuses to start, `check_paired_layout`)."""
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls is not None or scheduler.async_scheduling:
        return
    synchronous = (
        scheduler.async_scheduling is False or vllm_config.speculative_config is not None
        or not platform_schedules_asynchronously()
    )
    if synchronous or getattr(ServedGuidance.of(vllm_config.model_config), "one_branch", False):
        scheduler.async_scheduling = False
        scheduler.scheduler_cls = SCHEDULER_CLS


def check_paired_layout(vllm_config) -> None:
    """In the paired layout every guided request runs as a pair: a scheduler or asynchronous
    scheduling chosen on the command line, which would leave the paired scheduler out, would leave
    every such request refused.  Raises ValueError naming both."""
    from ..guidance.cfg import LAYOUT_KEY

    served = ServedGuidance.of(vllm_config.model_config)
    if served is None or not served.one_branch or pairs_supported(vllm_config):
        return
    scheduler = vllm_config.scheduler_config
    given = "--async-scheduling" if scheduler.async_scheduling else f"--scheduler-cls {scheduler.scheduler_cls}"
    raise ValueError(
        f"{given}: {vllm_config.model_config.architecture} runs guidance with one branch per sequence "
        f"({LAYOUT_KEY} 'paired'), which needs the paired scheduler, synchronous; leave {given.split()[0]} out, "
        f"or serve it with --hf-overrides '{{\"{LAYOUT_KEY}\": \"stacked\"}}'"
    )


def platform_schedules_asynchronously() -> bool:
    """Whether vLLM may schedule asynchronously on this platform (0.32: not on CPU)."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def pairs_supported(vllm_config) -> bool:
    return vllm_config.scheduler_config.scheduler_cls in (SCHEDULER_CLS, PairedScheduler)


class PairedScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.guidance = ServedGuidance.of(self.vllm_config.model_config)
        self.partners: dict[str, str] = {}  # both ways: request <-> companion
        self.companions: set[str] = set()
        self.split_pairs: set[str] = set()  # requests whose pair ran apart last step
        # In the step being scheduled: tokens and requests handed out so far, each paired member's window
        # (rows at or past its last committed token; 0: held).
        self._step_tokens = self._step_requests = 0
        self._step_windows: dict[str, int] = {}

    # Arrival and end ----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        params = request.sampling_params
        if self.guidance is None or params is None or companion_of(params.extra_args) or request.request_id in self.partners:
            return
        negative = self.guidance.companion_prompt(params.extra_args, request.prompt_token_ids)
        if negative is None:
            return
        companion = Request(
            request_id=companion_id(request.request_id),
            prompt_token_ids=list(negative),
            sampling_params=companion_params(params, request.request_id),
            pooling_params=None,
            client_index=request.client_index,
            arrival_time=request.arrival_time,
            lora_request=request.lora_request,
            cache_salt=request.cache_salt,  # the input processor's salt of sequences run unguided
            priority=request.priority,
            block_hasher=request._block_hasher,
        )
        super().add_request(companion)
        self.partners[request.request_id] = companion.request_id
        self.partners[companion.request_id] = request.request_id
        self.companions.add(companion.request_id)

    def finish_requests(self, request_ids, finished_status):
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        if request_ids is not None:
            request_ids = set(request_ids)
            request_ids |= {self.partners[r] for r in request_ids if r in self.partners}
        companions = set(self.companions)  # forgotten below once their pair has ended
        finished = super().finish_requests(request_ids, finished_status)
        self._forget_ended_pairs()
        return [r for r in finished if r.request_id not in companions]

    def _alive(self, req_id: str) -> Request | None:
        request = self.requests.get(req_id)
        return None if request is None or request.is_finished() else request

    def _forget_ended_pairs(self) -> None:
        for req_id in [r for r in self.partners if r not in self.companions]:
            uncond = self.partners[req_id]
            if self._alive(req_id) is None and self._alive(uncond) is None:
                del self.partners[req_id], self.partners[uncond]
                self.companions.discard(uncond)
                self.split_pairs.discard(req_id)

    # Scheduling ---------------------------------------------------------------------------

    def _ready(self, request: Request) -> bool:
        """Running and holding everything but its last committed token."""
        return request.status == RequestStatus.RUNNING and request.num_computed_tokens >= request.num_tokens - 1

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = self._paired_tokens(
            request, num_computed_tokens, super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        )
        self._step_tokens += num_new_tokens  # an upper bound: an allocation may still fail
        self._step_requests += num_new_tokens > 0
        return num_new_tokens

    def _paired_tokens(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """What a member of a pair may run of the `num_new_tokens` vLLM offers it this step."""
        partner_id = self.partners.get(request.request_id)
        if partner_id is None:
            return num_new_tokens
        hold = request.num_tokens - 1
        before = max(hold - num_computed_tokens, 0)  # prompt or chunk tokens before the window
        window = num_computed_tokens + num_new_tokens - hold
        if window <= 0:
            return num_new_tokens
        if request.status != RequestStatus.RUNNING:
            # Admission, after the running loop (a running partner got no window this step): up
            # to the hold point; with nothing before it (vLLM stops admitting at a 0), the step
            # runs and is discarded.
            return before or num_new_tokens
        partner = self._alive(partner_id)
        if partner_id in self._step_windows:  # the partner went first: as far as it went
            window = min(window, self._step_windows[partner_id])
        elif partner is None or not self._ready(partner):
            window = 0
        else:  # first of the pair: leave the partner as much, of both of vLLM's budgets
            spec = self.vllm_config.speculative_config
            draft_slots = spec.max_num_new_slots_for_drafting if spec is not None else 0
            left = min(
                self.max_num_scheduled_tokens - self._step_tokens,
                self.scheduler_config.max_num_batched_tokens - self._step_tokens - (self._step_requests + 2) * draft_slots,
            )
            window = min(window, (left - before) // 2)
        window = max(window, 0)
        self._step_windows[request.request_id] = window
        return before + window

    def schedule(self, *args, **kwargs):
        if self.partners:
            self._order_pairs()
        self._step_tokens = self._step_requests = 0
        self._step_windows.clear()
        output = super().schedule(*args, **kwargs)
        if self.partners:
            self._align_windows(output)
            stuck = not output.total_num_scheduled_tokens and self._pause_state == PauseState.UNPAUSED
            if stuck or self._pause_state == PauseState.PAUSED_NEW:
                self._release_held_members(output.num_scheduled_tokens)
        return output

    def _order_pairs(self) -> None:
        """Each companion right after its request in the running queue, pairs that ran apart last
        step first: vLLM's budget then rarely splits a pair twice."""
        first, rest = [], []
        running = {r.request_id for r in self.running}
        for request in self.running:
            req_id = request.request_id
            if req_id in self.companions and self.partners[req_id] in running:
                continue  # placed right after its request
            group = first if req_id in self.split_pairs else rest
            group.append(request)
            uncond = self.partners.get(req_id)
            if uncond is not None and uncond in running and req_id not in self.companions:
                group.append(self.requests[uncond])
        self.running = first + rest

    def _release_held_members(self, scheduled: dict[str, int]) -> None:
        """Running members held for a partner that is not admitted (no free blocks, or a pause)
        would wait forever.  They are preempted, each queued behind its partner, so that the
        partner is admitted first: at the queue's head, or, on a priority heap, sorting before
        the member (its arrival time set just after the partner's; only the order reads it)."""
        now = time.monotonic()
        for request in list(self.running):
            partner = self._alive(self.partners.get(request.request_id, ""))
            if (
                partner is None or partner.status == RequestStatus.RUNNING or not self._ready(request)
                or request.request_id in scheduled
            ):
                continue
            if self.policy == SchedulingPolicy.PRIORITY and not partner < request:
                request.arrival_time = partner.arrival_time + 1e-6  # members share their priority
            self.running.remove(request)
            self._preempt_request(request, now)
            if partner in self.waiting:
                self.waiting.remove_request(partner)
                self.waiting.prepend_request(partner)

    def _align_windows(self, output) -> None:
        """Cut the longer window of a joint step to the shorter one (drafts only: a window is
        1 + its drafts)."""
        scheduled = output.num_scheduled_tokens
        for uncond in self.companions:
            req_id = self.partners[uncond]
            if req_id not in scheduled or uncond not in scheduled:
                continue
            members = [self.requests[req_id], self.requests[uncond]]
            # num_computed_tokens already counts this step's tokens (vLLM advances it in schedule).
            windows = [max(r.num_computed_tokens - (r.num_tokens - 1), 0) for r in members]
            if min(windows) == 0 or windows[0] == windows[1]:
                continue
            longer = members[windows[1] > windows[0]]
            cut = abs(windows[0] - windows[1])
            drafts = output.scheduled_spec_decode_tokens[longer.request_id]
            del drafts[len(drafts) - cut :]
            if not drafts:
                del output.scheduled_spec_decode_tokens[longer.request_id]
            scheduled[longer.request_id] -= cut
            output.total_num_scheduled_tokens -= cut
            longer.num_computed_tokens -= cut
            longer.num_in_flight_tokens -= cut

    # After the step -----------------------------------------------------------------------

    def update_from_output(self, scheduler_output, model_runner_output):
        sampling = [
            r for r in scheduler_output.num_scheduled_tokens
            if r in self.partners and (q := self._alive(r)) is not None and q.num_computed_tokens >= q.num_tokens
        ]
        companions = set(self.companions)  # vLLM's error path may end (and forget) pairs below
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if not companions and not self.partners:
            return outputs
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for req_id in sampling:
            request = self._alive(req_id)
            pair = req_id if req_id not in self.companions else self.partners[req_id]
            if request is None or (sampled and sampled[index[req_id]]):
                self.split_pairs.discard(pair)  # sampled with its partner
                continue
            # Ran without its partner: the runner dropped its tokens; back to its last one.
            request.num_computed_tokens = request.num_tokens - 1
            request.is_prefill_chunk = True
            request.spec_token_ids = []
            self.split_pairs.add(pair)
        # vLLM notes every request it frees (stopped, aborted, failed) there until the next step's
        # output: a pair can only have ended if a member is among them.
        ended = bool(self.finished_req_ids & self.partners.keys())
        if ended:
            self._end_with_partner(outputs)
        companions |= self.companions
        for client_outputs in outputs.values():
            client_outputs.outputs = [o for o in client_outputs.outputs if o.request_id not in companions]
            if client_outputs.finished_requests:  # vLLM reports a step's frees the step after: by suffix
                client_outputs.finished_requests = {
                    r for r in client_outputs.finished_requests if not r.endswith(COMPANION_SUFFIX)
                }
        if ended:
            self._forget_ended_pairs()
        return outputs

    def _end_with_partner(self, outputs) -> None:
        """A member that ended ends its partner.  Both end in the same step when they stop on
        their shared tokens; otherwise (a companion cut by the context) the request is aborted,
        and its client is told."""
        for uncond in list(self.companions):
            req_id = self.partners[uncond]
            request, companion = self._alive(req_id), self._alive(uncond)
            if (request is None) == (companion is None):
                continue
            if request is None:
                super().finish_requests([uncond], RequestStatus.FINISHED_ABORTED)
                continue
            logger.error("guidance: the negative prompt's sequence of request %s ended first; request aborted", req_id)
            super().finish_requests([req_id], RequestStatus.FINISHED_ABORTED)
            self.split_pairs.discard(req_id)
            client = outputs.setdefault(request.client_index, EngineCoreOutputs())
            client.outputs.append(
                EngineCoreOutput(request_id=req_id, new_token_ids=[], finish_reason=FinishReason.ABORT)
            )

    def update_draft_token_ids(self, draft_token_ids) -> None:
        super().update_draft_token_ids(draft_token_ids)
        for uncond in self.companions:
            request, companion = self._alive(self.partners[uncond]), self._alive(uncond)
            if request is not None and companion is not None and not companion.is_prefill_chunk:
                companion.spec_token_ids = [] if request.is_prefill_chunk else list(request.spec_token_ids)

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens, request_id):
        if request_id in self.companions:  # its drafts are its request's, counted there
            return spec_decoding_stats
        return super().make_spec_decoding_stats(
            spec_decoding_stats, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens, request_id
        )
