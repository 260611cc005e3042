"""Where a benchmark result came from: the command, the code, the machine and the libraries.

Every script that writes a JSON result (benchmarks/, `python -m vllm_sjdpp.bench`, the digit
model's soak) puts `provenance()` under the result's top-level "provenance" key
(tests/test_bench_provenance.py checks that each one does):

    {"command": ".venv/bin/python benchmarks/bench_auto.py --rounds 5",
     "commit": "48b8a83...+dirty", "cpu": "AMD EPYC ...", "cpu_flags": ["avx2", "avx512f", ...],
     "cpus": 2, "gpu": null, "date": "2026-12-05T10:11:12Z",
     "versions": {"vllm": "0.32.0+cpu", "torch": "...", "transformers": "...", "vllm_sjdpp": "0.1.0"}}

- command: the command line as it was run (`sys.orig_argv`: the interpreter, `-m module` or the
  script's path, the arguments), after the environment variables that change what a run
  measures (`COMMAND_ENV`) where they are set;
- commit: `git rev-parse HEAD` of the repository this package sits in, with "+dirty" when
  `git status` shows changes to tracked files (untracked files do not count); where git cannot
  tell (no git, a copy of the tree without .git, an installed wheel) the environment's
  VLLM_SJDPP_COMMIT, else "unknown";
- cpu: /proc/cpuinfo's "model name" (else lscpu's, else `platform.processor()`), cpu_flags the
  ones of `FLAGS` it lists (x86 "flags", aarch64 "Features"), cpus the cores this process may use;
- gpu: torch's name for CUDA device 0, None without CUDA;
- date: when `provenance()` ran, ISO 8601 in UTC;
- versions: the installed distributions, None where one is not installed (vLLM on a device
  machine that has only torch, triton and transformers).

Imports nothing from vLLM (benchmarks/device_check.py runs where vLLM is not installed), and torch
only inside `gpu()`.  `python -m vllm_sjdpp.provenance` prints this machine's.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# CPU features that change what a CPU run measures (bf16 matmuls, int8 dot products, AMX tiles);
# "bf16" is aarch64's (its "Features" line), the others x86's ("flags").
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "bf16")
# Set by hand for some runs and part of what was run (check_tp2.py needs the first).
COMMAND_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "CUDA_VISIBLE_DEVICES")
# Key in "versions" -> the distribution's name.
PACKAGES = {"vllm": "vllm", "torch": "torch", "transformers": "transformers", "vllm_sjdpp": "vllm-sjdpp"}


def provenance(argv: list[str] | None = None, *, cpuinfo: str | Path | None = None,
               repo: str | Path | None = None) -> dict:
    """The provenance of a result produced now by this process.

    argv: the command to record (default: this process's, `sys.orig_argv`); cpuinfo: /proc/cpuinfo's
    text, or a Path to read it from (default: /proc/cpuinfo); repo: the git repository whose commit
    is recorded (default: the one holding this file)."""
    model, flags = cpu(cpuinfo)
    return {
        "command": command(argv),
        "commit": commit(REPO if repo is None else repo),
        "cpu": model,
        "cpu_flags": flags,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpu": gpu(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
    }


def command(argv: list[str] | None = None) -> str:
    if argv is None:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    env = [f"{key}={shlex.quote(os.environ[key])}" for key in COMMAND_ENV if key in os.environ]
    return " ".join(env + [shlex.join(argv)])


def commit(repo: str | Path) -> str:
    repo = Path(repo).resolve()
    env = {
        **os.environ,
        "GIT_OPTIONAL_LOCKS": "0",  # `git status` must not take the index lock from others at work
        "GIT_CEILING_DIRECTORIES": str(repo.parent),  # this folder's repository, not one around it
    }

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env,
                              timeout=60, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        # results written by earlier runs are outputs, not code
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VLLM_SJDPP_COMMIT") or "unknown"
    return head + ("+dirty" if changed else "")


def cpu(cpuinfo: str | Path | None = None) -> tuple[str, list[str]]:
    """(model name, the flags of FLAGS present) from /proc/cpuinfo's text (`vllm_sjdpp.machine`
    reads it, as the server's dtype choice does)."""
    from . import machine

    if cpuinfo is None:
        text = machine.read_cpuinfo()
    elif isinstance(cpuinfo, Path):
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            text = ""
    else:
        text = cpuinfo
    present = machine.cpu_features(text)
    model = machine.cpu_name(text)
    if model == platform.machine() and cpuinfo is None:  # no "model name" (aarch64)
        model = _lscpu_model() or model
    return model or "unknown", [f for f in FLAGS if f in present]


def _lscpu_model() -> str | None:
    """lscpu's "Model name" (on aarch64 /proc/cpuinfo names no model; lscpu maps the part number)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip() not in ("", "-"):
            return value.strip()
    return None


def gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken driver is no reason to lose a result
        return None


def versions() -> dict[str, str | None]:
    found = {}
    for key, dist in PACKAGES.items():
        module = sys.modules.get(key)
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[key] = getattr(module, "__version__", None)
    return found


if __name__ == "__main__":  # this machine's provenance, as a result would record it
    import json

    print(json.dumps(provenance(), indent=1))
