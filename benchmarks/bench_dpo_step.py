"""Seconds per DPO step on the tiny model, at the settings the peers were measured at.

Qwen3-style model, hidden 128, 4 layers, 4 heads, character vocabulary (preset
"tiny", about 1M parameters), full fine-tune, AdamW; 8 addition pairs per step
("12+34=" -> the right sum vs a wrong one, in the task's units-first format),
beta 0.1, plain sigmoid DPO. The reference log-probs are computed once up front,
as `mlx-rl dpo` does, so a step is one policy forward + backward + optimizer
update. A step includes building the padded batch. Use --with-reference to
also run the reference forward inside every step (how a trainer without
precomputed reference log-probs works).

    python benchmarks/bench_dpo_step.py [--steps 200] [--json out.json]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_rl.engine import speed  # noqa: E402

speed.enable()  # OpenBLAS before MLX

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_rl.chapters import dpo  # noqa: E402
from mlx_rl.data.pairs import Pairs, pair_batch  # noqa: E402
from mlx_rl.data.tasks import get_task  # noqa: E402
from mlx_rl.engine.checkpoint import save_checkpoint  # noqa: E402
from mlx_rl.engine.models import count_parameters, new_tiny_model  # noqa: E402
from mlx_rl.engine.session import Reference  # noqa: E402
from mlx_rl.engine.update import make_optimizer, make_update  # noqa: E402
from mlx_rl.runs import PhaseTimer  # noqa: E402


def make_pairs(tokenizer, task, n, seed=0):
    rng = np.random.default_rng(seed)
    pairs = Pairs([], [], [])
    eos = tokenizer.eos_token_id
    for row in task.train_rows(np.random.default_rng([seed, 0]), n, distinct=True):
        prompt, right = row["prompt"], row["answer"]
        wrong = right
        while wrong == right:
            wrong = "".join(str(d) for d in rng.integers(10, size=len(right)))
        pairs.prompt_ids.append(tokenizer.encode(prompt))
        pairs.chosen_ids.append(tokenizer.encode(right, add_special_tokens=False) + [eos])
        pairs.rejected_ids.append(tokenizer.encode(wrong, add_special_tokens=False) + [eos])
    return pairs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rpo-alpha", type=float, default=0.0, help="NLL weight (the chapter's default run uses 1.0)")
    ap.add_argument("--with-reference", action="store_true", help="run the reference forward inside each step")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--save-model", default=None,
                    help="also save the benchmarked (random) model as an mlx-lm checkpoint here, for a peer to load")
    return ap.parse_args(argv)


def measure(args):
    """Time args.steps DPO steps after args.warmup untimed ones. Returns the figures as a dict."""
    model, tokenizer, config = new_tiny_model("tiny", seed=0)
    if args.save_model:
        save_checkpoint(args.save_model, model, tokenizer, config)
    task = get_task("addition")
    pairs = make_pairs(tokenizer, task, 512)
    dpo.compute_reference(model, pairs)
    reference = Reference(model) if args.with_reference else None
    optimizer = make_optimizer(1e-4, 0)
    loss_fn = dpo.make_loss_fn(args.beta, rpo_alpha=args.rpo_alpha)
    timer = PhaseTimer()
    update = make_update(model, optimizer, loss_fn, 1.0, compile=not args.no_compile, timer=timer)  # what `mlx-rl dpo` uses
    batches = [dpo.batch_order(len(pairs), args.batch_size, [0, e]) for e in range(4)]
    batches = [b for epoch in batches for b in epoch]

    def step(i):
        idx = batches[i % len(batches)]
        tokens, mask, ref = pair_batch(pairs, idx)
        if reference is not None:
            with timer("reference"):
                ref = (reference.logprobs(tokens) * mask).sum(axis=1)
                mx.eval(ref)
        n_pairs = mx.array(float(len(idx)))
        n_chosen = mx.array(float(sum(len(pairs.chosen_ids[j]) for j in idx)))
        return update(tokens, mask, ref, n_pairs, n_chosen)

    for i in range(args.warmup):
        step(i)
    timer.pop()
    times = []
    cpu_start = time.process_time()
    for i in range(args.steps):
        start = time.perf_counter()
        loss, _, _ = step(i)
        times.append(time.perf_counter() - start)
    cpu_s = (time.process_time() - cpu_start) / args.steps  # all threads' CPU seconds: a load-robust figure
    phases = {k: v / args.steps for k, v in timer.pop().items()}
    result = {
        "benchmark": "dpo_step",
        "parameters": count_parameters(model),
        "batch_pairs": args.batch_size,
        "beta": args.beta,
        "rpo_alpha": args.rpo_alpha,
        "reference_in_step": args.with_reference,
        "steps": args.steps,
        "step_s_mean": float(np.mean(times)),
        "step_s_median": float(np.median(times)),
        "cpu_s_per_step": cpu_s,
        "phases_s": phases,
        "final_loss": loss.item(),
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    return result


def main():
    args = parse_args()
    result = measure(args)
    cpu_s, phases = result["cpu_s_per_step"], result["phases_s"]
    print(f"DPO step, {result['parameters'] / 1e6:.2f}M parameters, {args.batch_size} pairs: "
          f"mean {result['step_s_mean'] * 1000:.1f} ms, median {result['step_s_median'] * 1000:.1f} ms, "
          f"CPU time {cpu_s * 1000:.1f} ms/step "
          f"(load average {result['load_average_1m']:.1f} on {result['cpus']} CPUs)")
    print("  " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in phases.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
