#!/usr/bin/env bash
# The main job on its defaults: install, pretrain a tiny model on addition, then improve it with
# GRPO, PPO and DPO. Each command writes a run directory under runs/ (plots in runs/*/plots).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MLXRL=.venv/bin/mlx-rl
stamp=$(date +%Y%m%d-%H%M%S)
$MLXRL pretrain --task addition --out "runs/$stamp-pretrain"
for chapter in grpo ppo dpo; do
    if $MLXRL --help | grep -q "^  $chapter "; then
        $MLXRL "$chapter" --task addition --model "runs/$stamp-pretrain/checkpoint" --out "runs/$stamp-$chapter"
    fi
done
echo "done: runs/$stamp-*  (plots in each run's plots/ folder)"
