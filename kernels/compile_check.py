"""Compiles every Triton kernel of the CUDA path for sm_80 and sm_90, without a GPU.

What it checks.  Each `@triton.jit` kernel that the CUDA backend launches goes through Triton's
whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) for GPUTarget("cuda", 80, 32)
(A100) and GPUTarget("cuda", 90, 32) (H100/H200), once per specialisation the launch sites
really produce: the dtypes of the pointers, which arguments Triton's launcher marks as
multiples of 16, and the constexpr values (`KERNELS` below lists them, with where they come
from).  The listed specialisations are checked against the launch site itself: the host
wrapper is called on CPU tensors with the kernel replaced by a recorder, and Triton's own
binder turns the recorded arguments into the signature a real launch would compile.  A type
error, an unsupported operation, a constexpr the code cannot take, a ptxas error, or a list
that no longer matches the launch fails the check; register use and spills are printed, one
line per kernel, specialisation and target.

Why.  CI has no GPU: there the tests run the kernels in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), which executes them in NumPy and never lowers them, so a kernel that
the interpreter runs but the compiler rejects would only fail on a GPU.  `triton.compile` with
an explicit `GPUTarget` needs no driver and no device, and the triton wheel ships ptxas; this
check is the one test of the CUDA path that can run on every commit.

Completeness.  `KERNELS` is the only list of kernels; `DEVICE_FUNCTIONS` names the `@triton.jit`
helpers, which are compiled inline into the kernel that calls them.  The check reads the
sources of this folder and fails if a `@triton.jit` function is in neither (or if a listed one
no longer exists), so a new kernel cannot be skipped silently.

How to run (about 7 s on 2 CPU cores for the 16 compiles; every run compiles afresh, in a
temporary Triton cache; needs only the triton wheel, torch and this package):

    python -m vllm_sjdpp.kernels.compile_check

It exits 0 when everything compiled, 1 otherwise.  Under TRITON_INTERPRET=1 `@triton.jit`
yields interpreter objects that cannot be compiled, so the check then reruns itself in a
subprocess without that variable.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

# This module's import name also when run with `python -m` (where __name__ is "__main__").
MODULE = __spec__.name if __spec__ is not None else __name__
TARGETS = (("cuda", 80, 32), ("cuda", 90, 32))  # (backend, compute capability, warp size)


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel, as Triton's launcher keys it.

    `signature` maps every parameter, in order, to a Triton type ("*fp32", "i32", ...) or
    "constexpr"; `constexprs` gives the constexpr values; `divisible_by_16` names the
    parameters the launcher marks as multiples of 16 (pointers aligned to 16 bytes, integers
    divisible by 16: `tt.divisibility`, which changes vectorisation).  `launch_inputs`, where
    the kernel has a `launch` probe, are the arguments of the probe that reproduces the launch."""

    label: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()
    launch_inputs: tuple = ()


@dataclass(frozen=True)
class Kernel:
    module: str  # a module of this package (kernels/)
    name: str
    variants: tuple[Variant, ...]
    # Calls the host wrapper with `variant.launch_inputs`, the kernel replaced by a recorder,
    # and returns the recorded launch (args, kwargs): the listed signature must be the one
    # Triton's launcher derives from them, so the list cannot drift from the launch site.
    launch: Callable[[Variant], tuple[tuple, dict]] | None = None


_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _row_pass_variant(probs: str, next_probs: str, vocab: int, block_size: int) -> Variant:
    """`row_pass_triton`'s launch of `_row_pass_kernel`: target and draft probabilities in the
    caller's dtype (the draft buffer falls back to the target one; both share a dtype in every
    caller), float32 exponentials (`StepNoise`), int64 index tensors (`host.send` of int64
    NumPy arrays; `tokens = zeros_like(rows)`), `draw` as int8, next proposals in `next_probs`'
    dtype, strides and vocabulary as int32 (all equal to the vocabulary size V for contiguous
    rows), BLOCK_SIZE = min(next_power_of_2(V), 4096).  Torch allocations are 16-byte aligned;
    the strides and V are multiples of 16 when V is."""
    signature = {
        "target_probs_ptr": f"*{probs}",
        "target_stride": "i32",
        "draft_probs_ptr": f"*{probs}",
        "draft_stride": "i32",
        "exponentials_ptr": "*fp32",
        "exponentials_stride": "i32",
        "rows_ptr": "*i64",
        "subtract_draft_row_ptr": "*i64",
        "subtract_onehot_ptr": "*i64",
        "draw_ptr": "*i8",
        "q_dest_ptr": "*i64",
        "next_probs_ptr": f"*{next_probs}",
        "next_stride": "i32",
        "tokens_ptr": "*i64",
        "vocab_size": "i32",
        "BLOCK_SIZE": "constexpr",
    }
    aligned = [k for k, v in signature.items() if v.startswith("*") or (v == "i32" and vocab % 16 == 0)]
    dtypes = probs if probs == next_probs else f"{probs}->{next_probs}"
    return Variant(
        f"{dtypes},V={vocab},BLOCK_SIZE={block_size}", signature, {"BLOCK_SIZE": block_size}, tuple(aligned),
        launch_inputs=(probs, next_probs, vocab),
    )


def _row_pass_launch(variant: Variant) -> tuple[tuple, dict]:
    """The launch `row_pass_triton` makes for inputs of the variant's dtypes and vocabulary,
    built as `sjdpp_step` builds them (CPU tensors: alignment and dtypes are what matter)."""
    import torch

    from . import row_pass_triton as module

    probs, next_probs, vocab = variant.launch_inputs
    n = 3
    p = torch.full((n, vocab), 1.0 / vocab, dtype=getattr(torch, _TORCH_DTYPES[probs]))
    index = torch.arange(n, dtype=torch.int64)
    return _recorded_launch(
        module, "_row_pass_kernel", module.row_pass_triton,
        target_probs=p,
        draft_probs=p.clone(),
        exponentials=torch.ones(n, vocab, dtype=torch.float32),
        rows=index,
        subtract_draft_row=index,
        subtract_onehot=torch.full((n,), -1, dtype=torch.int64),
        draw=torch.ones(n, dtype=torch.bool),
        q_dest=index,
        next_probs=torch.empty(n, vocab, dtype=getattr(torch, _TORCH_DTYPES[next_probs])),
    )


def _noise_variant(vocab: int, block_size: int) -> Variant:
    """`keyed_exponentials_triton`'s launch: the row keys as int64 (uint32 words carried in
    int64, from NumPy), float32 output, stride and vocabulary as int32."""
    signature = {
        "a_ptr": "*i64", "b_ptr": "*i64", "out_ptr": "*fp32", "out_stride": "i32", "vocab_size": "i32",
        "BLOCK_SIZE": "constexpr",
    }
    aligned = [k for k, v in signature.items() if v.startswith("*") or (v == "i32" and vocab % 16 == 0)]
    return Variant(
        f"V={vocab},BLOCK_SIZE={block_size}", signature, {"BLOCK_SIZE": block_size}, tuple(aligned),
        launch_inputs=(vocab,),
    )


def _noise_launch(variant: Variant) -> tuple[tuple, dict]:
    import numpy as np

    from . import noise_triton as module

    (vocab,) = variant.launch_inputs
    keys = np.arange(3, dtype=np.uint32)
    return _recorded_launch(
        module, "_keyed_exponentials_kernel", module.keyed_exponentials_triton,
        a=keys, b=keys, vocab_size=vocab, device="cpu",
    )


# Every kernel the CUDA path launches, with each specialisation its launch sites produce.
# The plugin (vllm_sjdpp/engine/sampler.py) steps on float32 softmax probabilities and keeps float32
# proposals; `sjdpp_step` accepts any float dtype for the probabilities and for
# `next_probs_out` (the tests run bfloat16).  Vocabularies: 102400, a multiple of 16 like
# Janus-Pro's 16384 codes (BLOCK_SIZE 4096, the cap) and 274 for the digits model (not one; BLOCK_SIZE 512).
KERNELS: tuple[Kernel, ...] = (
    Kernel(
        "row_pass_triton",
        "_row_pass_kernel",
        tuple(
            [_row_pass_variant(dt, dt, 102400, 4096) for dt in ("fp32", "bf16", "fp16")]
            + [_row_pass_variant(dt, dt, 274, 512) for dt in ("fp32", "bf16", "fp16")]
            + [_row_pass_variant("fp32", out, 102400, 4096) for out in ("bf16", "fp16")]
        ),
        launch=_row_pass_launch,
    ),
    Kernel(
        "noise_triton",
        "_keyed_exponentials_kernel",
        (_noise_variant(102400, 4096), _noise_variant(274, 512)),
        launch=_noise_launch,
    ),
)

# `@triton.jit` helpers (not launched on their own): "module.helper" -> "module.caller", the
# kernel or helper whose compilation inlines it.
DEVICE_FUNCTIONS: dict[str, str] = {
    "row_pass_triton._race_block": "row_pass_triton._row_pass_kernel",
    "noise_triton._mix": "noise_triton._keyed_exponentials_kernel",
}


# -- the launch sites -----------------------------------------------------------------------

class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _recorded_launch(module, kernel_name: str, wrapper, **inputs) -> tuple[tuple, dict]:
    kernel, recorder = getattr(module, kernel_name), _Recorder()
    setattr(module, kernel_name, recorder)
    try:
        wrapper(**inputs)
    finally:
        setattr(module, kernel_name, kernel)
    if len(recorder.calls) != 1:
        raise RuntimeError(f"{wrapper.__name__} launched {kernel_name} {len(recorder.calls)} times, expected once")
    return recorder.calls[0]


def launch_specialisation(fn, args: tuple, kwargs: dict) -> Variant:
    """The specialisation Triton's launcher (`JITFunction.run`) derives from these arguments,
    computed with its own binder for the CUDA backend, without a device."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*TARGETS[-1]))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialisation, _ = binder(*args, **kwargs)
    names = [p.name for p in fn.params]
    signature = {name: s[0] for name, s in zip(names, specialisation)}
    constexprs = {name: bound[name] for name, s in zip(names, specialisation) if s[0] == "constexpr"}
    aligned = tuple(name for name, s in zip(names, specialisation) if isinstance(s[1], str) and "D" in s[1])
    return Variant("launch", signature, constexprs, aligned)


def launch_mismatch(kernel: Kernel, fn, variant: Variant) -> str | None:
    """How the listed variant differs from the launch the host wrapper makes, or None."""
    launched = launch_specialisation(fn, *kernel.launch(variant))
    diffs = []
    for what, mine, theirs in (
        ("signature", variant.signature, launched.signature),
        ("constexprs", variant.constexprs, launched.constexprs),
        ("divisible_by_16", dict.fromkeys(variant.divisible_by_16, True),
         dict.fromkeys(launched.divisible_by_16, True)),
    ):
        for name in [n for n in fn.arg_names if mine.get(n) != theirs.get(n)]:
            diffs.append(f"{what}[{name}]: listed {mine.get(name)}, launched {theirs.get(name)}")
    return "; ".join(diffs) or None


# -- finding the @triton.jit functions in the sources ---------------------------------------

def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        return _dotted(node.func)
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_jit(decorator: ast.expr) -> bool:
    # @triton.jit, @triton.jit(...), @jit (from triton import jit), triton.runtime.jit.jit, ...
    name = _dotted(decorator)
    return name == "jit" or (name.startswith("triton.") and name.endswith(".jit"))


def jit_functions(folder: Path | None = None) -> dict[str, ast.FunctionDef]:
    """Every `@triton.jit` function in the folder's modules, as "module.function"."""
    folder = folder or Path(__file__).parent
    found = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(map(_is_jit, node.decorator_list)):
                found[f"{path.stem}.{node.name}"] = node
    return found


def coverage_errors(folder: Path | None = None) -> list[str]:
    """What keeps `KERNELS` and `DEVICE_FUNCTIONS` from matching the sources, if anything."""
    found = jit_functions(folder)
    listed = [f"{k.module}.{k.name}" for k in KERNELS]
    errors = []
    for name in sorted(set(found) - set(listed) - set(DEVICE_FUNCTIONS)):
        errors.append(
            f"{name} is a @triton.jit function in neither KERNELS nor DEVICE_FUNCTIONS of {MODULE}: "
            "add it with the signatures it is launched with (or, for a helper, the function calling it)"
        )
    for name in sorted((set(listed) | set(DEVICE_FUNCTIONS)) - set(found)):
        errors.append(f"{name} is listed in {MODULE} but is no @triton.jit function of {Path(__file__).parent}")
    for helper, caller in sorted(DEVICE_FUNCTIONS.items()):
        if caller not in found:
            errors.append(f"{helper}: its caller {caller} is no @triton.jit function")
            continue
        called = {_dotted(n.func) for n in ast.walk(found[caller]) if isinstance(n, ast.Call)}
        if helper.split(".")[-1] not in called:
            errors.append(f"{helper} is not called by {caller}, so compiling {caller} does not compile it")
    return errors


# -- compiling ------------------------------------------------------------------------------

def compile_variant(fn, variant: Variant, target: tuple[str, int, int]):
    """`triton.compile` of one specialisation for one target; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"{fn!r} is a {type(fn).__name__}, not a JITFunction: under TRITON_INTERPRET=1 "
            "@triton.jit gives interpreter objects; compile with TRITON_INTERPRET unset"
        )
    if list(variant.signature) != list(fn.arg_names):
        raise ValueError(f"signature {list(variant.signature)} does not match the parameters {fn.arg_names}")
    index = {name: i for i, name in enumerate(fn.arg_names)}
    # attrs, keyed as the launcher keys them: a path of parameter indices.
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in variant.divisible_by_16}
    source = ASTSource(fn, dict(variant.signature), dict(variant.constexprs), attrs)
    return triton.compile(source, target=GPUTarget(*target))


def _resource_usage(cubin: bytes) -> str:
    """Registers, spills (local memory) and shared memory, as cuobjdump (shipped with the
    triton wheel) reads them from the cubin."""
    try:
        from triton import knobs

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run(
                [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, timeout=60
            ).stdout
        fields = dict(kv.split(":", 1) for line in out.splitlines() if "REG:" in line for kv in line.split())
        return f"regs={fields['REG']} local={fields['LOCAL']} shared={fields['SHARED']}"
    except Exception:  # the usage is informative only
        return "regs=?"


def run(jobs: Iterable[tuple[str, Any, Variant]], targets=TARGETS, out: TextIO = sys.stdout) -> int:
    """Compiles each (display name, JITFunction, variant) for each target in a fresh Triton
    cache, printing one line each ("ok" or "FAIL", name[variant], target, resource usage, cubin
    size, time) and the error of each failure; returns the number of failures."""
    from triton import knobs

    failures = 0
    with tempfile.TemporaryDirectory(prefix="sjdpp-compile-check-") as cache, knobs.cache.scope():
        knobs.cache.dir = cache
        for name, fn, variant in jobs:
            for target in targets:
                where = f"{name}[{variant.label}] sm_{target[1]}"
                start = time.perf_counter()
                try:
                    compiled = compile_variant(fn, variant, target)
                except Exception as e:  # noqa: BLE001 -- every compile error is a failure
                    failures += 1
                    print(f"FAIL {where}: {type(e).__name__}", file=out)
                    detail = "".join(traceback.format_exception_only(type(e), e)).rstrip()
                    print("    " + detail.replace("\n", "\n    "), file=out)
                else:
                    cubin = compiled.asm["cubin"]
                    print(
                        f"ok   {where} {_resource_usage(cubin)} cubin={len(cubin)}B "
                        f"{time.perf_counter() - start:.1f}s",
                        file=out,
                    )
                out.flush()
    return failures


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m vllm_sjdpp.kernels.compile_check", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str] | None = None) -> int:
    parser().parse_args(argv)
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", MODULE], env=env).returncode
    failures = 0
    for error in coverage_errors():
        failures += 1
        print(f"FAIL coverage: {error}")
    jobs = []
    for kernel in KERNELS:
        name = f"{kernel.module}.{kernel.name}"
        fn = getattr(importlib.import_module(f"{__package__}.{kernel.module}"), kernel.name)
        jobs += [(name, fn, variant) for variant in kernel.variants]
        if kernel.launch is None:
            print(f"note {name}: no launch probe; signatures as listed")
            continue
        mismatches = 0
        for variant in kernel.variants:
            try:
                mismatch = launch_mismatch(kernel, fn, variant)
            except Exception as e:  # noqa: BLE001
                mismatch = f"the probe failed: {type(e).__name__}: {e}"
            if mismatch:
                mismatches += 1
                print(f"FAIL {name}[{variant.label}] launch: {mismatch}")
        if not mismatches:
            print(f"ok   {name}: the {len(kernel.variants)} listed specialisations are those its launch site makes")
        failures += mismatches
    failures += run(jobs)
    print(
        f"{'FAILED' if failures else 'passed'}: {len(jobs) * len(TARGETS)} compiles "
        f"({len(KERNELS)} kernel(s), {len(jobs)} specialisations; "
        f"{', '.join(f'sm_{t[1]}' for t in TARGETS)}); device functions compiled inline: "
        f"{', '.join(sorted(DEVICE_FUNCTIONS)) or 'none'}; {failures} failure(s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
