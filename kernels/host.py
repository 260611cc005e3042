"""The host/device boundary of the step.

The step's scalar plan runs on the host, in NumPy; the rows over the vocabulary stay on the
device.  A plan of some 130 operations on O(rows) scalars costs about 4 us per operation in
PyTorch (dispatch; on CUDA a kernel launch each) and well under 1 us in NumPy.  The price is the
crossing, and on CUDA each device-to-host read is a blocking sync, so the step crosses at named
places only, each moving everything it needs in one copy:
- `fetch`: device tensors to the host (what the plan reads: the race winners, greedy argmaxes,
  and for the ratio test p and q at the drafts and the uniforms);
- `send`: host arrays to the device (the row pass's settings, the step's outputs).
A Gumbel-coupled step (the default) makes one fetch and one send (none on CPU where its rows
are raced by `keyed_race`, on the host, and none is greedy); a step with ratio-test rows
makes two fetches and three sends (the drafts go up for p and q at them, and the row pass after
the plan needs its settings and returns its draws).  `TRANSFERS` counts them (tests hold the step
to this).  On CPU both are views, no copies, and are counted the same.  `host_array` reads an
input that must already be on the host, and refuses a device tensor rather than sync silently.
The noise is the caller's: its copies (the position keys of `noise.py`) are outside this count,
and go through `upload`, as do the race sampler's rows, a windowless step's logits indices and,
through `PinnedStaging`, the guidance inputs.

No crossing blocks the host but where the step reads: `send` and `upload` copy from pinned
memory without blocking, and `fetch` copies into a pinned buffer it keeps (grown as needed) and
waits on an event, an explicit wait that `torch.cuda.set_sync_debug_mode("error")` allows (a
copy into pageable memory, `.cpu()`, is an implicit sync that it refuses;
benchmarks/device_check.py runs the step under it, with its noise made before).
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


_FETCH_BUFFERS: dict[torch.device, torch.Tensor] = {}  # per device: the pinned float64 landing buffer


def _fetch_buffer(device: torch.device, n: int) -> torch.Tensor:
    buffer = _FETCH_BUFFERS.get(device)
    if buffer is None or buffer.numel() < n:
        size = max(n, 2 * (0 if buffer is None else buffer.numel()), 4096)
        buffer = _FETCH_BUFFERS[device] = torch.empty(size, dtype=torch.float64, pin_memory=True)
    return buffer[:n]


def fetch(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Device tensors on the host, in one copy (a float64 carrier: exact for float32 values and
    for integers below 2^53, such as token ids), each with its dtype and shape back, in arrays of
    their own.  Views on CPU.  Dtypes: FETCHABLE (the step reads float32 probabilities and int64
    tokens)."""
    TRANSFERS["fetch"] += 1
    if any(t.dtype not in FETCHABLE for t in tensors):
        raise TypeError(f"fetch carries {FETCHABLE}, got {[t.dtype for t in tensors]}")
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach().numpy() for t in tensors]
    packed = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if packed.device.type == "cuda":
        landing = _fetch_buffer(packed.device, packed.numel())
        landing.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(packed.device))
        done.synchronize()
        flat = landing.numpy()
    else:
        flat = packed.cpu().numpy()
    out, start = [], 0
    for t in tensors:
        dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
        out.append(flat[start : start + t.numel()].astype(dtype).reshape(tuple(t.shape)))  # a copy: the buffer is reused
        start += t.numel()
    return out


def send(*arrays: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """Host integer or bool arrays on `device`, in one copy (an int64 carrier, from pinned memory
    without blocking the host), each with its shape back, as bool or int64.  On CPU no copy but
    the cast to int64.  Counted in TRANSFERS."""
    TRANSFERS["send"] += 1
    return upload(*arrays, device=device)


def upload(*arrays, device: torch.device | str) -> list[torch.Tensor]:
    """`send` for the caller's own inputs (noise keys, the runner's per-step indices), not
    counted in TRANSFERS."""
    device = torch.device(device)
    arrays = [np.asarray(a) for a in arrays]
    if any(a.dtype != bool and not np.issubdtype(a.dtype, np.integer) for a in arrays):
        raise TypeError(f"upload carries integers and bools, got {[a.dtype for a in arrays]}")
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


class PinnedStaging:
    """Per-step inputs written into device buffers allocated once (an engine's guidance inputs).

    On CUDA each buffer has a pinned host twin, reused: a write fills the twin and copies it
    without blocking the host, after waiting for the previous copy out of that twin (an event,
    long done by the next step: an explicit wait, which sync-debug mode allows; a copy from
    pageable memory blocks the host until the device has it).  On CPU a plain copy."""

    def __init__(self):
        # id(buffer): (the buffer, kept so that its id stays its own; its twin; the last copy's event)
        self._twins: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = {}

    def write(self, dst: torch.Tensor, values: np.ndarray) -> None:
        """dst[:len(values)] = values (a host array of dst's dtype)."""
        n = len(values)
        if dst.device.type != "cuda":
            dst[:n].copy_(torch.from_numpy(np.ascontiguousarray(values)))
            return
        _, twin, done = self._twins.get(id(dst), (None, None, None))
        if twin is None:
            twin = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=True)
        elif done is not None:
            done.synchronize()
        twin.numpy()[:n] = values
        dst[:n].copy_(twin[:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(dst.device))
        self._twins[id(dst)] = (dst, twin, done)
