"""A short soak (vllm_sjdpp/digits/soak.py): 40 s of 16 clients, 20% hanging up mid-stream, on a tiny
Llama with SJD++; the server's memory and the Jacobi state stay bounded, and it keeps serving."""

from __future__ import annotations

import os

from tiny_llama import ENGINE_ENV
from vllm_sjdpp.digits import soak
from vllm_sjdpp.serving.server import vllm_server


def test_short_soak(tiny_llama_path, tmp_path):
    path = tiny_llama_path
    env = {**os.environ, **ENGINE_ENV, "SJDPP_LOG_INTERVAL_S": "1"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None
    args = ["--speculative-config", "sjdpp", "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "256",
            "--dtype", "float32", "--max-num-seqs", "16"]
    log_path = tmp_path / "server.log"
    with vllm_server(path, args, log_path, env=env, timeout_s=240) as base:
        result = soak.soak(base, path, log_path, minutes=40 / 60, concurrency=16, abort_fraction=0.2,
                           prompt=[2, 3, 4], max_tokens=120, sample_every_s=2)
        import httpx

        assert httpx.get(base + "/health", timeout=10).status_code == 200
    counts, verdict = result["counts"], soak.verdict(result)
    print(counts, verdict)
    assert counts["errors"] == 0 and counts["completed"] > 16 and counts["aborted"] > 0, counts
    assert verdict["state_bounded"] and verdict["max_jacobi_requests"] > 0, verdict
    assert verdict["rss_bounded"], verdict
