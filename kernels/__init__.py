"""The SJD++ step: verification, residual resampling, Jacobi redraft and fresh tokens.

`sjdpp_step` is the entry point; the row pass runs on PyTorch (CPU) or Triton (CUDA).

Owns: the step's math, written once (the plan in NumPy on the host) and its row pass per
backend; `compile_check` compiles the CUDA kernels without a GPU.  May import: torch, numpy,
triton; nothing else of the plugin and not vLLM (a CUDA machine without vLLM runs its tests).
"""

from .fresh import INIT_CODES, FreshTokens
from .grid import StreamGrid
from .step import (
    PLACEHOLDER_TOKEN_ID,
    REUSE_CODES,
    StepBatch,
    StepNoise,
    StepOutput,
    sjdpp_step,
)

__all__ = [
    "INIT_CODES",
    "PLACEHOLDER_TOKEN_ID",
    "REUSE_CODES",
    "FreshTokens",
    "StepBatch",
    "StepNoise",
    "StepOutput",
    "StreamGrid",
    "sjdpp_step",
]
