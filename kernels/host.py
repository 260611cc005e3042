"""The host/device boundary of the step.

The step's scalar plan runs on the host, in NumPy; the rows over the vocabulary stay on the
device.  A plan of some 130 operations on O(rows) scalars costs about 4 us per operation in
PyTorch (dispatch; on CUDA a kernel launch each) and well under 1 us in NumPy.  The price is the
crossing, and on CUDA each device-to-host read is a blocking sync, so the step crosses at named
places only, each moving everything it needs in one copy:
- `fetch`: device tensors to the host (what the plan reads: the race winners, greedy argmaxes,
  and for the ratio test p and q at the drafts and the uniforms);
- `send`: host arrays to the device (the row pass's settings, the step's outputs).
A Gumbel-coupled step (the default) makes one fetch and one send; a step with ratio-test rows
makes two fetches and three sends (the drafts go up for p and q at them, and the row pass after
the plan needs its settings and returns its draws).  `TRANSFERS` counts them (tests hold the step
to this).  On CPU both are views, no copies, and are counted the same.  `host_array` reads an
input that must already be on the host, and refuses a device tensor rather than sync silently.
The noise is the caller's: its copies (the position keys of `noise.py`) are outside this count.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

# Below this many elements a TorchInductor-fused call costs more than fusion saves on CPU
# (0.72 against 0.89 ms for 17 x 281, equal at 544 x 281; benchmarks/bench_step.py).
INDUCTOR_MIN_ELEMENTS = 1 << 18

TRANSFERS: collections.Counter = collections.Counter()  # "fetch" and "send" calls so far


def host_array(x) -> np.ndarray:
    """An input the caller keeps on the host (NumPy, a list, or a CPU tensor) as a NumPy array."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"expected a host array, got a tensor on {x.device}: read it with `fetch`")
        return x.detach().numpy()
    return np.asarray(x)


FETCHABLE = (torch.float32, torch.float64, torch.int32, torch.int64, torch.bool)


def fetch(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors on the host, in one copy (a float64 carrier: exact for float32 values and
    for integers below 2^53, such as token ids), each with its dtype and shape back.  Views on
    CPU.  Dtypes: FETCHABLE (the step reads float32 probabilities and int64 tokens)."""
    TRANSFERS["fetch"] += 1
    if any(t.dtype not in FETCHABLE for t in tensors):
        raise TypeError(f"fetch carries {FETCHABLE}, got {[t.dtype for t in tensors]}")
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach().numpy() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu().numpy()
    out, start = [], 0
    for t in tensors:
        dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
        out.append(flat[start : start + t.numel()].astype(dtype).reshape(tuple(t.shape)))
        start += t.numel()
    return out


def send(*arrays: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """Host integer or bool arrays on `device`, in one copy (an int64 carrier, from pinned memory
    without blocking the host), each with its shape back, as bool or int64.  On CPU no copy but
    the cast to int64."""
    TRANSFERS["send"] += 1
    arrays = [np.asarray(a) for a in arrays]
    if any(a.dtype != bool and not np.issubdtype(a.dtype, np.integer) for a in arrays):
        raise TypeError(f"send carries integers and bools, got {[a.dtype for a in arrays]}")
    if device.type == "cpu":
        return [torch.from_numpy(np.ascontiguousarray(a if a.dtype == bool else a.astype(np.int64, copy=False)))
                for a in arrays]
    packed = torch.from_numpy(np.concatenate([a.astype(np.int64).ravel() for a in arrays]))
    packed = packed.pin_memory().to(device, non_blocking=True)
    out, start = [], 0
    for a in arrays:
        view = packed[start : start + a.size].view(a.shape)
        out.append(view != 0 if a.dtype == bool else view)
        start += a.size
    return out
