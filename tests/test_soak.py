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
    # oneDNN keeps a primitive per GEMM shape (each pass's number of positions), up to 1024: a
    # bounded rise of about 300 MiB in the worker, whose pace depends on which batch shapes the load
    # happens to reach (it fell in the second half of a CI run).  Without it the worker's RSS moves
    # by under 10 MiB in 45 s, so what the plugin or vLLM keeps per request stands out.
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "0"
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


def test_the_verdict_tells_a_late_rise_from_a_plateau():
    """A rise of 200 MiB (over 5%) in the second half is unbounded; the same rise in the first
    half, then flat, is bounded; jitter within 64 MiB is bounded."""
    def result(rss):
        return {"samples": [[2.0 * i, value, 1, 0.0] for i, value in enumerate(rss)], "concurrency": 1}

    flat, rise = [3000.0] * 10, [3000.0] * 5 + [3200.0] * 5
    assert soak.verdict(result(flat))["rss_bounded"]
    assert soak.verdict(result([3000.0] * 2 + [3200.0] * 8))["rss_bounded"]
    assert soak.verdict(result([3000.0, 3060.0] * 5))["rss_bounded"]
    assert not soak.verdict(result(rise))["rss_bounded"]
    assert soak.verdict(result(rise))["rss_second_half_peak_mib"] == 3200.0
