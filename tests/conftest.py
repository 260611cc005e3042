import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable is
# read when a kernel is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
