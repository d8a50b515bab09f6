"""OpenBLAS vs MLX's bundled BLAS on Linux: matmul GFLOP/s, a pretraining step, and batched sampling.

    .venv/bin/python benchmarks/bench_blas.py [--json PATH]

Each setting runs in its own process (the BLAS is chosen when MLX loads), back to back.
"""

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time
from mlx_rl.engine import blas, speed
speed.enable()
import mlx.core as mx
import numpy as np
from mlx_rl.chapters.pretrain import corpus_batch, pretrain_loss
from mlx_rl.data.tasks import Addition
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.engine.sampling import generate
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.runs import PhaseTimer

a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a, b)
mx.eval(a @ b)
t = time.perf_counter()
for _ in range(5): mx.eval(a @ b)
gflops = 2 * 1024**3 / ((time.perf_counter() - t) / 5) / 1e9

model, tok, _ = new_tiny_model("tiny")
task, rng, timer = Addition(), np.random.default_rng(0), PhaseTimer()
opt = make_optimizer(1e-3, 100)
update = make_update(model, opt, pretrain_loss, timer=timer)
def batch():
    tokens, mask = corpus_batch(task, tok, rng, 64)
    return tokens, mask, mask.sum()
for _ in range(3): update(*batch())
t = time.perf_counter()
for _ in range(10): update(*batch())
step_s = (time.perf_counter() - t) / 10

prompts = task.train_rows(np.random.default_rng([0, 0]), 64, distinct=True)
generate(model, tok, prompts, 8)
t = time.perf_counter()
for _ in range(3): r = generate(model, tok, prompts, 8)
gen_s = (time.perf_counter() - t) / 3
print(json.dumps({"blas": blas.loaded_path or "bundled", "matmul_gflops": gflops,
                  "train_step_s_batch64": step_s, "generate_s_64x8": gen_s,
                  "generate_tok_per_s": float(r.mask.sum().item()) / gen_s}))
"""


def measure(openblas):
    env = {**os.environ, "MLX_RL_OPENBLAS": "auto" if openblas else "0"}
    p = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    slow, fast = measure(False), measure(True)
    ratios = {
        "matmul": fast["matmul_gflops"] / slow["matmul_gflops"],
        "train_step": slow["train_step_s_batch64"] / fast["train_step_s_batch64"],
        "generate": slow["generate_s_64x8"] / fast["generate_s_64x8"],
    }
    for name, r in (("bundled BLAS", slow), ("OpenBLAS", fast)):
        print(f"{name:13s} matmul {r['matmul_gflops']:7.1f} GFLOP/s   train step (64 rows) {r['train_step_s_batch64'] * 1000:7.1f} ms"
              f"   generate 64x8 {r['generate_s_64x8'] * 1000:7.1f} ms")
    print("speed-up: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundled": slow, "openblas": fast, "speedup": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
