"""Patch of vllm/utils/cpu_triton_utils.py, on the CPU platform only: the CPU build's
replacement of the rejection sampler's expand kernel writes into a temporary int64 copy (vLLM
issue 55005): the expanded temperature / top-k / top-p stay uninitialised, and sampling at
temperature > 0 with any speculative method follows garbage."""

from __future__ import annotations

import numpy as np


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """`expand_kernel` of vllm/v1/sample/rejection_sampler.py, writing into `output` in its own
    dtype (arguments arrive positionally, in the Triton kernel's order).  On the host, in NumPy:
    the tensors are the CPU platform's, a few per request, and the same work in PyTorch's
    operators cost 20 us a call (twice a step: temperature and top-k), in NumPy's 8 (one request's
    9 rows, timed in a loop on the 2-core EPYC of benchmarks/README.md, 2026-12-07)."""
    values = input_val.numpy()
    values = np.where(values == replace_from, replace_to, values)
    cu = cu_num_tokens.numpy()
    counts = cu.copy()
    counts[1:] -= cu[:-1]
    output.numpy()[: int(cu[-1]) if cu.size else 0] = np.repeat(values, counts)


def apply() -> None:
    # vllm/utils/cpu_triton_utils.py: _expand_kernel_impl, which CpuPlatform registers for
    # rejection_sampler.expand_kernel when Triton has no CPU backend; workers load plugins
    # before registering, and a process that registered already is rebound.  A vLLM without
    # it (fixed upstream, or moved) keeps its own.
    from .internals import available

    if not available("vllm.utils.cpu_triton_utils", "_expand_kernel_impl"):
        return
    import vllm.utils.cpu_triton_utils as cpu_triton_utils

    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    from vllm.v1.sample import rejection_sampler

    override = getattr(rejection_sampler, "expand_kernel", None)
    if hasattr(override, "_impl"):
        override._impl = expand_kernel_impl
