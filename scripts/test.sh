#!/usr/bin/env bash
# One command: install explab and run the whole test suite (CPU).
#   1. the main suite in .venv (torch 2.14, transformers 5.20, ray);
#   2. the vLLM backend tests in .venv-vllm (vLLM's CPU build pins torch 2.13.0+cpu and
#      transformers < 5.20, so it gets its own environment).
# "No tests collected" (pytest exit 5) is a failure, like any other non-zero exit.
# EXPLAB_SKIP_VLLM=1 skips step 2 (e.g. on a laptop without the disk space).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EXPLAB_VENV:-$REPO/.venv}"
VLLM_VENV="${EXPLAB_VLLM_VENV:-$REPO/.venv-vllm}"
cd "$REPO"

bash scripts/install.sh
"$VENV/bin/ruff" check platform jobs tests benchmarks
"$VENV/bin/python" -m pytest -q -m "not vllm" --durations=25 tests "$@"  # the 25 slowest: where the suite's time goes

if [ "${EXPLAB_SKIP_VLLM:-0}" != "1" ]; then
    bash .ci/vllm-env.sh "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pytest -q -m vllm -p no:cacheprovider tests/test_vllm_backend.py
fi
