#!/usr/bin/env bash
# Install, then run the fast test suite (learning runs are marked slow: add `-m slow` to run those).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# tests/test_report.py renders `mlx-rl report`'s page in headless Chromium: a test-only tool, installed
# here (not by setup.sh) when missing. Without it that test fails, saying so; it is never skipped.
if [[ "$(uname -s)" == "Linux" ]] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [[ "$(id -u)" != "0" ]] && SUDO="sudo -n"
        echo "installing chromium (for the report test) ..."
        ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
            || echo "could not install chromium; tests/test_report.py will fail"
    fi
fi

exec .venv/bin/python -m pytest -q "$@"
