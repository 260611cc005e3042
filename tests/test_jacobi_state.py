import inspect
"""The Jacobi state trusts a window only as it was made, and gives memory back."""

import torch
from vllm import SamplingParams

from vllm_sjdpp import SJDPPConfig
from vllm_sjdpp.engine.jacobi_state import JacobiStates, Window


def test_windows_are_used_only_as_made():
    states = JacobiStates(SJDPPConfig(num_speculative_tokens=4), vocab_size=10)
    state = states.get("a", SamplingParams())
    states.advance()
    state.window = Window(start=7, tokens=[1, 2, 3], prob_rows=[0, -1, 1], generation=states.generation)
    assert states.drafts_usable(state, 7, [1, 2]) == [0, -1]  # a prefix, as vLLM may trim
    assert states.drafts_usable(state, 8, [1, 2]) == [-1, -1]  # another position: resumed
    assert states.drafts_usable(state, 7, [0, 0, 0]) == [-1, -1, -1]  # drafts vLLM made up
    states.advance()  # the request sat out a step: its rows may be overwritten
    assert states.drafts_usable(state, 7, [1, 2]) == [-1, -1]


def test_per_request_options_and_release():
    states = JacobiStates(SJDPPConfig(num_speculative_tokens=4, fresh_token_range=(2, 6)), vocab_size=10)
    assert states.get("a", SamplingParams(extra_args={"sjdpp_disable": True})).config is None
    assert states.get("b", SamplingParams(extra_args={"sjdpp_reuse": "none"})).config.reuse == "none"
    assert states.get("b", SamplingParams()).fresh_vocab == range(2, 6)
    # Noise keys: the seed where there is one, random and distinct otherwise; none for "ratio".
    assert states.get("s", SamplingParams(seed=5)).noise_key == 5
    assert states.get("u", SamplingParams()).noise_key != states.get("v", SamplingParams()).noise_key
    assert states.get("r", SamplingParams(seed=5, extra_args={"sjdpp_verification": "ratio"})).noise_key is None
    assert states.get("p", SamplingParams(seed=5, extra_args={"sjdpp_disable": True})).noise_key == 5
    for req_id in "suvrp":
        states.release(req_id)
    states.release("a")
    states.release("c")  # never seen: nothing to forget
    assert set(states.requests) == {"b"}


def test_proposal_buffers_alternate_grow_and_shrink():
    states = JacobiStates(SJDPPConfig(), vocab_size=10)
    big = states.next_buffer(100, 10, torch.float32, torch.device("cpu"))
    states.advance()
    assert states.proposals is big
    other = states.next_buffer(100, 10, torch.float32, torch.device("cpu"))
    assert other is not big  # a step never writes the buffer it reads
    states.advance()
    small = states.next_buffer(5, 10, torch.float32, torch.device("cpu"))
    assert small.shape[0] < 100  # the batch shrank: memory is given back
    states.get("x", SamplingParams())
    states.get("y", SamplingParams())
    states.release("x")
    assert states.state_bytes() > 0  # y still runs
    states.release("y")
    assert states.state_bytes() == 0  # idle


def test_batch_requests_want_windows_within_their_bounds():
    """Windows wanted per request, worked out by hand: jacobi_start, max_tokens, max_model_len,
    a plain request, a partial prefill; and the facts follow the batch when its order changes."""
    from types import SimpleNamespace

    import numpy as np

    from vllm_sjdpp.engine.batch_requests import BatchRequests

    def request(max_tokens=None, seed=None, **options):
        extra = {f"sjdpp_{k}": v for k, v in options.items()}
        return SimpleNamespace(sampling_params=SimpleNamespace(max_tokens=max_tokens, seed=seed, extra_args=extra))

    runner = SimpleNamespace(model_config=SimpleNamespace(max_model_len=47), requests={
        "free": request(),
        "late": request(jacobi_start=5),
        "ending": request(max_tokens=20, seed=3),
        "short": request(num_speculative_tokens=2),
        "plain": request(disable=True),
        "ratio": request(seed=4, verification="ratio"),
    })
    ids = ["free", "late", "ending", "short", "plain"]
    prompts = {"free": 10, "late": 7, "ending": 12, "short": 10, "plain": 9, "ratio": 10}
    start = np.array([14, 10, 27, 40, 11], dtype=np.int32)  # generated: 4, 3, 15, 30, 2
    no_discard = np.zeros(5, dtype=bool)

    def batch_of(req_ids, max_model_len=47):
        runner.model_config.max_model_len = max_model_len
        batch = BatchRequests(JacobiStates(SJDPPConfig(num_speculative_tokens=8), vocab_size=10), runner)
        batch.update(req_ids, [prompts[r] for r in req_ids])
        return batch

    def wanted(start, max_model_len, discard=no_discard):
        return batch_of(ids, max_model_len).windows_wanted(start, discard).tolist()

    # late: its 4th token committed by this pass, jacobi_start 5: no drafts yet; ending: 20 - 15 = 5
    # left, 5 - 2 = 3; max_model_len 47: short has 7 left but k = 2 (at 43: 3 left, one draft);
    # plain: never.
    assert wanted(start, 47) == [8, 0, 3, 2, 0]
    assert wanted(start + 1, 47) == [8, 8, 2, 2, 0]
    assert wanted(start, 45) == [8, 0, 3, 2, 0]
    assert wanted(start, 43) == [8, 0, 3, 1, 0]
    assert wanted(start, 47, np.array([1, 0, 0, 0, 0], dtype=bool)) == [0, 0, 3, 2, 0]
    # Past the end: none, never fewer.
    assert wanted(np.array([46, 45, 60, 46, 46], dtype=np.int32), 47) == [0, 0, 0, 0, 0]
    # What the proposer may hand out after a commit: one token fewer than are left.
    batch = batch_of(ids, 43)
    assert batch.drafts_allowed(start).tolist() == [28, 32, 4, 2, 31]
    # Only a seeded request verified by the ratio test keeps its full window under "auto".
    batch = batch_of(ids)
    batch.update(ids + ["ratio"], [prompts[r] for r in ids + ["ratio"]])
    assert batch.pinned == [False, False, False, False, False, True]
    assert batch.request_states[4].config is None

    batch.update(["ratio"] + ids[::-1], [prompts[r] for r in ["ratio"] + ids[::-1]])  # vLLM reorders its batch
    assert batch.pinned == [True, False, False, False, False, False]
    batch.update(ids[::-1], [prompts[r] for r in ids[::-1]])
    assert batch.windows_wanted(start[::-1], no_discard).tolist() == [0, 2, 3, 0, 8]


def runtime_runner(**attributes):
    """The model runner's attributes an `SJDPPRuntime` reads when built (a Llama of 10 tokens,
    windows of 8), and `attributes`."""
    from types import SimpleNamespace

    from vllm_sjdpp.config import ADDITIONAL_CONFIG_KEY

    model_config = SimpleNamespace(
        hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]), get_vocab_size=lambda: 10, max_model_len=100,
        dtype=None,
    )
    return SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config={ADDITIONAL_CONFIG_KEY: {"num_speculative_tokens": 8}},
                                    model_config=model_config, scheduler_config=SimpleNamespace(max_num_seqs=8)),
        model_config=model_config, parallel_config=SimpleNamespace(world_size=1), **attributes,
    )


def test_a_reused_request_id_starts_afresh():
    """vLLM removes a request (finished or aborted) and a client reuses its id in the same
    place of the batch: the runtime's release forgets every per-request fact, so the new
    request's options are its own, not the old one's."""
    from types import SimpleNamespace

    from vllm_sjdpp.engine.runtime import SJDPPRuntime

    def request(**options):
        extra = {f"sjdpp_{k}": v for k, v in options.items()}
        return SimpleNamespace(sampling_params=SimpleNamespace(max_tokens=None, seed=None, extra_args=extra))

    runner = runtime_runner(requests={"a": request(disable=True), "b": request()})
    runtime = SJDPPRuntime(runner)  # what vLLM's removed-request hook calls: runtime.release
    states, batch = runtime.states, runtime.batch
    batch.update(["a", "b"], [5, 5])
    assert batch.request_states[0].config is None
    runner.requests["a"] = request(num_speculative_tokens=3)  # the id reused, SJD++ this time
    runtime.release("a")
    batch.update(["a", "b"], [5, 5])
    assert batch.request_states[0].config.num_speculative_tokens == 3
    # Broken variant: without forget, the same batch key keeps the aborted request's facts.
    runner.requests["a"] = request(disable=True)
    states.release("a")
    batch.update(["a", "b"], [5, 5])
    assert batch.request_states[0].config.num_speculative_tokens == 3


def test_a_streaming_session_s_new_turn_starts_afresh():
    """vLLM's streaming input keeps a session's request id across turns, each with a new prompt
    (the last turn's output included) and new options, updated in place
    (`GPUModelRunner._update_streaming_request`) without the removed-request hook: the patched
    update forgets the request first, so its next step reads the new turn's prompt length and
    options.  Broken variant (vLLM's update alone): the first turn's stay."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_sjdpp.engine.runtime import SJDPPRuntime
    from vllm_sjdpp.patches import internals

    if not internals.available(internals.RUNNER, "_update_streaming_request"):
        pytest.skip("this vLLM has no streaming input")
    load_general_plugins()
    patched = GPUModelRunner._update_streaming_request
    vllms = inspect.unwrap(patched)
    assert patched is not vllms

    def params(**options):
        return SimpleNamespace(max_tokens=None, seed=None, extra_args={f"sjdpp_{k}": v for k, v in options.items()})

    def turn(prompt_len, **options):
        return SimpleNamespace(prompt_token_ids=list(range(prompt_len)), mm_features=[], prompt_embeds=None,
                               sampling_params=params(**options), pooling_params=None, block_ids=([0],),
                               num_computed_tokens=0)

    for update, forgotten in ((patched, True), (vllms, False)):
        runner = runtime_runner(
            requests={"s": SimpleNamespace(sampling_params=params(jacobi_start=4), output_token_ids=[])},
            uses_mrope=False, input_batch=SimpleNamespace(remove_request=lambda req_id: None),
            late_interaction_runner=SimpleNamespace(register_request=lambda *args: None),
            get_model=lambda: SimpleNamespace(),
        )
        runner.sjdpp = runtime = SJDPPRuntime(runner)
        runtime.batch.update(["s"], [6])
        assert runtime.batch.windows_wanted(np.array([8]), np.zeros(1, dtype=bool)).tolist() == [0]  # 3rd token
        update(runner, "s", turn(20, jacobi_start=4, num_speculative_tokens=5))
        runtime.batch.update(["s"], [runner.requests["s"].num_prompt_tokens])
        # The new turn's 2nd and 4th tokens: drafts from its 4th on, 5 of them (the first turn's
        # facts: drafts from position 9, 8 of them).
        wanted = [runtime.batch.windows_wanted(np.array([c]), np.zeros(1, dtype=bool)).tolist()[0] for c in (21, 23)]
        assert wanted == ([0, 5] if forgotten else [8, 8]), (update, wanted)
