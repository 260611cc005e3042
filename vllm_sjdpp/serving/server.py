"""`vllm serve` as a child process on loopback, for the demo, benchmarks and tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

VLLM_CLI = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    model: str | Path, args: list[str], log_path: Path, env: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> Iterator[str]:
    """`vllm serve MODEL ARGS` on a free loopback port; yields its base URL; always stops it.
    `env` is laid over this process's environment; a None value removes the variable.

    A server that exits or does not answer /health within `timeout_s` raises RuntimeError
    with the end of its log.
    """
    import httpx

    port = free_port()
    merged = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **os.environ, **(env or {})}
    env = {k: v for k, v in merged.items() if v is not None}
    cmd = [VLLM_CLI, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                failure = None
                if proc.poll() is not None:
                    failure = f"vllm serve exited ({proc.returncode})"
                elif time.monotonic() > deadline:
                    failure = f"vllm serve did not start in {timeout_s:.0f} s"
                if failure:
                    tail = Path(log_path).read_text()[-3000:]
                    raise RuntimeError(f"{failure}; the end of its log ({log_path}):\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
