#!/usr/bin/env bash
# Install, then run the fast test suite (learning runs are marked slow: add `-m slow` to run those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
