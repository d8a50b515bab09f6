"""Run every chapter's default run, time it, and write a table (markdown and JSON).

    .venv/bin/python benchmarks/run.py                 # everything (12 minutes here, controls included)
    .venv/bin/python benchmarks/run.py --only pretrain,grpo
    .venv/bin/python benchmarks/run.py --pretrained runs/x/checkpoint --only grpo

For each RL chapter it also runs the control: continued pretraining on the same
(mistaken) corpus from the same checkpoint for the same wall time, at the RL
run's learning rate, and draws both accuracy curves over wall time in one plot.
A run over 60 minutes is killed and marked FAIL; the runner then exits non-zero.
"""

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_rl.engine import speed  # noqa: E402

speed.enable()
from mlx_rl.plots import plot_runs  # noqa: E402
from mlx_rl.tools.profile import phase_profile  # noqa: E402

LIMIT_S = 3600
MLXRL = [sys.executable, "-m", "mlx_rl"]

# name -> (command args after `mlx-rl`, the summary figure to report, needs a pretrained checkpoint of task)
CHAPTERS = {
    "icemaze": (["icemaze"], "eval.success_rate", None),
    "icemaze-8x8": (["icemaze", "--map", "8x8"], "eval.success_rate", None),
    "icemaze-8x8-slippery": (["icemaze", "--map", "8x8", "--slippery"], "eval.success_rate", None),
    "icemaze-reinforce-8x8": (["icemaze", "--algo", "reinforce", "--map", "8x8"], "eval.success_rate", None),
    "icemaze-reinforce-slippery": (["icemaze", "--algo", "reinforce", "--slippery"], "eval.success_rate", None),
    "icemaze-reinforce-8x8-slippery": (["icemaze", "--algo", "reinforce", "--map", "8x8", "--slippery"],
                                       "eval.success_rate", None),
    "kl": (["kl"], None, None),
    "pretrain": (["pretrain", "--task", "addition"], "eval/accuracy", None),
    "pretrain-sort": (["pretrain", "--task", "sort"], "eval/accuracy", None),
    "grpo": (["grpo", "--task", "addition"], "eval/accuracy", "addition"),
    "grpo-sort": (["grpo", "--task", "sort"], "eval/accuracy", "sort"),
    "ppo": (["ppo", "--task", "addition"], "eval/accuracy", "addition"),
    "dpo": (["dpo", "--task", "addition"], "eval/accuracy", "addition"),
}
RL_CHAPTERS = {"grpo", "grpo-sort", "ppo", "dpo"}


def run_command(args, out, log_path):
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(MLXRL + args + ["--out", str(out)], stdout=log, stderr=subprocess.STDOUT,
                                  timeout=LIMIT_S, cwd=ROOT)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return code, time.perf_counter() - start


def lookup(summary, dotted):
    for key in dotted.split(".") if dotted not in summary else [dotted]:
        summary = summary.get(key) if isinstance(summary, dict) else None
    return summary


def rl_learning_rate(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    return cfg.get("lr", 1e-4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CHAPTERS), help="comma-separated chapters")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<time>)")
    parser.add_argument("--pretrained", default=None, help="addition checkpoint for the RL chapters (default: this run's pretrain)")
    parser.add_argument("--pretrained-sort", default=None, help="sort checkpoint for grpo-sort")
    parser.add_argument("--no-control", action="store_true", help="skip the continued-pretraining controls")
    args = parser.parse_args()

    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CHAPTERS)
    if unknown:
        parser.error(f"unknown chapters: {', '.join(sorted(unknown))}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = {"addition": args.pretrained, "sort": args.pretrained_sort}
    results = []

    def pretrained_for(task):
        if checkpoints[task] is None:
            name = "pretrain" if task == "addition" else "pretrain-sort"
            print(f"[{name}] needed first", flush=True)
            results.append(bench(name))
        return checkpoints[task]

    def bench(name):
        cmd, figure, task = CHAPTERS[name]
        cmd = list(cmd)
        if task:
            ckpt = pretrained_for(task)
            cmd += ["--model", str(ckpt)]
        run_dir = out / name
        print(f"[{name}] mlx-rl {' '.join(cmd)}", flush=True)
        code, wall = run_command(cmd, run_dir, out / f"{name}.log")
        row = {"chapter": name, "command": "mlx-rl " + " ".join(cmd), "wall_s": round(wall, 1),
               "status": "ok" if code == 0 else ("FAIL (over 60 min)" if code == "timeout" else f"FAIL (exit {code})")}
        if code == 0 and wall > LIMIT_S:
            row["status"] = "FAIL (over 60 min)"
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            row["summary"] = summary
            if figure:
                row["final"] = lookup(summary, figure)
            if "value_iteration" in summary:  # icemaze: the optimal policy's figure, evaluated the same way
                row["optimal"] = summary["value_iteration"].get("success_rate")
        if (run_dir / "metrics.jsonl").exists():
            try:
                row["phases_ms_per_step"] = {k: round(v["mean_s"] * 1000, 2) for k, v in phase_profile(run_dir).items()}
            except Exception as e:  # a chapter without phase timings
                row["phases_ms_per_step"] = {"error": str(e)}
        if name.startswith("pretrain") and code == 0:
            checkpoints["addition" if name == "pretrain" else "sort"] = run_dir / "checkpoint"
        if task and code == 0:
            row["before"] = first_eval_of_checkpoint(checkpoints[task], task, out / f"{name}-before.json")
            if not args.no_control:
                row["control"] = control(name, task, run_dir, wall)
        print(f"[{name}] {row['status']} in {wall:.0f} s  before={row.get('before')} final={row.get('final')} "
              f"control={row.get('control', {}).get('final')}", flush=True)
        return row

    def control(name, task, rl_dir, wall):
        """Continued pretraining for the same wall time, from the same checkpoint."""
        ctrl_dir = out / f"{name}-control"
        cmd = ["pretrain", "--task", task, "--model", str(checkpoints[task]), "--steps", "1000000",
               "--time-limit", str(round(wall, 1)), "--lr", str(rl_learning_rate(rl_dir)), "--warmup", "0",
               "--lr-schedule", "constant", "--eval-every", "100"]
        code, ctrl_wall = run_command(cmd, ctrl_dir, out / f"{name}-control.log")
        result = {"command": "mlx-rl " + " ".join(cmd), "wall_s": round(ctrl_wall, 1)}
        if code == 0:
            result["final"] = json.loads((ctrl_dir / "summary.json").read_text()).get("eval/accuracy")
            plot_runs([rl_dir, ctrl_dir], out / f"{name}-vs-control", x="wall_s", labels=[name, "continued pretraining"])
        else:
            result["status"] = f"FAIL (exit {code})"
        return result

    for name in names:
        if any(r["chapter"] == name for r in results):
            continue
        results.append(bench(name))

    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    lines = ["| chapter | status | wall time | before (or optimal) | final | control (same time) | slowest phases (ms/step) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        phases = r.get("phases_ms_per_step", {})
        top = ", ".join(f"{k} {v}" for k, v in list(phases.items())[:3] if isinstance(v, (int, float)))
        fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
        lines.append(f"| {r['chapter']} | {r['status']} | {r['wall_s']:.0f} s | {fmt(r.get('before', r.get('optimal')))} | "
                     f"{fmt(r.get('final'))} | {fmt(r.get('control', {}).get('final'))} | {top} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")
    sys.exit(0 if all(r["status"] == "ok" for r in results) else 1)


def first_eval_of_checkpoint(ckpt, task, json_path):
    """Held-out greedy accuracy of the starting checkpoint (the 'before' figure)."""
    p = subprocess.run(MLXRL + ["eval", "--model", str(ckpt), "--task", task, "--json"], capture_output=True,
                       text=True, cwd=ROOT)
    if p.returncode != 0:
        return None
    json_path.write_text(p.stdout)
    return json.loads(p.stdout)["eval/accuracy"]


if __name__ == "__main__":
    main()
