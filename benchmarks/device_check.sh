#!/usr/bin/env bash
# The device check on a CUDA machine with torch, triton and transformers (no vLLM needed, no
# network): the Triton kernels against their references, the SJD++ step's time at real
# vocabularies and the GPU's pass-cost ratio (benchmarks/device_check.py says what and how).
# Under 8 minutes on an H100/H200; without CUDA a dry run at toy sizes that lists what it skipped.
#     bash benchmarks/device_check.sh [--quick] [--out benchmarks/results/device_check]
# Exit status: non-zero if a kernel disagrees with its reference or the step syncs the host.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
# The plugin's kernels import without vLLM (setup.py maps vllm_sjdpp.kernels to kernels/).
"$PYTHON" -c "import vllm_sjdpp.kernels" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
# The kernel tests too where pytest is installed (on CUDA they run on the GPU, every case).
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_step_backends.py tests/test_position_noise.py \
        tests/test_gumbel_coupling.py tests/test_fresh_tokens.py
fi
exec "$PYTHON" benchmarks/device_check.py "$@"
