"""`vllm_sjdpp.provenance`: what every benchmark's JSON records about its run (command, commit,
machine, libraries), and that every benchmark writing JSON records it."""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_sjdpp.provenance as prov

ROOT = Path(__file__).parent.parent
BENCHMARKS = ROOT / "benchmarks"
# What writes JSON results besides benchmarks/: the user's bench and the digit model's soak.
PACKAGE_WRITERS = [ROOT / "vllm_sjdpp/bench.py", ROOT / "vllm_sjdpp/digits/soak.py"]

KEYS = {"command", "commit", "cpu", "cpu_flags", "cpus", "gpu", "date", "versions"}

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R45 48-Core Processor
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni vaes
processor\t: 1
model name\t: AMD EPYC 9R45 48-Core Processor
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni vaes
"""
AVX2_ONLY = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu sse sse2 avx avx2 fma
"""
NEOVERSE = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp bf16 i8mm sve sve2
CPU implementer\t: 0x41
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           "-c", "commit.gpgsign=false", *args], capture_output=True, text=True, check=True).stdout.strip()


def test_every_key(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    p = prov.provenance(cpuinfo=EPYC)
    assert set(p) == KEYS
    assert set(p["versions"]) == {"vllm", "torch", "transformers", "vllm_sjdpp"}
    assert p["versions"]["torch"] and p["versions"]["vllm_sjdpp"]
    assert p["cpu"] == "AMD EPYC 9R45 48-Core Processor" and p["cpus"] >= 1
    assert p["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", p["commit"])
    assert datetime.datetime.fromisoformat(p["date"].replace("Z", "+00:00")).tzinfo is not None
    assert p["gpu"] is None or isinstance(p["gpu"], str)
    assert p["command"] == prov.command()  # this process's command line
    assert "pytest" in p["command"]


def test_the_command_as_run(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    argv = [".venv/bin/python", "benchmarks/bench_auto.py", "--rounds", "5", "--out", "a b"]
    assert prov.provenance(argv)["command"] == (
        "VLLM_CPU_OMP_THREADS_BIND='0|1' .venv/bin/python benchmarks/bench_auto.py --rounds 5 --out 'a b'")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    assert prov.command(["python", "-m", "vllm_sjdpp.digits.soak"]) == "python -m vllm_sjdpp.digits.soak"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_of_a_repository_and_dirty_when_a_tracked_file_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_SJDPP_COMMIT", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git(repo, "add", "a.txt", "benchmarks")
    git(repo, "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD")
    assert prov.provenance(repo=repo)["commit"] == head
    (repo / "untracked.txt").write_text("not part of the commit\n")
    assert prov.provenance(repo=repo)["commit"] == head  # untracked files do not count
    (repo / "benchmarks" / "results" / "r.json").write_text('{"an earlier run": 1}\n')
    assert prov.provenance(repo=repo)["commit"] == head  # nor results written by earlier runs
    (repo / "a.txt").write_text("two\n")
    assert prov.provenance(repo=repo)["commit"] == head + "+dirty"
    git(repo, "commit", "-q", "-am", "second")
    assert prov.provenance(repo=repo)["commit"] == git(repo, "rev-parse", "HEAD") != head


def test_without_git_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_SJDPP_COMMIT", raising=False)
    assert prov.commit(tmp_path) == "unknown"
    monkeypatch.setenv("VLLM_SJDPP_COMMIT", "abc123")  # a copy of the tree without .git
    assert prov.commit(tmp_path) == "abc123"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    monkeypatch.delenv("VLLM_SJDPP_COMMIT")
    assert prov.commit(BENCHMARKS.parent) == "unknown"


@pytest.mark.parametrize("cpuinfo, model, flags", [
    (EPYC, "AMD EPYC 9R45 48-Core Processor", ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]),
    (AVX2_ONLY, "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", ["avx2"]),
    (NEOVERSE, None, ["bf16"]),  # aarch64: no model name in /proc/cpuinfo
])
def test_cpu_flags_from_cpuinfo(cpuinfo, model, flags, tmp_path):
    p = prov.provenance(cpuinfo=cpuinfo)
    assert p["cpu_flags"] == flags
    assert ("avx512_bf16" in p["cpu_flags"]) == ("avx512_bf16" in cpuinfo)
    if model:
        assert p["cpu"] == model
    else:
        assert p["cpu"]  # platform's fallback, never empty
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert prov.cpu(path)[1] == flags  # or read from a file


def test_a_missing_library_is_none(monkeypatch):
    real = prov.metadata.version

    def version(dist):
        if dist == "vllm":
            raise prov.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(prov.metadata, "version", version)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    versions = prov.provenance(cpuinfo=EPYC)["versions"]
    assert versions["vllm"] is None and versions["torch"]


def test_the_module_imports_nothing_from_vllm():
    """device_check.py imports it where vLLM is not installed.  Run without the venv's .pth files
    (`-S`: they import parts of vllm_sjdpp at start-up), the package from the checkout."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules); import vllm_sjdpp.provenance; "
            "added = sorted(set(sys.modules) - before); "
            "assert not [m for m in added if m.split('.')[0] in ('vllm', 'torch')], added")
    subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], check=True)


def test_every_benchmark_that_writes_json_records_provenance():
    writers = [p for p in sorted(BENCHMARKS.glob("*.py")) if re.search(r"\bjson\.dumps?\(", p.read_text())]
    assert len(writers) >= 10, writers  # the scan finds the benchmarks
    writers += PACKAGE_WRITERS
    missing = [p.name for p in writers if not re.search(r"\bprovenance\(", p.read_text())]  # a call, not a mention
    assert not missing, f"write a top-level 'provenance' (vllm_sjdpp.provenance) into these JSON results: {missing}"
