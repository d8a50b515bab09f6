"""Speed of one GRPO step at fixed settings, split by phase.

A Qwen3-style model of hidden size 128, 4 layers, 4 heads, character vocabulary
(preset "tiny", about 1M parameters, randomly initialised), full fine-tune:
8 prompts x group 8, 8 new tokens, temperature 1, no KL term, one epoch.
Warm-up steps (compilation) are not timed; then N steps are, and the mean step
time is printed with its split by phase (generate, reward, forward_backward,
optimizer) so the next speed-up is obvious.

The reward is the task's (parsed per row, as in a real run) plus a random
tie-breaker below 0.001: a random model's groups would otherwise often all score
the same, and a step whose groups are all zero-signal takes no update (see
mlx_rl/chapters/grpo.py), which would time less than a full step. Every timed step is
checked to have run its update.

This machine's speed drifts, so compare against a peer measured in the same run:
bench_vs_trl.py alternates this benchmark with TRL's GRPO step on the same
weights (--save-model writes them as a standard checkpoint for the peer).

    .venv/bin/python benchmarks/bench_grpo_step.py
    .venv/bin/python benchmarks/bench_grpo_step.py --steps 50 --json bench-grpo.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_rl.engine import speed  # noqa: E402

speed.enable()  # OpenBLAS before MLX

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_rl.chapters import grpo, grpo_family  # noqa: E402
from mlx_rl.data.rewards import load_rewards  # noqa: E402
from mlx_rl.engine.checkpoint import save_checkpoint  # noqa: E402
from mlx_rl.engine.models import count_parameters  # noqa: E402
from mlx_rl.engine.session import start  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--variant", default="grpo", choices=list(grpo_family.VARIANTS))
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--save-model", default=None,
                        help="also save the benchmarked (random) model as an mlx-lm checkpoint here, for a peer to load")
    return parser.parse_args(argv)


def timed_steps(session, cfg, variant, update, max_new_tokens, warmup, steps):
    """Run warmup untimed GRPO steps, then time `steps` more. Returns (seconds per step, phase timings per step,
    completion lengths); a timed step that made no update stops the benchmark, since its figure would be too low."""
    step_s, phases, lengths = [], [], []
    for i in range(warmup + steps):
        session.seed_step(i)
        start_s = time.perf_counter()
        row, _ = grpo.grpo_step(session, cfg, variant, update, max_new_tokens)
        seconds = time.perf_counter() - start_s
        times = session.timer.pop()
        if i < warmup:
            continue
        if row["grpo/skipped"]:
            raise SystemExit("a timed step took no update (all groups zero-signal): the figure would be too low")
        step_s.append(seconds)
        phases.append(times)
        lengths.append(row["policy/completion_len"])
    return step_s, phases, lengths


def measure(args):
    """Time args.steps GRPO steps after args.warmup untimed ones. Returns the figures as a dict."""
    out = tempfile.mkdtemp(prefix="bench-grpo-")
    cfg = grpo.GRPOConfig(prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                          epochs=args.epochs, kl_coef=args.kl_coef, temperature=1.0, lr=1e-4, variant=args.variant,
                          out=str(Path(out) / "run"), pass_k=())
    cfg.preset = args.preset
    session = start("grpo", cfg)  # a new tiny model (no --model), a run directory in a temporary folder
    if args.save_model:
        save_checkpoint(args.save_model, session.model, session.tokenizer, session.model_config)
    rng = np.random.default_rng(0)

    def tie_breaker(prompts, completions, **columns):
        return (1e-3 * rng.random(len(completions))).tolist()

    session.task.rewards = load_rewards(["exact", "chars", tie_breaker], [1.0, 0.1, 1.0])
    variant = grpo_family.make_variant(cfg, args.max_new_tokens)
    optimizer = session.optimizer(cfg.lr, cfg.steps)
    update = session.update_step(grpo.make_loss_fn(cfg, variant), optimizer)
    step_s, phases, _ = timed_steps(session, cfg, variant, update, args.max_new_tokens, args.warmup, args.steps)

    names = sorted({k for p in phases for k in p})
    return {
        "settings": {**vars(args), "parameters": count_parameters(session.model)},
        "step_s_mean": statistics.mean(step_s),
        "step_s_median": statistics.median(step_s),
        "step_s_min": min(step_s),
        "phase_s_mean": {k[len("time/"):-2]: statistics.mean(p.get(k, 0.0) for p in phases) for k in names},
        "load_average": os.getloadavg(),
    }


def main():
    args = parse_args()
    result = measure(args)
    mean, split = result["step_s_mean"], result["phase_s_mean"]
    print(f"GRPO step, {args.preset} model ({result['settings']['parameters'] / 1e6:.2f}M parameters), "
          f"{args.prompts} prompts x group {args.group_size}, {args.max_new_tokens} new tokens, "
          f"{args.epochs} epoch(s), KL coefficient {args.kl_coef}, variant {args.variant}")
    print(f"mean {mean * 1000:.1f} ms/step  (median {result['step_s_median'] * 1000:.1f}, "
          f"min {result['step_s_min'] * 1000:.1f}) over {args.steps} steps; load average {os.getloadavg()[0]:.2f}")
    for name, s in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<18} {s * 1000:7.1f} ms  {s / mean:6.1%}")
    other = mean - sum(split.values())
    print(f"  {'(between phases)':<18} {other * 1000:7.1f} ms  {other / mean:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
