"""mlx-rl's blocked causal attention (engine/attention.py) against MLX's scaled_dot_product_attention, in turns.

    .venv/bin/python benchmarks/bench_attention.py [--rounds 3] [--json PATH]

SmolLM2-135M's attention shape (9 query heads, 3 key heads, head size 64) at the sizes a GRPO step at
8 prompts x 4, 128 + 256 tokens meets: the training pass of a micro-batch of 4 rows (the completion's 256
queries against 384 keys, causal, after the shared prompt), the same for all 32 rows at once, and one
decoding step of 32 rows against 384 cached keys. For each: milliseconds for the forward and for forward +
backward (gradients of q, k and v), the median of --rounds rounds that alternate the two implementations,
MLX's peak memory above the inputs, and the largest difference between the two outputs.
Linux CPU only (elsewhere mlx-rl leaves MLX's own attention in place).
"""

import argparse
import json
import statistics
import time

from mlx_rl.engine import speed

speed.enable()

import mlx.core as mx  # noqa: E402

from mlx_rl.engine import attention  # noqa: E402

CASES = {  # name: (rows, queries, keys, mask)
    "training pass, 4 rows": (4, 256, 384, "causal"),
    "training pass, 32 rows": (32, 256, 384, "causal"),
    "decoding step, 32 rows": (32, 1, 384, None),
}
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def timed(f, repeats):
    mx.eval(f())  # warm-up (and compilation of the fast softmax for this shape)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(f())
    return (time.perf_counter() - start) / repeats * 1000


def peak_mb(f):
    mx.eval(f())
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(f())
    return (mx.get_peak_memory() - base) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="calls timed per measurement")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    scale = HEAD_DIM**-0.5
    sides = {
        "mlx": lambda q, k, v, mask: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
        "mlx-rl": lambda q, k, v, mask: attention.attention(q, k, v, scale, mask),
    }
    results = {"mlx": mx.__version__, "rounds": args.rounds, "repeats": args.repeats, "cases": {}}
    for name, (B, T, S, mask) in CASES.items():
        q, k, v = mx.random.normal((B, HEADS, T, HEAD_DIM)), mx.random.normal((B, KV_HEADS, S, HEAD_DIM)), mx.random.normal((B, KV_HEADS, S, HEAD_DIM))
        weights = mx.random.normal(q.shape)
        mx.eval(q, k, v, weights)
        calls = {}
        for side, f in sides.items():
            grad = mx.grad(lambda q, k, v, f=f: (f(q, k, v, mask) * weights).sum(), argnums=(0, 1, 2))
            calls[side] = {"forward": lambda f=f: f(q, k, v, mask), "forward_backward": lambda g=grad: g(q, k, v)}
        times = {side: {part: [] for part in calls[side]} for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                for part, call in calls[side].items():
                    times[side][part].append(timed(call, args.repeats))
        case = {"rows": B, "queries": T, "keys": S, "mask": mask or "none",
                "max_abs_difference": mx.abs(calls["mlx"]["forward"]() - calls["mlx-rl"]["forward"]()).max().item()}
        for side in sides:
            case[side] = {f"{part}_ms": statistics.median(ts) for part, ts in times[side].items()}
            case[side].update({f"{part}_ms_all": ts for part, ts in times[side].items()})
            case[side]["forward_backward_peak_mb"] = peak_mb(calls[side]["forward_backward"])
        for part in ("forward", "forward_backward"):
            case[f"{part}_ratio"] = case["mlx-rl"][f"{part}_ms"] / case["mlx"][f"{part}_ms"]
        results["cases"][name] = case
        print(f"{name}: forward {case['mlx']['forward_ms']:.1f} -> {case['mlx-rl']['forward_ms']:.1f} ms, "
              f"forward + backward {case['mlx']['forward_backward_ms']:.1f} -> {case['mlx-rl']['forward_backward_ms']:.1f} ms "
              f"(MLX's -> mlx-rl's; peak {case['mlx']['forward_backward_peak_mb']:.0f} -> "
              f"{case['mlx-rl']['forward_backward_peak_mb']:.0f} MB; largest difference {case['max_abs_difference']:.1e})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
