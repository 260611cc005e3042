"""The step's scalar plan runs on the host, in NumPy; the rows over the vocabulary stay on the
device.  A plan of some 130 operations on O(rows) scalars costs about 4 us per operation in
PyTorch (dispatch; on CUDA a kernel launch each) and well under 1 us in NumPy; what it reads
from the device (p and q at the drafts, the noise's uniforms, greedy argmaxes) and what it sends
back (the rows to race, their settings, the committed tokens) are a few small copies, and on
CPU none at all: these conversions share memory there.
"""

from __future__ import annotations

import numpy as np
import torch

# Below this many elements a TorchInductor-fused call costs more than fusion saves on CPU
# (0.72 against 0.89 ms for 17 x 281, equal at 544 x 281; benchmarks/bench_step.py).
INDUCTOR_MIN_ELEMENTS = 1 << 18


def to_host(x) -> np.ndarray:
    """A tensor's values as a NumPy array (a view on CPU), anything else through np.asarray."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy() if x.device.type == "cpu" else x.detach().cpu().numpy()
    return np.asarray(x)


def to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if device.type == "cpu" else t.to(device)
