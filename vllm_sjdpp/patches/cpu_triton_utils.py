"""Patch of vllm/utils/cpu_triton_utils.py, on the CPU platform only: the CPU build's
replacement of the rejection sampler's expand kernel writes into a temporary int64 copy (vLLM
issue 55005): the expanded temperature / top-k / top-p stay uninitialised, and sampling at
temperature > 0 with any speculative method follows garbage."""

from __future__ import annotations

import torch


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """`expand_kernel` of vllm/v1/sample/rejection_sampler.py in PyTorch, writing into `output`
    in its own dtype (arguments arrive positionally, in the Triton kernel's order)."""
    values = torch.where(input_val == replace_from, replace_to, input_val).to(output.dtype)
    batch = values.shape[0]
    if output.shape[0] == batch and torch.equal(cu_num_tokens, torch.arange(1, batch + 1, dtype=cu_num_tokens.dtype)):
        output.copy_(values)  # one token per request (steps without drafts): a third of the time
        return
    cu = cu_num_tokens.to(torch.long)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(values, counts, output_size=n)


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
