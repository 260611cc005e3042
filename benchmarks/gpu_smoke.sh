#!/usr/bin/env bash
# The first thing to run on a GPU machine with vLLM's CUDA build: set-up (installs `vllm` where
# CUDA is found), then benchmarks/gpu_smoke.py (its docstring says what it checks and prints).
# Exit status: non-zero if the set-up fails or any image's tokens differ between servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c 'import torch; print("CUDA:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
exec .venv/bin/python benchmarks/gpu_smoke.py "$@"
