"""The CUDA kernels compile without a GPU (kernels/compile_check.py), and that check can fail.

Compiling needs real `JITFunction`s: conftest.py sets TRITON_INTERPRET=1 on machines without
CUDA, under which `@triton.jit` gives interpreter objects, so every compile runs in a
subprocess with that variable removed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from vllm_sjdpp.kernels import compile_check
from vllm_sjdpp.kernels.compile_check import DEVICE_FUNCTIONS, KERNELS, TARGETS

KERNELS_DIR = Path(compile_check.__file__).parent


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_every_kernel_compiles_for_sm80_and_sm90():
    proc = _run(["-m", "vllm_sjdpp.kernels.compile_check"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")]
    for kernel in KERNELS:
        name = f"{kernel.module}.{kernel.name}"
        assert kernel.variants
        if kernel.launch is not None:
            assert any(line.startswith(f"ok   {name}: the {len(kernel.variants)} listed") for line in lines)
        for variant in kernel.variants:
            for _, arch, _ in TARGETS:
                where = f"ok   {name}[{variant.label}] sm_{arch} "
                assert sum(line.startswith(where) for line in lines) == 1, (where, proc.stdout)
    assert {arch for _, arch, _ in TARGETS} == {80, 90}
    assert lines[-1].startswith("passed: ")


BROKEN = '''
import sys

import triton
import triton.language as tl

from vllm_sjdpp.kernels.compile_check import Variant, run


@triton.jit
def _xor_in_place(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(x_ptr + offsets, x ^ x, mask=offsets < n)  # bitwise xor: a type error on floats


def variant(dtype):
    return Variant(dtype, {"x_ptr": f"*{dtype}", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128}, ("x_ptr",))


sys.exit(run([("_xor_in_place", _xor_in_place, variant(dt)) for dt in ("i32", "fp32")]))
'''


def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    """The same kernel compiles on int32 and fails on float32: the check compiles the listed
    signature for real and reports the error, for each target."""
    (tmp_path / "broken_kernel.py").write_text(BROKEN)
    proc = _run(["broken_kernel.py"], cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == len(TARGETS), out + proc.stderr  # run() returns the failure count
    for _, arch, _ in TARGETS:
        assert f"ok   _xor_in_place[i32] sm_{arch} " in out, out
        assert f"FAIL _xor_in_place[fp32] sm_{arch}: CompilationError" in out, out
    assert "invalid operands of type triton.language.float32" in out, out


LAUNCH_DRIFT = '''
import dataclasses

from vllm_sjdpp.kernels import compile_check
from vllm_sjdpp.kernels import row_pass_triton

kernel = compile_check.KERNELS[0]
assert kernel.name == "_row_pass_kernel"
fn = row_pass_triton._row_pass_kernel
variant = kernel.variants[0]
assert compile_check.launch_mismatch(kernel, fn, variant) is None
for drifted in (
    dataclasses.replace(variant, signature={**variant.signature, "draw_ptr": "*i1"}),
    dataclasses.replace(variant, constexprs={"BLOCK_SIZE": 1024}),
    dataclasses.replace(variant, divisible_by_16=variant.divisible_by_16[1:]),
):
    print(compile_check.launch_mismatch(kernel, fn, drifted))
'''


def test_a_signature_that_drifts_from_the_launch_site_is_reported(tmp_path):
    (tmp_path / "launch_drift.py").write_text(LAUNCH_DRIFT)
    proc = _run(["launch_drift.py"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "signature[draw_ptr]: listed *i1, launched *i8",
        "constexprs[BLOCK_SIZE]: listed 1024, launched 4096",
        "divisible_by_16[target_probs_ptr]: listed None, launched True",
    ]


def test_every_jit_function_in_kernels_is_listed():
    found = compile_check.jit_functions()
    assert set(found) == {f"{k.module}.{k.name}" for k in KERNELS} | set(DEVICE_FUNCTIONS)
    assert compile_check.coverage_errors() == []


def test_an_unlisted_kernel_fails_the_check(tmp_path):
    for path in KERNELS_DIR.glob("*.py"):
        shutil.copy(path, tmp_path)
    (tmp_path / "new_kernel.py").write_text(textwrap.dedent('''
        import triton
        from triton import jit


        @triton.jit(do_not_specialize=["n"])
        def _new_kernel(x_ptr, n):
            pass


        @jit
        def _new_helper(x):
            return x
    '''))
    errors = compile_check.coverage_errors(tmp_path)
    assert len(errors) == 2, errors
    assert errors[0].startswith("new_kernel._new_helper is a @triton.jit function in neither KERNELS")
    assert errors[1].startswith("new_kernel._new_kernel is a @triton.jit function in neither KERNELS")


def test_a_stale_list_fails_the_check(monkeypatch):
    """A helper is covered only through a kernel that calls it; a listed kernel must exist."""
    helper = "row_pass_triton._race_block"
    monkeypatch.setattr(compile_check, "DEVICE_FUNCTIONS", {**DEVICE_FUNCTIONS, helper: helper})
    assert compile_check.coverage_errors() == [
        "row_pass_triton._race_block is not called by row_pass_triton._race_block, "
        "so compiling row_pass_triton._race_block does not compile it"
    ]
    monkeypatch.setattr(compile_check, "KERNELS", tuple(dataclasses.replace(k, name="_gone") for k in KERNELS))
    errors = " ".join(compile_check.coverage_errors())
    assert "row_pass_triton._gone is listed in vllm_sjdpp.kernels.compile_check" in errors
    assert "row_pass_triton._row_pass_kernel is a @triton.jit function in neither" in errors
