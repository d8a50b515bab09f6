"""Rollout speed: mlx_rl.engine.sampling.generate against mlx-lm's own batch_generate.

Same model (a random tiny Qwen3, or --model), same prompts, same settings
(temperature 1, top-p 1, the same max new tokens), timed in the same process,
alternating the two so that load from other processes hits both alike.
Tokens/s = generated tokens (EOS included) / wall time of the whole call,
prompt pass included. batch_generate gets its best settings: the whole batch
in one prefill and one decoding batch.

Two prompt sets per batch size:
  distinct  every row has its own prompt (different lengths mixed in)
  group8    each prompt repeated 8 times, as GRPO samples a group

Measured on a 2-core Linux box (MLX CPU + OpenBLAS, random tiny model, 8 new tokens, medians):

    batch  prompts   ours ms  mlx-lm ms  ratio (tokens/s)
       16 distinct      38.7       60.8  1.60x
       16   group8      28.2       49.2  1.73x
       64 distinct     109.2      207.4  1.89x
       64   group8      55.4      188.0  3.47x

    python benchmarks/bench_rollout.py                 # batch sizes 16 and 64
    python benchmarks/bench_rollout.py --batch-sizes 8,64 --max-new-tokens 32
"""

import argparse
import statistics
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_rl.engine import speed  # noqa: E402

speed.enable()  # OpenBLAS before MLX

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import batch_generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from mlx_rl.engine.models import get_model  # noqa: E402
from mlx_rl.engine.sampling import encode_prompts, generate  # noqa: E402


def make_prompts(n, kind):
    if kind == "group8":
        base = [f"{(7 * i) % 100:02d}+{(13 * i + 5) % 100:02d}=" for i in range(max(1, n // 8))]
        return [p for p in base for _ in range(8)][:n]
    # distinct, mixed lengths: "07+45=" and "sort:5391=" style prompts
    return [f"{i % 100:02d}+{(i * 37) % 100:02d}=" if i % 2 else f"sort:{i * 7919 % 10**(3 + i % 3)}=" for i in range(n)]


def time_ours(model, tokenizer, prompt_ids, max_new_tokens):
    start = time.perf_counter()
    r = generate(model, tokenizer, None, max_new_tokens, temperature=1.0, top_p=1.0, prompt_ids=prompt_ids)
    seconds = time.perf_counter() - start
    return seconds, int(r.mask.sum().item())


def time_mlx_lm(model, tokenizer, prompt_ids, max_new_tokens):
    B = len(prompt_ids)
    start = time.perf_counter()
    response = batch_generate(
        model, tokenizer, prompt_ids, max_tokens=max_new_tokens, sampler=make_sampler(temp=1.0, top_p=1.0),
        completion_batch_size=B, prefill_batch_size=B,
    )
    seconds = time.perf_counter() - start
    return seconds, response.stats.generation_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: a random tiny model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    model, tokenizer, _ = get_model(args.model, args.preset)
    mx.random.seed(0)
    print(f"max_new_tokens={args.max_new_tokens}, temperature 1, {args.repeats} timed calls each (median)")
    print(f"{'batch':>5} {'prompts':>8} {'ours ms':>8} {'mlx-lm ms':>9} {'ours tok/s':>10} {'mlx-lm tok/s':>12} {'ratio':>6}")
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        for kind in ("distinct", "group8"):
            prompt_ids = encode_prompts(tokenizer, make_prompts(B, kind))
            runs = {"ours": [], "mlx_lm": []}
            for i in range(args.repeats + 2):  # two warm-up rounds
                for name, fn in (("ours", time_ours), ("mlx_lm", time_mlx_lm)):
                    seconds, tokens = fn(model, tokenizer, prompt_ids, args.max_new_tokens)
                    if i >= 2:
                        runs[name].append((seconds, tokens))
            ms = {k: 1000 * statistics.median(s for s, _ in v) for k, v in runs.items()}
            tps = {k: statistics.median(t / s for s, t in v) for k, v in runs.items()}
            print(
                f"{B:>5} {kind:>8} {ms['ours']:>8.1f} {ms['mlx_lm']:>9.1f} {tps['ours']:>10.0f} "
                f"{tps['mlx_lm']:>12.0f} {tps['ours'] / tps['mlx_lm']:>5.2f}x"
            )


if __name__ == "__main__":
    main()
