#!/usr/bin/env bash
# The SJD++ kernel on a CUDA machine that has torch, triton and pytest but no vLLM (and no
# network): correctness against the PyTorch paths, then the step benchmark. A few minutes.
#     bash benchmarks/cuda_check.sh        -> benchmarks/results/step_cuda.json
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pip install -q --no-deps --no-build-isolation -e .
python -m pytest -q tests/test_step_backends.py tests/test_position_noise.py tests/test_gumbel_coupling.py tests/test_fresh_tokens.py tests/test_config.py
python benchmarks/bench_step.py --out benchmarks/results/step_cuda.json
