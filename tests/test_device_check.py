"""benchmarks/device_check.py, dry-run on CPU (what CI can run of it): every part runs at toy
sizes, the kernels in Triton's interpreter agree with their references, the JSON says what was
skipped, and a kernel made wrong on purpose fails the check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run; on CUDA run the check itself")


def run_check(tmp_path) -> tuple[int, dict]:
    import device_check

    code = device_check.main(["--out", str(tmp_path / "check")])
    return code, json.loads((tmp_path / "check.json").read_text())


def test_the_dry_run_runs_every_part_and_says_what_it_skipped(tmp_path):
    code, result = run_check(tmp_path)
    assert code == 0 and not result["failed"]
    kernels = {(r["kernel"], r.get("probs"), r.get("proposals")) for r in result["kernels"]}
    assert {("noise", None, None), ("row_pass", "fp32", "fp32"), ("row_pass", "bf16", "bf16"),
            ("row_pass", "fp16", "fp16"), ("row_pass", "fp32", "bf16"), ("row_pass", "fp32", "fp16")} <= kernels
    assert result["step"] and result["pass_cost"] and (tmp_path / "check.png").exists()
    assert {r["x_one_query"] for r in result["pass_cost"] if r["queries"] == 1} == {1.0}
    assert len(result["skipped"]) == 3 and any("sync-debug" in s for s in result["skipped"])


@pytest.mark.parametrize("broken", ["row pass", "noise"])
def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch, broken):
    from vllm_sjdpp.kernels import noise_triton, row_pass_triton

    if broken == "row pass":
        real = row_pass_triton.row_pass_triton
        monkeypatch.setattr(row_pass_triton, "row_pass_triton", lambda *a, **k: real(*a, **k).flip(0))
    else:
        real = noise_triton.keyed_exponentials_triton
        monkeypatch.setattr(noise_triton, "keyed_exponentials_triton", lambda *a: real(*a) * (1 + 2**-20))
    code, result = run_check(tmp_path)
    assert code == 1 and result["failed"]
