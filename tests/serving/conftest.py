"""The tiny Llama served as users run it, one server for the modules of this package."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="package")
def sjdpp_server(tiny_llama_path, tmp_path_factory):
    """(base URL, model path, log path) of `vllm serve TINY_LLAMA --speculative-config JSON`
    (SJD++ with k = SJDPP_SERVER_K, --max-model-len SJDPP_SERVER_MAX_MODEL_LEN, 64 sequences, the
    state logged every step), in its own process as users run it, shared by this package's
    modules and stopped after them (its log is read for SJD++ fallbacks then: tests/conftest.py)."""
    from tiny_llama import ENGINE_ENV, SJDPP_SERVER_K, SJDPP_SERVER_MAX_MODEL_LEN
    from vllm_sjdpp.serving.server import vllm_server

    env = {**os.environ, **ENGINE_ENV, "SJDPP_LOG_INTERVAL_S": "0"}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = None
    args = [
        "--speculative-config", f'{{"method": "sjdpp", "num_speculative_tokens": {SJDPP_SERVER_K}}}',
        "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", str(SJDPP_SERVER_MAX_MODEL_LEN),
        "--dtype", "float32", "--max-num-seqs", "64",
    ]
    log_path = tmp_path_factory.mktemp("sjdpp-server") / "server.log"
    with vllm_server(tiny_llama_path, args, log_path, env=env, timeout_s=240) as base:
        yield base, tiny_llama_path, log_path
