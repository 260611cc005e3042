"""The Jacobi state trusts a window only as it was made, and gives memory back."""

import torch

from vllm_sjdpp import SJDPPConfig
from vllm_sjdpp.jacobi_state import JacobiStates, Window


def test_windows_are_used_only_as_made():
    states = JacobiStates(SJDPPConfig(num_speculative_tokens=4), vocab_size=10)
    state = states.get("a", None)
    states.advance()
    state.window = Window(start=7, tokens=[1, 2, 3], prob_rows=[0, -1, 1], generation=states.generation)
    assert states.drafts_usable(state, 7, [1, 2]) == [0, -1]  # a prefix, as vLLM may trim
    assert states.drafts_usable(state, 8, [1, 2]) == [-1, -1]  # another position: resumed
    assert states.drafts_usable(state, 7, [0, 0, 0]) == [-1, -1, -1]  # drafts vLLM made up
    states.advance()  # the request sat out a step: its rows may be overwritten
    assert states.drafts_usable(state, 7, [1, 2]) == [-1, -1]


def test_per_request_options_and_release():
    states = JacobiStates(SJDPPConfig(num_speculative_tokens=4, fresh_token_range=(2, 6)), vocab_size=10)
    assert states.get("a", {"sjdpp_disable": True}).config is None
    assert states.get("b", {"sjdpp_reuse": "none"}).config.reuse == "none"
    assert states.get("b", None).fresh_vocab == range(2, 6)
    states.release("a")
    states.retain({"b", "c"})
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
    states.get("x", None)
    states.retain(set())
    assert states.state_bytes() == 0
