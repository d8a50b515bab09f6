"""A GRPO step with LoRA on a real model, against TRL + PEFT and mlx-lm-lora, in turns in the same run.

The model is SmolLM2-135M-Instruct as `scripts/get_smollm2.sh` imports it (dense float32, a llama checkpoint
directory that mlx-lm, transformers and mlx-lm-lora all load). The prompts are the chat task's train rows
(examples/smollm2/addition, "What is 37+45? Answer with just the number.") through the chat template, and the
reward is lenient_numeric + 0.1 x format (peers/chat_task.py writes the same for the peers) plus a random
tie-breaker below 0.001, so that every group carries signal and every step of every library makes its update.

Fixed settings, the same on every side: LoRA rank 8 on every linear layer of the 30 blocks (210 layers,
2.44M trainable parameters; scale 20, i.e. PEFT alpha 160; dropout 0), 8 prompts x group 4, 32 new tokens,
temperature 1, top-p 1, one update per rollout, kl_coef (beta) 0 so no reference pass, clip 0.2, AdamW at
lr 1e-5 (small, so that the policy, and with it the completion lengths, stays near the start on every side
over the few steps timed), gradient clipping at 1.0.

  mlx-rl        in this process, built on `mlx_rl.engine.session.start` with --model, --data and
                --lora-rank 8, timing `grpo.grpo_step` as bench_grpo_step.py does (OpenBLAS preloaded,
                the update compiled)
  TRL           peers/trl_grpo_lora_step.py in the TRL venv: GRPOTrainer + PEFT LoraConfig, PyTorch CPU,
                two threads
  mlx-lm-lora   peers/mlxlora_grpo_step.py in its venv: its own train_grpo, with Debian's OpenBLAS
                preloaded like ours

This machine's speed drifts with its load, so each round runs the three in turn (mlx-rl, TRL, mlx-lm-lora),
each with warm-up steps first, and reports every round's ratios; the load average is recorded before and
after each benchmark. The sampled completions differ between libraries (different random streams), so their
mean completion length is reported beside each step time: a step's cost grows with it.

`--rollout` (also run by default after the rounds) times the rollout alone against `mlx_lm.batch_generate`
on the same model (the base, no adapters) and prompt ids, 32 new tokens, temperature 1, in turns in this
process: the GRPO batch (8 prompts x 4, each prompt repeated for its group) and 32 distinct prompts.

    .venv/bin/python benchmarks/bench_real_model.py --rounds 3 --json /work/results/real-model/bench.json
    .venv/bin/python benchmarks/bench_real_model.py --only ours --steps 2     # a quick look at our side
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from mlx_rl.engine import speed  # noqa: E402

speed.enable()  # OpenBLAS before MLX

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import bench_grpo_step  # noqa: E402
import bench_rollout  # noqa: E402
from peers import peer_process  # noqa: E402
from mlx_rl.chapters import grpo, grpo_family  # noqa: E402
from mlx_rl.data.rewards import load_rewards  # noqa: E402
from mlx_rl.engine import blas  # noqa: E402
from mlx_rl.engine.lora import adapter_weights  # noqa: E402
from mlx_rl.engine.models import get_model  # noqa: E402
from mlx_rl.engine.sampling import encode_prompts  # noqa: E402
from mlx_rl.engine.session import start  # noqa: E402

FORMAT = r"format:^\s*\d+\s*\.?\s*$"
PEERS = {
    "trl": ("/work/peers/trl/bin/python", HERE / "peers" / "trl_grpo_lora_step.py"),
    "mlx-lm-lora": ("/work/peers/mlxlora/bin/python", HERE / "peers" / "mlxlora_grpo_step.py"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--data", default="examples/smollm2/addition")
    parser.add_argument("--rounds", type=int, default=3, help="mlx-rl, TRL, mlx-lm-lora: this many times")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per benchmark and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, caches)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--only", default="ours,trl,mlx-lm-lora,rollout",
                        help="comma-separated: which of ours, trl, mlx-lm-lora, rollout to run")
    parser.add_argument("--rollout-repeats", type=int, default=3, help="timed calls of each sampler per prompt set")
    parser.add_argument("--trl-python", default=PEERS["trl"][0])
    parser.add_argument("--mlxlora-python", default=PEERS["mlx-lm-lora"][0])
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return parser.parse_args(argv)


def load_average():
    return round(os.getloadavg()[0], 2)


def measure_ours(args):
    """Time args.steps GRPO steps after args.warmup untimed ones, on a fresh LoRA session. Returns a dict."""
    out = tempfile.mkdtemp(prefix="bench-real-")
    cfg = grpo.GRPOConfig(model=args.model, data=args.data, reward=("lenient_numeric", FORMAT), reward_weights=(1.0, 0.1),
                          chat_template=True, lora_rank=args.lora_rank, prompts_per_step=args.prompts,
                          group_size=args.group_size, max_new_tokens=args.max_new_tokens, epochs=1, kl_coef=0.0,
                          temperature=1.0, lr=args.lr, pass_k=(), out=str(Path(out) / "run"))
    session = start("grpo", cfg)
    rng = np.random.default_rng(0)

    def tie_breaker(prompts, completions, **columns):
        return (1e-3 * rng.random(len(completions))).tolist()

    session.task.rewards = load_rewards(["lenient_numeric", FORMAT, tie_breaker], [1.0, 0.1, 1.0])
    variant = grpo_family.make_variant(cfg, args.max_new_tokens, answer_len=0)
    optimizer = session.optimizer(cfg.lr, cfg.steps)
    update = session.update_step(grpo.make_loss_fn(cfg, variant), optimizer)
    mx.reset_peak_memory()
    step_s, phases, lengths = bench_grpo_step.timed_steps(session, cfg, variant, update, args.max_new_tokens,
                                                          args.warmup, args.steps)
    names = sorted({k for p in phases for k in p})
    return {
        "peer": f"mlx-rl (mlx {mx.__version__})",
        "step_s_mean": statistics.mean(step_s), "step_s_median": statistics.median(step_s), "step_s_min": min(step_s),
        "step_s": step_s, "steps": len(step_s),
        "trainable_parameters": sum(v.size for v in adapter_weights(session.model).values()),
        "completion_len_mean": statistics.mean(lengths),
        "phase_s_mean": {k[len("time/"):-2]: statistics.mean(p.get(k, 0.0) for p in phases) for k in names},
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def measure_peer(name, python, args):
    """Run a peer script in its own venv (peers/peer_process.py); stop with its error if it fails."""
    peer_args = ["--model", args.model, "--data", args.data, "--steps", args.steps, "--warmup", args.warmup,
                 "--prompts", args.prompts, "--group-size", args.group_size, "--max-new-tokens", args.max_new_tokens,
                 "--lr", args.lr, "--lora-rank", args.lora_rank]
    openblas = blas.find_openblas() if name == "mlx-lm-lora" else None
    return peer_process.or_exit(name, peer_process.run_peer(python, PEERS[name][1], peer_args, openblas=openblas,
                                                            cwd=HERE.parent))


def measure_rollout(args):
    """Our sampler against mlx_lm.batch_generate, in turns, on the base model and the same prompt ids."""
    from mlx_rl.data.datasets import load_prompts

    model, tokenizer, _ = get_model(args.model)
    rows = load_prompts(args.data).train
    B = args.prompts * args.group_size
    sets = {
        f"group{args.group_size}": [r for r in rows[: args.prompts] for _ in range(args.group_size)],
        "distinct": rows[:B],
    }
    mx.random.seed(0)
    out = {}
    for kind, prompt_rows in sets.items():
        prompt_ids = encode_prompts(tokenizer, prompt_rows, chat_template=True)
        runs = {"ours": [], "mlx_lm": []}
        for i in range(args.rollout_repeats + 1):  # one warm-up round
            for name, fn in (("ours", bench_rollout.time_ours), ("mlx_lm", bench_rollout.time_mlx_lm)):
                seconds, tokens = fn(model, tokenizer, prompt_ids, args.max_new_tokens)
                if i >= 1:
                    runs[name].append((seconds, tokens))
        out[kind] = {
            "rows": len(prompt_ids), "prompt_tokens": len(prompt_ids[0]),
            **{f"{k}_s_median": statistics.median(s for s, _ in v) for k, v in runs.items()},
            **{f"{k}_tokens_mean": statistics.mean(t for _, t in v) for k, v in runs.items()},
            **{f"{k}_tok_s_median": statistics.median(t / s for s, t in v) for k, v in runs.items()},
            "load_average": load_average(),
        }
        r = out[kind]
        r["ratio_tok_s"] = r["ours_tok_s_median"] / r["mlx_lm_tok_s_median"]
        print(f"rollout {kind} ({r['rows']} rows x {args.max_new_tokens} new tokens): ours {r['ours_tok_s_median']:.0f} "
              f"tok/s ({r['ours_s_median']:.2f} s), mlx_lm.batch_generate {r['mlx_lm_tok_s_median']:.0f} tok/s "
              f"({r['mlx_lm_s_median']:.2f} s): {r['ratio_tok_s']:.2f}x", flush=True)
    return out


def describe(name, r):
    phases = ""
    if "phase_s_mean" in r:
        phases = " [" + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["phase_s_mean"].items(), key=lambda kv: -kv[1])) + "]"
    return (f"{name:<12} {r['step_s_mean']:7.2f} s/step (min {r['step_s_min']:.2f}), completions "
            f"{r['completion_len_mean']:.1f} tokens, load {r['load_before']:.1f}->{r['load_after']:.1f}{phases}")


def main():
    args = parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    pythons = {"trl": args.trl_python, "mlx-lm-lora": args.mlxlora_python}
    print(f"GRPO step, {args.model}, LoRA rank {args.lora_rank}, {args.prompts} prompts x group {args.group_size}, "
          f"{args.max_new_tokens} new tokens, one epoch, beta 0; {args.warmup} warm-up + {args.steps} timed steps "
          f"per benchmark and round", flush=True)
    rounds = []
    for i in range(args.rounds if only - {"rollout"} else 0):
        results = {}
        for name in ("ours", "trl", "mlx-lm-lora"):
            if name not in only:
                continue
            before = load_average()
            results[name] = measure_ours(args) if name == "ours" else measure_peer(name, pythons[name], args)
            results[name].update(load_before=before, load_after=load_average())
            print(f"round {i + 1}: {describe(name, results[name])}", flush=True)
        ratios = {f"mlx-rl/{p}": results["ours"]["step_s_mean"] / results[p]["step_s_mean"]
                  for p in ("trl", "mlx-lm-lora") if p in results and "ours" in results}
        if ratios:
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
        rounds.append({"results": results, "ratios": ratios})
    summary = {}
    for key in (rounds[0]["ratios"] if rounds else {}):
        values = [r["ratios"][key] for r in rounds]
        summary[key] = {"mean": statistics.mean(values), "min": min(values), "max": max(values)}
        print(f"{key} step time: mean {summary[key]['mean']:.2f} (range {summary[key]['min']:.2f}-"
              f"{summary[key]['max']:.2f}) over {len(values)} rounds; below 1 means mlx-rl is faster")
    rollout = measure_rollout(args) if "rollout" in only else None
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rounds": rounds, "ratios": summary,
                                               "rollout": rollout}, indent=2))


if __name__ == "__main__":
    main()
