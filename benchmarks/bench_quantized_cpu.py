"""A 64-token forward pass of a SmolLM2-135M-sized model: dense float32 against MLX 4-bit quantized, on this backend.

    .venv/bin/python benchmarks/bench_quantized_cpu.py --out docs/runs/quantized-cpu-forward/summary.json

Speed does not depend on the weights, so the model is a random one with SmolLM2-135M's dimensions (30 blocks,
hidden 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152). The quantized copy is `nn.quantize` at 4 bits,
group 64, as `mlx_lm convert -q` makes. Each forward is timed after one untimed warm-up call; the median of
--repeats is reported. The quantized-on-CPU note in mlx_rl/engine/models.py quotes this measurement.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_rl.engine import speed  # noqa: E402

speed.enable()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

SMOLLM2_135M = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                    rope_theta=100000.0, tie_word_embeddings=True, head_dim=64)


def time_forward(model, tokens, repeats):
    mx.eval(model(tokens))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(model(tokens))
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantized-repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, SMOLLM2_135M["vocab_size"], (1, args.tokens))
    dense_s, dense_all = time_forward(model, tokens, args.repeats)
    print(f"dense float32: {dense_s:.3f} s per {args.tokens}-token forward ({', '.join(f'{t:.3f}' for t in dense_all)})",
          flush=True)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    quant_s, quant_all = time_forward(model, tokens, args.quantized_repeats)
    print(f"4-bit quantized: {quant_s:.3f} s ({', '.join(f'{t:.3f}' for t in quant_all)}); "
          f"{quant_s / dense_s:.0f}x the dense time", flush=True)
    result = {"model": "random, SmolLM2-135M dimensions", "tokens": args.tokens, "device": str(mx.default_device()),
              "dense_float32_s": round(dense_s, 3), "quantized_4bit_s": round(quant_s, 3),
              "ratio": round(quant_s / dense_s, 1), "dense_runs_s": [round(t, 3) for t in dense_all],
              "quantized_runs_s": [round(t, 3) for t in quant_all], "runtime": speed.runtime(),
              "load_average": os.getloadavg()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
