"""The GRPO step against TRL's (the PyTorch peer), measured in turns in the same run, as a ratio.

This machine's speed drifts by about a quarter over an hour, so a step time
measured now can't be compared with one measured at another time. This runner
alternates the two benchmarks, round after round, on the same model and
settings, and reports each round's ratio (mlx-rl step / TRL step):

  mlx-rl  bench_grpo_step.py's measure(), in this process
  TRL     peers/trl_grpo_step.py, in a separate Python that has torch and trl

Settings are the issue's: 1.06M-parameter Qwen3, character vocabulary,
8 prompts x group 8, 8 new tokens, temperature 1, beta 0, one inner iteration,
full fine-tune. Both load the same random weights: bench_grpo_step.py saves its
model as a standard checkpoint, and TRL loads it with transformers.

The peer's environment (not mlx-rl's dependencies):

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    .venv-peer/bin/pip install trl transformers accelerate datasets

    .venv/bin/python benchmarks/bench_grpo_vs_trl.py --peer-python .venv-peer/bin/python [--rounds 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_grpo_step  # noqa: E402  (imports mlx_rl, which loads OpenBLAS before MLX)

PEER = Path(__file__).resolve().parent / "peers" / "trl_grpo_step.py"


def run_peer(peer_python, model_dir, steps, warmup):
    cmd = [peer_python, str(PEER), "--model", model_dir, "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the TRL benchmark failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", required=True, help="a Python with torch, transformers and trl installed")
    parser.add_argument("--rounds", type=int, default=3, help="mlx-rl then TRL, this many times")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per benchmark and round")
    parser.add_argument("--json", default=None, help="also write every round's figures to this JSON file")
    args = parser.parse_args()

    rounds = []
    with tempfile.TemporaryDirectory() as model_dir:
        ours_args = bench_grpo_step.parse_args(["--steps", str(args.steps), "--save-model", model_dir])
        for i in range(args.rounds):
            ours = bench_grpo_step.measure(ours_args)
            ours_args.save_model = None  # saved once; every round starts from the same random weights
            peer = run_peer(args.peer_python, model_dir, args.steps, ours_args.warmup)
            ratio = ours["step_s_mean"] / peer["step_s_mean"]
            rounds.append({"mlx_rl": ours, "peer": peer, "ratio": ratio})
            print(f"round {i + 1}: mlx-rl {ours['step_s_mean'] * 1000:.1f} ms/step, {peer['peer']} "
                  f"{peer['step_s_mean'] * 1000:.1f} ms/step: ratio {ratio:.2f}", flush=True)
    ratios = [r["ratio"] for r in rounds]
    print(f"mlx-rl / TRL step time: mean {statistics.mean(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}) "
          f"over {len(ratios)} rounds; below 1 means mlx-rl is faster")
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
