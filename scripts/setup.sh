#!/usr/bin/env bash
# Install mlx-rl into .venv (and, on Debian/Ubuntu, OpenBLAS: a pretraining step ran 7.4x faster with it, docs/runs/openblas).
# Used by run_all.sh, test.sh and CI. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(uname -s)" == "Linux" ]] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [[ "$(id -u)" != "0" ]] && SUDO="sudo -n"
        echo "installing OpenBLAS (libopenblas0-pthread) ..."
        ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null) \
            || echo "could not install OpenBLAS; mlx-rl will work, only slower (see README)"
    fi
fi

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    echo "creating .venv ..."
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "installing mlx-rl and its dependencies (mlx, mlx-lm, numpy, matplotlib, click) into .venv; about a minute the first time ..."
log=$(mktemp)
# pip's own lines, shortened to one per package, so a slow download shows progress instead of silence
if ! .venv/bin/python -m pip install -e ".[test]" 2>&1 | tee "$log" | grep --line-buffered -E "^(Collecting|Successfully)" \
        | sed -u 's/^/  /' | cut -c1-100; then
    :
fi
if ! grep -qE "^Successfully installed|already satisfied" "$log" || grep -qE "^ERROR" "$log"; then
    cat "$log"; echo "pip install failed"; exit 1
fi
rm -f "$log"
.venv/bin/python -c "from mlx_rl.engine import blas, speed; speed.enable(); print('mlx-rl installed; BLAS:', blas.loaded_path or 'MLX default (slow: see README)')"
