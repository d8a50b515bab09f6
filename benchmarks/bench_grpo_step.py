"""Speed of one GRPO step at the issue's fixed settings, split by phase.

A Qwen3-style model of hidden size 128, 4 layers, 4 heads, character vocabulary
(preset "tiny", about 1M parameters, randomly initialised), full fine-tune:
8 prompts x group 8, 8 new tokens, temperature 1, beta 0, one inner iteration.
Warm-up steps (compilation) are not timed; then N steps are, and the mean step
time is printed with its split by phase (generate, reward, forward_backward,
optimizer) so the next speed-up is obvious.

The reward is the task's (parsed per row, as in a real run) plus a random
tie-breaker below 0.001: a random model's groups would otherwise often all score
the same, and a step whose groups are all zero-signal takes no update (see
mlx_rl/grpo.py), which would time less than a full step. Every timed step is
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
import time

import mlx_rl  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx
import numpy as np

from mlx_rl import grpo, train
from mlx_rl.models import count_parameters, get_model, save_checkpoint
from mlx_rl.runs import PhaseTimer
from mlx_rl.tasks import get_task


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--inner-iters", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--save-model", default=None,
                        help="also save the benchmarked (random) model as an mlx-lm checkpoint here, for a peer to load")
    return parser.parse_args(argv)


def measure(args):
    """Time args.steps GRPO steps after args.warmup untimed ones. Returns the figures as a dict."""
    model, tokenizer, config = get_model(None, args.preset, seed=0)
    if args.save_model:
        save_checkpoint(args.save_model, model, tokenizer, config)
    task = get_task("addition")
    cfg = grpo.GRPOConfig(prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                          inner_iters=args.inner_iters, beta=args.beta, temperature=1.0, lr=1e-4)
    optimizer = train.make_optimizer(cfg.lr, cfg.steps)
    update = grpo.make_update(model, optimizer, cfg)
    reference = train.Reference(model) if cfg.beta > 0 else None
    rng = np.random.default_rng(0)
    mx.random.seed(0)

    def reward(prompt, completion):
        return task.reward(prompt, completion) + 1e-3 * rng.random()

    timer = PhaseTimer()
    step_s, phases = [], []
    for i in range(args.warmup + args.steps):
        prompts = grpo.sample_prompts(task, rng, cfg.prompts_per_step)
        start = time.perf_counter()
        row, _ = grpo.grpo_step(model, tokenizer, task, prompts, cfg, update, reference, timer, reward)
        seconds = time.perf_counter() - start
        times = timer.pop()
        if i < args.warmup:
            continue
        if row["grpo/skipped"]:
            raise SystemExit("a timed step took no update (all groups zero-signal): the figure would be too low")
        step_s.append(seconds)
        phases.append(times)

    names = sorted({k for p in phases for k in p})
    return {
        "settings": {**vars(args), "parameters": count_parameters(model)},
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
          f"{args.inner_iters} inner iteration(s), beta {args.beta}")
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
