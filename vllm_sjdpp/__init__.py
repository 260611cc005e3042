"""vllm-sjdpp: exact Speculative Jacobi Decoding++ for image AR models in vLLM.

Layers, from the bottom (each imports only those below it; tests/test_layers.py checks):
`kernels` (the step's math) and `config` (SJD++ options); `families` (what a model folder says,
with the bundled digit model's formats in `digits`); `guidance` (classifier-free guidance and the
guided model classes); `engine` (the SJD++ step inside vLLM's model runner); `serving` (the
images endpoint, the server helper, the client); the digit model's training, quality and demo
scripts (`digits`); and on top `patches` (every change to vLLM, with the versions it targets),
`plugin` (vLLM's entry point) and `cpu_alias`.
"""

from .config import SJDPPConfig

__all__ = ["SJDPPConfig"]
