"""Paired requests (`guidance.pairing`) under the scheduling states that used to leave them
unfinished or wasted: a token budget that splits a pair's windows, a pause that lets running
requests drain, the priority policy, and requests a companion must not copy.  Every engine is
driven step by step with a bound: a livelock fails the test instead of hanging the suite.
Outputs are compared with transformers' unbatched guidance (`hf_greedy`).
"""

from __future__ import annotations

import pytest

from guided_engine import ENGINE, hf_greedy, params, run, tokens

K = 6
SJDPP = {"method": "sjdpp", "num_speculative_tokens": K, "draft_token_budget": None}
PROMPT, NEGATIVE = [0, 5, 6, 7, 8], [0, 3, 4, 11, 12, 13, 14]
MAX_STEPS = 400


def guided_params(negative=NEGATIVE, scale=3.0, **kw):
    return params(temperature=0, extra_args={"guidance_scale": scale, "negative_prompt_token_ids": negative}, **kw)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def drive(llm, until, max_steps: int = MAX_STEPS) -> dict[str, list[int]]:
    """Step the engine until `until()` holds (AssertionError past `max_steps`); the tokens of
    every request that finished meanwhile, by request id."""
    engine, done = llm.llm_engine, {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        if until():
            return done
    raise AssertionError(f"not done within {max_steps} steps: {scheduler_of(llm).requests.keys()}")


@pytest.fixture(scope="module")
def tight_budget(make_engine, tiny_guided_path):
    """SJD++ windows of up to K + 1 = 7 rows, 7 tokens per step: a pair's windows never both fit."""
    return make_engine(tiny_guided_path, speculative_config=SJDPP, max_num_batched_tokens=K + 1, **ENGINE)


@pytest.fixture
def discarded(monkeypatch) -> list[int]:
    """The batch rows of members the runner discarded (they ran without their partner)."""
    from vllm_sjdpp.guidance.cfg import GuidanceBatch

    rows, discard = [], GuidanceBatch._discard
    monkeypatch.setattr(GuidanceBatch, "_discard", staticmethod(lambda runner, r: (rows.extend(r), discard(runner, r))))
    return rows


LONG_PROMPT = [0] + [5 + i % 30 for i in range(29)]


@pytest.mark.parametrize("prompt, negative", [(PROMPT, NEGATIVE), (LONG_PROMPT, [0, 3])], ids=["short", "chunked"])
def test_a_pair_shares_the_token_budget_instead_of_running_apart(tight_budget, hf_guided, discarded, prompt, negative):
    """Each member takes half of what is left (the second no more than the first), a member
    being admitted stops before its last prompt token, and a member whose prompt ends in chunks
    meets its partner at the hold point: no window is computed and thrown away, and the output
    is transformers'.  Before, the first member took the whole budget at every drafted step,
    and the second sampled nothing (the "short" case: 35 rows discarded)."""
    scheduler = scheduler_of(tight_budget)
    tight_budget.llm_engine.add_request("budget", {"prompt_token_ids": prompt}, guided_params(negative, max_tokens=40))
    assert list(drive(tight_budget, lambda: not scheduler.requests).values()) == [
        hf_greedy(hf_guided, prompt, 3.0, negative=negative, n=40)
    ]
    assert discarded == []


@pytest.fixture(scope="module")
def two_seqs(make_engine, tiny_guided_path, tight_budget):
    """Guidance, two sequences at a time: a pair's companion waits while another request runs."""
    return make_engine(tiny_guided_path, max_num_seqs=2, **ENGINE)


def test_a_pause_drains_with_a_member_held(two_seqs, hf_guided):
    """A pause that lets running requests drain (the API server's pause_generation(mode="wait"):
    vLLM admits no one until it is lifted), taken while a paired request runs held for its
    companion, which waits behind a plain request: the held member goes back to the queue, the
    pause drains, and once lifted the pair ends with transformers' output.  Before, the member
    stayed running, held for a partner that would never be admitted, and the pause never
    drained."""
    from vllm.v1.core.sched.interface import PauseState

    engine = two_seqs.llm_engine
    scheduler = scheduler_of(two_seqs)
    plain = params(temperature=0, max_tokens=30, extra_args={"guidance_scale": 3.0})
    engine.add_request("plain", {"prompt_token_ids": [0, 9, 10]}, plain)
    engine.step()
    engine.add_request("paired", {"prompt_token_ids": PROMPT}, guided_params(max_tokens=20))
    engine.step()
    engine.step()
    held = [r for r in scheduler.running if r.request_id.startswith("paired")]
    assert held and not any(r.request_id.endswith("::uncond") for r in scheduler.running)
    scheduler.set_pause_state(PauseState.PAUSED_NEW)
    done = drive(two_seqs, lambda: scheduler.get_num_unfinished_requests() == 0)
    assert [k.split("-")[0] for k in done] == ["plain"]
    scheduler.set_pause_state(PauseState.UNPAUSED)
    done = drive(two_seqs, lambda: not scheduler.requests)
    assert list(done.values()) == [hf_greedy(hf_guided, PROMPT, 3.0, negative=NEGATIVE, n=20)]


@pytest.fixture(scope="module")
def by_priority(make_engine, tiny_guided_path, two_seqs):
    """Guidance, the priority policy, two sequences at a time."""
    return make_engine(tiny_guided_path, scheduling_policy="priority", max_num_seqs=2, **ENGINE)


def test_a_released_member_queues_behind_its_partner_on_a_priority_heap(by_priority, hf_guided):
    """A paired request admitted while its companion has no seat (a plain request runs), then
    released (what the scheduler does when nothing else can run): on the priority policy's heap
    the companion must come out first, or the member is admitted again ahead of it, samples
    alone and is discarded at every release.  Then the pair ends with transformers' output."""
    engine = by_priority.llm_engine
    scheduler = scheduler_of(by_priority)
    engine.add_request("plain", {"prompt_token_ids": [0, 9, 10]}, params(temperature=0, max_tokens=8))
    engine.step()
    engine.add_request("paired", {"prompt_token_ids": PROMPT}, guided_params(max_tokens=20))
    engine.step()
    (member,) = [r for r in scheduler.running if r.request_id.startswith("paired")]
    scheduler._release_held_members({})
    assert scheduler.waiting.pop_request().request_id == member.request_id + "::uncond"
    scheduler.waiting.add_request(scheduler.requests[member.request_id + "::uncond"])
    done = drive(by_priority, lambda: not scheduler.requests)
    assert [v for k, v in done.items() if k.startswith("paired")] == [
        hf_greedy(hf_guided, PROMPT, 3.0, negative=NEGATIVE, n=20)
    ]


@pytest.mark.parametrize("engine", ["tight_budget", "two_seqs"])
def test_structured_outputs_are_refused_naming_the_field(request, engine):
    """Neither guidance nor the SJD++ step holds tokens to a grammar: such a request, paired or
    not, is refused with a 400 naming `structured_outputs` (before, a guided server answered 500
    when a sampled token broke the grammar, and a paired request never ended), and the engine
    goes on serving."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    llm = request.getfixturevalue(engine)
    for extra in ({"guidance_scale": 3.0}, {"guidance_scale": 3.0, "negative_prompt_token_ids": NEGATIVE}):
        sampling = params(max_tokens=4, extra_args=extra, structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
        with pytest.raises(VLLMValidationError, match="structured outputs") as refused:
            run(llm, [PROMPT], sampling)
        assert refused.value.parameter == "structured_outputs"
    assert len(tokens(run(llm, [PROMPT], guided_params(max_tokens=4)))[0]) == 4


def test_a_companion_takes_only_what_ends_it_with_its_request(two_seqs, hf_guided):
    """Options that act on what a sequence samples, per-request state and extra_args stay with
    the request: the companion has its stop conditions, not its allowed ids, bad words, bias or
    custom arguments (which logits processors and KV transfers read)."""
    from vllm_sjdpp.config import COMPANION_OF_KEY

    engine = two_seqs.llm_engine
    scheduler = scheduler_of(two_seqs)
    sampling = guided_params(max_tokens=12, allowed_token_ids=list(range(48)), logit_bias={3: 0.0})
    sampling.extra_args["kv_transfer_params"] = {"do_remote_prefill": False}
    sampling.bad_words = ["x"]
    engine.add_request("options", {"prompt_token_ids": PROMPT}, sampling)
    (member,) = [r for r in scheduler.requests.values() if not r.request_id.endswith("::uncond")]
    companion = scheduler.requests[member.request_id + "::uncond"].sampling_params
    assert companion.extra_args == {COMPANION_OF_KEY: member.request_id, "sjdpp_disable": True}
    assert (companion.allowed_token_ids, companion.logit_bias, companion.bad_words) == (None, None, None)
    assert (companion.max_tokens, companion.ignore_eos, companion.stop_token_ids) == (12, True, member.sampling_params.stop_token_ids)
    done = drive(two_seqs, lambda: not scheduler.requests)
    assert list(done.values()) == [hf_greedy(hf_guided, PROMPT, 3.0, negative=NEGATIVE, n=12)]


def test_no_companion_leaves_the_engine_when_everything_is_aborted(two_seqs):
    """vLLM's shutdown path aborts every request and reports what it returns: companions are
    not among them (they were forgotten before being filtered out)."""
    from vllm.v1.request import RequestStatus

    engine = two_seqs.llm_engine
    scheduler = scheduler_of(two_seqs)
    engine.add_request("aborted", {"prompt_token_ids": PROMPT}, guided_params(max_tokens=50))
    engine.step()
    ended = [r.request_id for r in scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)]
    assert len(ended) == 1 and not ended[0].endswith("::uncond")
    assert not scheduler.requests and not scheduler.partners
