#!/usr/bin/env bash
# One command: install explab and run the demo (a real job on an embedded local Ray cluster).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EXPLAB_VENV:-$REPO/.venv}"
bash "$REPO/scripts/install.sh"
cd "$REPO"
exec "$VENV/bin/explab" demo "$@"
