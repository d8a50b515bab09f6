"""Data-parallel cost: one pretraining step and one GRPO step at 1 and 2 processes (`mlx.launch -n 2`, ring
backend over loopback), with the all-reduce share of the step and the bytes each rank sends per step.

    .venv/bin/python benchmarks/bench_distributed.py                 # both, 1 and 2 processes
    .venv/bin/python benchmarks/bench_distributed.py --steps 20 --json dist.json
    .venv/bin/python benchmarks/bench_distributed.py --oversubscribed   # and each rank with a thread per core

On one 2-core machine two processes share the same cores, so the 2-process step is not faster: this measures
what the all-reduce costs and how many bytes a step moves, which is what a run over two Macs needs on paper.
A ring all-reduce of S bytes sends 2 (W - 1) / W x S bytes per rank.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args):
    sys.path.insert(0, str(ROOT))
    from mlx_rl.engine import speed

    speed.enable()
    from mlx_rl.chapters import grpo, grpo_family, pretrain
    from mlx_rl.engine.session import start

    out = {}
    for chapter in ("pretrain", "grpo"):
        tmp = tempfile.mkdtemp(prefix=f"bench-dist-{chapter}-")
        if chapter == "pretrain":
            cfg = pretrain.PretrainConfig(out=f"{tmp}/run", batch_size=32, eval_prompts=10)
            session = start("pretrain", cfg, corpus=True)
            optimizer = session.optimizer(cfg.lr, cfg.steps)
            update = session.update_step(pretrain.pretrain_loss, optimizer)

            def step(i):
                tokens, mask = pretrain.corpus_batch(session.task, session.tokenizer, session.rng, cfg.batch_size)
                n = mask.sum()
                update(session.world.shard(tokens), session.world.shard(mask), n)
        else:
            cfg = grpo.GRPOConfig(out=f"{tmp}/run", prompts_per_step=8, group_size=8, epochs=1, kl_coef=0.0, pass_k=(),
                                  eval_prompts=10)
            session = start("grpo", cfg)
            N = session.task.max_new_tokens
            variant = grpo_family.make_variant(cfg, N)
            optimizer = session.optimizer(cfg.lr, cfg.steps)
            update = session.update_step(grpo.make_loss_fn(cfg, variant), optimizer)

            def step(i):
                grpo.grpo_step(session, cfg, variant, update, N)
        world = session.world
        times, phases = [], []
        for i in range(args.warmup + args.steps):
            session.seed_step(i)
            world.bytes_reduced = 0
            start_s = time.perf_counter()
            step(i)
            seconds = time.perf_counter() - start_s
            split = session.timer.pop()
            if i >= args.warmup:
                times.append(seconds)
                phases.append(split)
        n_params = sum(v.size for _, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(
            session.model.trainable_parameters()))
        W = world.size
        allreduce = statistics.mean(p.get("time/allreduce_s", 0.0) for p in phases)
        out[chapter] = {
            "processes": W,
            "step_s": statistics.mean(times),
            "allreduce_s": allreduce,
            "allreduce_share": allreduce / statistics.mean(times),
            "trainable_parameters": n_params,
            "payload_bytes_per_step": world.bytes_reduced,
            "sent_bytes_per_rank_per_step": int(2 * (W - 1) / W * world.bytes_reduced) if W > 1 else 0,
        }
    if session.world.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def run(processes, args, env=None):
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if processes > 1:
        cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(processes), "--"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the {processes}-process benchmark failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--oversubscribed", action="store_true",
                    help="also 2 processes with OPENBLAS_NUM_THREADS = the cores, each (what sharing the cores avoids)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = {1: run(1, args), 2: run(2, args)}
    if args.oversubscribed:  # every rank with a BLAS thread per core, as before mlx-rl split the cores between them
        results["2-oversubscribed"] = run(2, args, {"OPENBLAS_NUM_THREADS": str(os.cpu_count())})
    for chapter in ("pretrain", "grpo"):
        one, two = results[1][chapter], results[2][chapter]
        print(f"{chapter}: 1 process {one['step_s'] * 1000:.1f} ms/step; 2 processes {two['step_s'] * 1000:.1f} ms/step, "
              f"all-reduce {two['allreduce_s'] * 1000:.1f} ms ({two['allreduce_share']:.1%} of the step), "
              f"{two['payload_bytes_per_step'] / 1e6:.2f} MB reduced, {two['sent_bytes_per_rank_per_step'] / 1e6:.2f} MB "
              f"sent per rank per step ({two['trainable_parameters']:,} trainable parameters)")
    if args.oversubscribed:
        for chapter in ("pretrain", "grpo"):
            print(f"{chapter}: 2 processes with a BLAS thread per core each "
                  f"{results['2-oversubscribed'][chapter]['step_s'] * 1000:.1f} ms/step")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
