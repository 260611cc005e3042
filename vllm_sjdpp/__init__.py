"""vllm-sjdpp: exact Speculative Jacobi Decoding++ for image AR models in vLLM."""

from .config import SJDPPConfig

__all__ = ["SJDPPConfig"]
