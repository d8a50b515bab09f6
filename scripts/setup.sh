#!/usr/bin/env bash
# Install mlx-rl into .venv (and, on Debian/Ubuntu, OpenBLAS for a ~10x faster CPU backend).
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
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
log=$(mktemp)
if ! .venv/bin/python -m pip install -q -e ".[test]" >"$log" 2>&1; then
    cat "$log"; echo "pip install failed"; exit 1
fi
rm -f "$log"
.venv/bin/python -c "import mlx_rl, mlx_rl.blas as b; print('mlx-rl installed; BLAS:', b.loaded_path or 'MLX default')"
