"""Property-based robustness of `vllm serve --speculative-config sjdpp`: random per-request
options and sampling parameters, valid and invalid, against one server.

Each request must either complete with the right number of tokens (valid) or get a 4xx naming
the problem (invalid), and the server must stay healthy throughout.  Validity is judged by an
oracle built from the checks' specifications: vLLM's own `SamplingParams`, our `SJDPPConfig`
with the model's limits, and the prompt's ids against the vocabulary.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tiny_llama import SJDPP_SERVER_K, SJDPP_SERVER_MAX_MODEL_LEN
from vllm_sjdpp.config import SJDPPConfig

VOCAB = 48
MAX_MODEL_LEN, K = SJDPP_SERVER_MAX_MODEL_LEN, SJDPP_SERVER_K


@pytest.fixture(scope="module")
def server(sjdpp_server):
    base, path, _ = sjdpp_server  # this package's, shared with test_serve.py
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client, path


def mostly(valid, edges):
    """Mostly valid values (7 in 8), sometimes one at or past a check's edge: about a third of
    the requests come out valid."""
    # (one_of would merge the repeated branches; hypothesis favours 0 and 7, not 3)
    return st.integers(0, 7).flatmap(lambda i: edges if i == 3 else valid)


# Values around each check's edges, of the JSON types a client sends.
SJDPP_OPTIONS = {
    "sjdpp_num_speculative_tokens": mostly(st.integers(1, K), st.integers(-1, K + 2) | st.just("4")),
    "sjdpp_reuse": mostly(st.sampled_from(["none", "coupled", "confidence"]), st.just("sometimes")),
    "sjdpp_threshold": mostly(st.floats(0.01, 1.0), st.floats(-0.5, 1.5, allow_nan=False) | st.just(0)),
    "sjdpp_init": mostly(st.sampled_from(["random", "left", "above"]), st.just("diagonal")),
    "sjdpp_row_width": mostly(st.integers(1, 8), st.sampled_from([-1, 0, MAX_MODEL_LEN, MAX_MODEL_LEN + 1, 10**9])),
    "sjdpp_fresh_token_range": mostly(
        st.tuples(st.integers(0, 10), st.integers(11, VOCAB)).map(list),
        st.lists(st.integers(-2, VOCAB + 2) | st.just(10**6), min_size=0, max_size=3),
    ),
    "sjdpp_fresh_token_ids": mostly(
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4), st.lists(st.integers(-1, VOCAB + 1), max_size=4)
    ),
    "sjdpp_jacobi_start": mostly(st.integers(0, 12), st.just(-1)),
    "sjdpp_disable": st.booleans(),
    "sjdpp_unknown": st.integers(),
    "guidance_scale": st.floats(0, 5),  # this model is not served with guidance
}
RARE = {"sjdpp_unknown", "guidance_scale"}
REQUESTS = st.fixed_dictionaries(
    {
        "prompt": mostly(
            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
            st.lists(st.integers(-1, VOCAB + 5), min_size=0, max_size=6),
        ),
        "max_tokens": mostly(st.integers(1, 12), st.just(0)),
        "n": mostly(st.integers(1, 3), st.just(0)),
        "temperature": mostly(st.sampled_from([0.0, 0.7, 1.0]), st.floats(-0.5, 2.0)),
        "top_k": mostly(st.sampled_from([-1, 0, 1, 5, VOCAB]), st.integers(-3, 60)),
        "top_p": mostly(st.sampled_from([1.0, 0.9]), st.floats(-0.1, 1.2)),
        "seed": st.none() | st.integers(0, 2**31),
        "vllm_xargs": st.tuples(
            st.sets(st.sampled_from(sorted(set(SJDPP_OPTIONS) - RARE)), max_size=4),
            st.sampled_from([None] * 6 + sorted(RARE)),
        ).flatmap(lambda keys: st.fixed_dictionaries(
            {k: SJDPP_OPTIONS[k] for k in sorted(keys[0]) + ([keys[1]] if keys[1] else [])}
        )),
    }
)


def expected_valid(request: dict) -> bool:
    """The oracle: would a careful server accept this request?"""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    prompt = request["prompt"]
    if not prompt or any(not 0 <= t < VOCAB for t in prompt) or len(prompt) + request["max_tokens"] > MAX_MODEL_LEN:
        return False
    try:
        SamplingParams(
            n=request["n"], temperature=request["temperature"], top_k=request["top_k"], top_p=request["top_p"],
            max_tokens=request["max_tokens"], seed=request["seed"],
        )
        xargs = request["vllm_xargs"]
        if "guidance_scale" in xargs:
            return False
        config = SJDPPConfig(num_speculative_tokens=K).for_request(xargs)
        if config is not None:
            config.check_model(VOCAB, MAX_MODEL_LEN, option_prefix="sjdpp_")
    except (ValueError, TypeError, VLLMValidationError):
        return False
    return True


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(request=REQUESTS)
def test_random_requests_get_an_answer_or_a_4xx(server, request):
    client, model = server
    body = {"model": model, "return_token_ids": True, "ignore_eos": True, **request}
    response = client.post("/v1/completions", json=body)
    valid = expected_valid(request)
    event("valid" if valid else "invalid")
    if valid:
        assert response.status_code == 200, (response.status_code, response.text[:500])
        choices = response.json()["choices"]
        assert len(choices) == request["n"] and all(len(c["token_ids"]) == request["max_tokens"] for c in choices)
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
        assert "error" in response.json() or "detail" in response.json()
    assert client.get("/health").status_code == 200


def test_one_bad_request_among_32_streams(server):
    """Every good stream completes while a bad request is refused in their midst."""
    client, model = server

    def good(i: int) -> int:
        body = {"model": model, "prompt": [2, 3, i % VOCAB], "max_tokens": 40, "temperature": 1.0, "seed": i,
                "stream": True, "return_token_ids": True, "ignore_eos": True}
        tokens = 0
        with client.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    import json

                    tokens += sum(len(c.get("token_ids") or []) for c in json.loads(line[6:])["choices"])
        return tokens

    with concurrent.futures.ThreadPoolExecutor(33) as pool:
        streams = [pool.submit(good, i) for i in range(32)]
        bad = client.post("/v1/completions", json={
            "model": model, "prompt": [2, 3], "max_tokens": 5, "vllm_xargs": {"sjdpp_fresh_token_range": [0, 10**6]},
        })
        assert bad.status_code == 400 and "sjdpp_fresh_token_range" in bad.text
        assert [s.result() for s in streams] == [40] * 32
    assert client.get("/health").status_code == 200
