#!/usr/bin/env bash
# Install, then run the fast test suite, then the slow one (learning runs past the plateau, SIGKILL-and-resume
# fault injection, llama.cpp agreement where its peer is installed), printing each part's time. This is what CI
# runs (.ci/run). `bash scripts/test.sh --fast` runs the fast suite alone; `--acceptance` adds the chapters'
# default runs end to end (GRPO, PPO and DPO from the pretraining plateau, slippery Ice Maze's learners),
# which take longer than CI's half hour allows; other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
echo "== setup: $((SECONDS - start)) s"

# tests/test_report.py renders `mlx-rl report`'s page in headless Chromium: a test-only tool, installed
# here (not by setup.sh) when missing. Where it can't be installed, that test fails saying so in one line.
if [[ "$(uname -s)" == "Linux" ]] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [[ "$(id -u)" != "0" ]] && SUDO="sudo -n"
        echo "installing chromium (for the report test) ..."
        ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null) \
            || echo "could not install chromium (no root, and sudo -n asks for a password); tests/test_report.py will fail, saying so"
    fi
fi

FAST_ONLY=0
ACCEPTANCE=0
if [[ "${1:-}" == "--fast" ]]; then FAST_ONLY=1; shift; fi
if [[ "${1:-}" == "--acceptance" ]]; then ACCEPTANCE=1; shift; fi
status=0
part() {  # part NAME PYTEST-ARGS...: run one part, print its time, remember a failure
    local name=$1 t=$SECONDS
    shift
    echo "== $name"
    .venv/bin/python -m pytest -q "$@" || status=1
    echo "== $name: $((SECONDS - t)) s"
}
part "fast suite" "$@"
if [[ $FAST_ONLY == 0 ]]; then
    part "slow suite" -m slow --durations=20 "$@"
fi
if [[ $ACCEPTANCE == 1 ]]; then  # the chapters' default runs end to end: longer than CI's half hour allows
    part "acceptance suite" -m acceptance --durations=20 "$@"
fi
echo "== total: $((SECONDS - start)) s"
exit $status
