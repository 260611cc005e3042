"""The SJD++ step: verification, residual resampling, Jacobi redraft and fresh tokens.

`sjdpp_step` is the entry point; the row pass runs on PyTorch (CPU) or Triton (CUDA).
"""

from .fresh import INIT_CODES, FreshTokens
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
    "sjdpp_step",
]
