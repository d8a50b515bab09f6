#!/usr/bin/env bash
# The main job on its defaults: install, pretrain a tiny model on addition, then improve it with
# GRPO, PPO and DPO. Each command writes a run directory under runs/ (plots in runs/*/plots,
# an HTML page with `mlx-rl report RUN`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MLXRL=.venv/bin/mlx-rl
stamp=$(date +%Y%m%d-%H%M%S)
$MLXRL pretrain --task addition --out "runs/pretrain-$stamp"
for chapter in grpo ppo dpo; do
    $MLXRL "$chapter" --task addition --model "runs/pretrain-$stamp/checkpoint" --out "runs/$chapter-$stamp"
done
echo "done: runs/*-$stamp  (plots in each run's plots/ folder; mlx-rl report runs/grpo-$stamp for a page)"
