"""`vllm serve MODEL --speculative-config sjdpp` as users run it, queried with the openai client."""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import time

import pytest

from tiny_llama import ENGINE_ENV
from vllm_sjdpp.serving.server import VLLM_CLI, free_port

SERVE_ARGS = ["--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "256", "--dtype", "float32"]


def _env() -> dict[str, str]:
    env = {**os.environ, **ENGINE_ENV, "SJDPP_LOG_INTERVAL_S": "0"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None  # the server runs as users run it
    return env


@pytest.fixture(scope="module")
def server(sjdpp_server):
    return sjdpp_server  # this package's, shared with test_fuzz_serve.py


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    base, _, _ = server
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(client, server, prompt, max_tokens, **extra):
    return client.completions.create(
        model=server[1], prompt=prompt, max_tokens=max_tokens, temperature=extra.pop("temperature", 1.0),
        extra_body={"return_token_ids": True, "ignore_eos": True, **extra},
    )


def test_token_id_prompt_returns_token_ids(client, server):
    out = _complete(client, server, [2, 3, 4], 24)
    choice = out.choices[0]
    assert len(choice.token_ids) == 24 and all(0 <= t < 48 for t in choice.token_ids)
    assert out.usage.completion_tokens == 24


def test_greedy_with_and_without_sjdpp_agree(client, server):
    sjdpp = _complete(client, server, [5, 6], 40, temperature=0.0).choices[0].token_ids
    plain = _complete(client, server, [5, 6], 40, temperature=0.0, vllm_xargs={"sjdpp_disable": True})
    assert sjdpp == plain.choices[0].token_ids


def test_streaming(client, server):
    stream = client.completions.create(
        model=server[1], prompt=[7, 8], max_tokens=30, stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    tokens = [t for chunk in stream for c in chunk.choices for t in (c.token_ids or [])]
    assert len(tokens) == 30


def test_n_greater_than_one(client, server):
    out = _complete(client, server, [9], 16, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(len(c.token_ids) == 16 for c in out.choices)


def test_concurrent_requests(client, server):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: _complete(client, server, [2 + i % 40], 10 + i), range(16)))
    assert [len(o.choices[0].token_ids) for o in outs] == [10 + i for i in range(16)]


@pytest.mark.parametrize(
    "xargs, option",
    [({"sjdpp_reuse": "sometimes"}, "sjdpp_reuse"), ({"sjdpp_row_width": 0}, "sjdpp_row_width"),
     ({"sjdpp_windw": 4}, "sjdpp_windw"), ({"sjdpp_num_speculative_tokens": 99}, "sjdpp_num_speculative_tokens"),
     ({"guidance_scale": 3.0}, "guidance_scale")],  # this model is not served with guidance
)
def test_bad_request_options_are_400(client, server, xargs, option):
    from openai import BadRequestError

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(_complete, client, server, [3, 4], 20)
        with pytest.raises(BadRequestError, match=option) as err:
            _complete(client, server, [3, 4], 8, vllm_xargs=xargs)
        assert err.value.status_code == 400
        assert len(good.result().choices[0].token_ids) == 20  # other requests are unaffected


def test_load_with_aborted_streams(client, server):
    """64 concurrent streams, 10% dropped mid-stream: the rest complete, nothing is left over."""
    import httpx

    base, model, log_path = server
    aborted = set(range(0, 64, 10))

    def run(i):
        stream = client.completions.create(
            model=model, prompt=[2 + i % 40, 3], max_tokens=40 + i % 7, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        got = 0
        for chunk in stream:
            got += sum(len(c.token_ids or []) for c in chunk.choices)
            if i in aborted and got >= 5:
                stream.close()  # the client goes away mid-generation
                return None
        return got

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    for i, got in enumerate(results):
        if i not in aborted:
            assert got == 40 + i % 7, (i, got)
    assert httpx.get(base + "/health", timeout=5).status_code == 200
    # vLLM tells the model runner about finished and aborted requests at its next step: after
    # two more requests, the state holds at most those two.
    for _ in range(2):
        _complete(client, server, [4], 3)
    time.sleep(1)
    states = re.findall(r"state: (\d+) requests", log_path.read_text())
    assert states and int(states[-1]) <= 2, states[-5:]


@pytest.mark.parametrize(
    "config, message",
    [('{"method": "sjdpp", "reuse": "sometimes"}', "'reuse'"),
     ('{"method": "sjdpp", "reuze": "none"}', "'reuze'"),
     ('{"method": "sjdpp", "num_speculative_tokens": 100}', "'num_speculative_tokens'")],
)
def test_invalid_config_stops_startup_with_a_clear_error(tiny_llama_path, config, message):
    proc = subprocess.run(
        [VLLM_CLI, "serve", tiny_llama_path, "--speculative-config", config, "--port", str(free_port()), *SERVE_ARGS],
        capture_output=True, text=True, env={k: v for k, v in _env().items() if v is not None}, timeout=300,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "SJD++ option" in proc.stdout + proc.stderr
