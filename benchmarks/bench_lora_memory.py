"""Peak memory of one RL-style step (reference log-probs + an update) with and without LoRA.

Each setting runs in its own process so its peak is its own:
  full        full fine-tune, session.Reference (a second model object: after the first
              update the policy's weights are new arrays, so two copies live)
  lora        LoRA, reference = the policy with its adapters off (session.Reference)
  lora-copy   LoRA, reference = a second copy of the base loaded from disk (the naive way)
  lora-4bit   LoRA on the 4-bit quantised base, adapters-off reference

    .venv/bin/python benchmarks/bench_lora_memory.py [--hidden 768 --layers 6]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(setting, path, path4, batch, length, steps):
    from mlx_rl.engine import speed

    speed.enable()
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import get_total_parameters

    from mlx_rl.chapters.pretrain import pretrain_loss
    from mlx_rl.engine import lora
    from mlx_rl.engine.logprobs import reference_logprobs
    from mlx_rl.engine.session import Reference
    from mlx_rl.engine.update import make_optimizer, make_update

    model, _ = load(path4 if setting == "lora-4bit" else path)
    if setting.startswith("lora"):
        lora.apply_lora(model, rank=8, num_layers=-1, scale=20.0)
    if setting == "lora-copy":
        copy, _ = load(path)
        ref = lambda t: reference_logprobs(copy, t)  # noqa: E731
    else:
        reference = Reference(model)
        ref = reference.logprobs
    update = make_update(model, make_optimizer(1e-4, steps), pretrain_loss, compile=False)
    mx.random.seed(0)
    tokens = mx.random.randint(0, 300, (batch, length))
    mask = mx.ones((batch, length - 1))
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(ref(tokens))
        update(tokens, mask, mask.sum())
    return {"setting": setting, "peak_mb": round(mx.get_peak_memory() / 1e6, 1),
            "s_per_step": round((time.perf_counter() - start) / steps, 2),
            "parameters": get_total_parameters(model),
            "trainable": sum(v.size for v in lora.adapter_weights(model).values()) if setting.startswith("lora") else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # setting path path4: run one setting here
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.length, args.steps)))
        return
    from mlx_rl.engine import speed

    speed.enable()
    from mlx_rl.testing import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        sizes = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=4 * args.hidden,
                     num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, head_dim=64)
        path = str(build_checkpoint(Path(tmp) / "base", "qwen3", **sizes))
        path4 = str(build_checkpoint(Path(tmp) / "base4", "qwen3", bits=4, group_size=64, **sizes))
        for setting in ("full", "lora", "lora-copy", "lora-4bit"):
            out = subprocess.run([sys.executable, __file__, "--one", setting, path, path4, "--batch", str(args.batch),
                                  "--length", str(args.length), "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
