"""A step of mlx-rl against the same step in TRL (the PyTorch peer), in turns in the same run, as a ratio.

This machine's speed drifts by about a quarter over an hour, so a step time
measured now can't be compared with one measured at another time. This runner
alternates two benchmarks, round after round, on the same model and settings,
and reports each round's ratio (mlx-rl step / TRL step):

  --step grpo   bench_grpo_step.py (in this process) against peers/trl_grpo_step.py:
                8 prompts x group 8, 8 new tokens, temperature 1, beta 0, one inner iteration
  --step dpo    bench_dpo_step.py against peers/trl_dpo_step.py: 8 pairs, sigmoid DPO, beta 0.1,
                reference log-probs computed once up front by both

Both sides train the same random 1.06M-parameter Qwen3 model (character
vocabulary, full fine-tune, AdamW at lr 1e-4): the mlx-rl benchmark saves it as
a standard checkpoint and TRL loads it with transformers. TRL runs in a
separate Python that has torch and trl (not mlx-rl's dependencies):

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    .venv-peer/bin/pip install trl transformers accelerate datasets

    .venv/bin/python benchmarks/bench_vs_trl.py --peer-python .venv-peer/bin/python --step grpo [--rounds 3]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_dpo_step  # noqa: E402  (switches on OpenBLAS before MLX)
import bench_grpo_step  # noqa: E402
from peers import peer_process  # noqa: E402

STEPS = {  # name -> (the mlx-rl benchmark module, the peer script, default timed steps, warm-up steps)
    "grpo": (bench_grpo_step, HERE / "peers" / "trl_grpo_step.py", 40, 5),
    "dpo": (bench_dpo_step, HERE / "peers" / "trl_dpo_step.py", 200, 20),
}


def run_peer(peer_python, script, model_dir, steps, warmup):
    args = ["--model", model_dir, "--steps", steps, "--warmup", warmup]
    return peer_process.or_exit("TRL", peer_process.run_peer(peer_python, script, args))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True, help="a Python with torch, transformers and trl installed")
    parser.add_argument("--step", choices=list(STEPS), default="grpo")
    parser.add_argument("--rounds", type=int, default=3, help="mlx-rl then TRL, this many times")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per benchmark and round")
    parser.add_argument("--json", default=None, help="also write every round's figures to this JSON file")
    args = parser.parse_args()
    bench, peer_script, steps, warmup = STEPS[args.step]
    steps = args.steps or steps

    rounds = []
    with tempfile.TemporaryDirectory() as model_dir:
        ours_args = bench.parse_args(["--steps", str(steps), "--warmup", str(warmup), "--save-model", model_dir])
        for i in range(args.rounds):
            ours = bench.measure(ours_args)  # every round starts from the same random weights
            peer = run_peer(args.peer_python, peer_script, model_dir, steps, warmup)
            ratio = ours["step_s_mean"] / peer["step_s_mean"]
            rounds.append({"mlx_rl": ours, "peer": peer, "ratio": ratio})
            print(f"round {i + 1}: {args.step} step, mlx-rl {ours['step_s_mean'] * 1000:.1f} ms, {peer['peer']} "
                  f"{peer['step_s_mean'] * 1000:.1f} ms: ratio {ratio:.2f}", flush=True)
    ratios = [r["ratio"] for r in rounds]
    print(f"mlx-rl / TRL {args.step} step time: mean {statistics.mean(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} rounds; below 1 means mlx-rl is faster")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
