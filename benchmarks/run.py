"""Run every chapter's default run, time it, and write a table (markdown and JSON).

    .venv/bin/python benchmarks/run.py                 # everything (the chapters alone: 12 minutes here, controls included)
    .venv/bin/python benchmarks/run.py --only pretrain,grpo
    .venv/bin/python benchmarks/run.py --pretrained runs/x/checkpoint --only grpo
    .venv/bin/python benchmarks/run.py --only grpo-family,grpo-family-sort

For each RL chapter it also runs the control: continued pretraining on the same
(mistaken) corpus from the same checkpoint for the same wall time, at the RL
run's learning rate, and draws both accuracy curves over wall time in one plot.
A run over 60 minutes is killed and marked FAIL; the runner then exits non-zero.

RLHF (`reward-model`, `reward-model-clean`, `rlhf-ppo`, `rlhf-ppo-kl`): a reward model on the simulated
labeller's biased pairs, one on clean pairs, then PPO on the biased one's learned reward, without and with a
strong KL penalty. Each should take under 10 minutes here (else FAIL); the table rlhf.md gives the reward
models' held-out pair accuracy, and for the PPO runs the verifier's peak and final held-out accuracy, the learned
reward and the completion length at the start, at the peak and at the end.

GRPO's family (`grpo-family` on addition, `grpo-family-sort` on sort) runs every
`--variant` at its defaults from the same pretraining checkpoint, and writes one
overlay per task (held-out accuracy, entropy, completion length and clip fraction
against training time: grpo-family-<task>.png), a table (grpo-family-<task>.md:
variant, final accuracy, time to 90%, wall time; a run over 10 minutes is marked
FAIL), and on addition pass@1/8/64 of the pretraining checkpoint and of the GRPO
run's (`mlx-rl eval --pass-k 1,8,64`).

Distillation (`distill`): the GRPO-trained addition model (the `grpo` entry's run, or one made here) is the
teacher, the plateau pretraining checkpoint the student; on-policy distillation, off-policy distillation (SFT on
the teacher's samples) and that GRPO run all start from the same checkpoint. One overlay (held-out accuracy
and the exact reverse KL to the teacher against seconds of training: distill-addition.png) and a table
(distill-addition.md: final accuracy, time to 90%, wall time; a run over 5 minutes is marked FAIL).
`distill-micro` distils the same teacher into a smaller student (a `--preset micro` pretraining run).

Stale rollouts (`staleness`): GRPO on addition with `--rollout-staleness` 0, 2 and 8, each without and with
`--is-correction token-tis`, from the same checkpoint: held-out accuracy against steps in one figure
(staleness-addition.png) and a table (staleness-addition.md); `staleness-sort` the same on sort, from the sort
pretraining checkpoint (staleness-sort.png, staleness-sort.md).
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
AFTER = "after.eval/accuracy"  # summary.json: held-out greedy accuracy at the end

RLHF_RECIPE = ["--max-new-tokens", "6", "--temperature", "1.3"]  # room for longer answers, and a chance to try them
RLHF_REMEDY_KL = "0.5"

# name -> (command args after `mlx-rl`, the summary figure to report, needs a pretrained checkpoint of task)
CHAPTERS = {
    "icemaze": (["icemaze"], "after.eval/success_rate", None),
    "icemaze-8x8": (["icemaze", "--map", "8x8"], "after.eval/success_rate", None),
    "icemaze-8x8-slippery": (["icemaze", "--map", "8x8", "--slippery"], "after.eval/success_rate", None),
    "icemaze-reinforce-8x8": (["icemaze", "--algo", "reinforce", "--map", "8x8"], "after.eval/success_rate", None),
    "icemaze-reinforce-slippery": (["icemaze", "--algo", "reinforce", "--slippery"], "after.eval/success_rate", None),
    "icemaze-reinforce-8x8-slippery": (["icemaze", "--algo", "reinforce", "--map", "8x8", "--slippery"],
                                       "after.eval/success_rate", None),
    "kl": (["kl"], None, None),
    "pretrain-icemaze": (["pretrain", "--task", "icemaze"], AFTER, None),
    "grpo-icemaze": (["grpo", "--task", "icemaze"], AFTER, "icemaze"),
    "ppo-icemaze": (["ppo", "--task", "icemaze"], AFTER, "icemaze"),
    "pretrain-calculator": (["pretrain", "--task", "calculator"], AFTER, None),
    "grpo-calculator": (["grpo", "--task", "calculator"], AFTER, "calculator"),
    "pretrain": (["pretrain", "--task", "addition"], AFTER, None),
    "pretrain-sort": (["pretrain", "--task", "sort"], AFTER, None),
    "grpo": (["grpo", "--task", "addition"], AFTER, "addition"),
    "grpo-sort": (["grpo", "--task", "sort"], AFTER, "sort"),
    "ppo": (["ppo", "--task", "addition"], AFTER, "addition"),
    "dpo": (["dpo", "--task", "addition"], AFTER, "addition"),
    "reward-model": (["reward-model", "--task", "addition"], AFTER, "addition"),
    "reward-model-clean": (["reward-model", "--task", "addition", "--label-noise", "0", "--length-bias", "0"], AFTER,
                           "addition"),
    "rlhf-ppo": (["ppo", "--task", "addition", "--reward-model", "{reward-model}", *RLHF_RECIPE], AFTER, "addition"),
    "rlhf-ppo-kl": (["ppo", "--task", "addition", "--reward-model", "{reward-model}", *RLHF_RECIPE, "--kl-coef",
                     RLHF_REMEDY_KL], AFTER, "addition"),
}
RL_CHAPTERS = {"grpo", "grpo-sort", "ppo", "dpo", "grpo-icemaze", "ppo-icemaze", "grpo-calculator"}
PRETRAIN_OF = {"addition": "pretrain", "sort": "pretrain-sort", "icemaze": "pretrain-icemaze",
               "calculator": "pretrain-calculator"}  # task -> the chapter whose checkpoint the RL runs start from
RLHF = {"reward-model", "reward-model-clean", "rlhf-ppo", "rlhf-ppo-kl"}  # no control; each under 10 minutes
RLHF_LIMIT_S = 600
FAMILIES = {"grpo-family": "addition", "grpo-family-sort": "sort"}  # name -> task: every --variant, one overlay
VARIANTS = ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo"]
FAMILY_LIMIT_S = 600  # each variant's run should take under 10 minutes here
PASS_K = "1,8,64"
DISTILL = {"distill": "tiny", "distill-micro": "micro"}  # name -> the student's preset
DISTILL_LIMIT_S = 300  # each distillation run should take under 5 minutes here
STALENESS = {"staleness": "addition", "staleness-sort": "sort"}
STALE_KS, STALE_CORRECTION = (0, 2, 8), "token-tis"


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
    parser.add_argument("--only", default=",".join([*CHAPTERS, *FAMILIES, *DISTILL, *STALENESS]),
                        help="comma-separated chapters")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<time>)")
    parser.add_argument("--pretrained", default=None, help="addition checkpoint for the RL chapters (default: this run's pretrain)")
    parser.add_argument("--pretrained-sort", default=None, help="sort checkpoint for grpo-sort")
    parser.add_argument("--no-control", action="store_true", help="skip the continued-pretraining controls")
    args = parser.parse_args()

    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CHAPTERS) - set(FAMILIES) - set(DISTILL) - set(STALENESS)
    if unknown:
        parser.error(f"unknown chapters: {', '.join(sorted(unknown))}")
    out = Path(args.out or ROOT / "benchmarks" / "results" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = {"addition": args.pretrained, "sort": args.pretrained_sort, "icemaze": None, "calculator": None,
                   "reward-model": None}
    results = []

    def pretrained_for(task):
        if checkpoints[task] is None:
            name = PRETRAIN_OF[task]
            print(f"[{name}] needed first", flush=True)
            results.append(bench(name))
        return checkpoints[task]

    def reward_model_for():
        if checkpoints["reward-model"] is None:
            print("[reward-model] needed first", flush=True)
            results.append(bench("reward-model"))
        return checkpoints["reward-model"]

    def bench(name):
        cmd, figure, task = CHAPTERS[name]
        cmd = list(cmd)
        if task:
            ckpt = pretrained_for(task)
            cmd += ["--model", str(ckpt)]
        if "{reward-model}" in cmd:
            cmd[cmd.index("{reward-model}")] = str(reward_model_for())
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
            if "value_iteration" in summary.get("details", {}):  # icemaze: the optimal policy's figure, evaluated the same way
                row["optimal"] = summary["details"]["value_iteration"].get("success_rate")
        if (run_dir / "metrics.jsonl").exists():
            try:
                row["phases_ms_per_step"] = {k: round(v["mean_s"] * 1000, 2) for k, v in phase_profile(run_dir).items()}
            except Exception as e:  # a chapter without phase timings
                row["phases_ms_per_step"] = {"error": str(e)}
        if name in PRETRAIN_OF.values() and code == 0:
            checkpoints[next(t for t, n in PRETRAIN_OF.items() if n == name)] = run_dir / "checkpoint"
        if "--task" in cmd and cmd[cmd.index("--task") + 1] == "icemaze" and (run_dir / "config.json").exists():
            row["optimal"] = icemaze_optimum(run_dir)
        if name == "reward-model" and code == 0:
            checkpoints["reward-model"] = run_dir / "checkpoint"
        if name in RLHF:
            if code == 0 and wall > RLHF_LIMIT_S:
                row["status"] = "FAIL (over 10 min)"
            if (run_dir / "metrics.jsonl").exists():
                row["rlhf"] = rlhf_figures(run_dir)
            print(f"[{name}] {row['status']} in {wall:.0f} s  {row.get('rlhf')}", flush=True)
            return row
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
            result["final"] = lookup(json.loads((ctrl_dir / "summary.json").read_text()), AFTER)
            plot_runs([rl_dir, ctrl_dir], out / f"{name}-vs-control", x="wall_s", labels=[name, "continued pretraining"])
        else:
            result["status"] = f"FAIL (exit {code})"
        return result

    def bench_family(name):
        """Every variant at its defaults from the same checkpoint; the overlay, the table, and pass@k."""
        task = FAMILIES[name]
        ckpt = pretrained_for(task)
        before = first_eval_of_checkpoint(ckpt, task, out / f"{name}-before.json")
        rows, run_dirs = [], []
        for variant in VARIANTS:
            cmd = ["grpo", "--task", task, "--variant", variant, "--model", str(ckpt)]
            run_dir = out / name / variant
            print(f"[{name}] mlx-rl {' '.join(cmd)}", flush=True)
            code, wall = run_command(cmd, run_dir, out / f"{name}-{variant}.log")
            ok = code == 0 and wall <= FAMILY_LIMIT_S
            row = {"chapter": f"{name}/{variant}", "variant": variant, "command": "mlx-rl " + " ".join(cmd),
                   "wall_s": round(wall, 1), "before": before,
                   "status": "ok" if ok else ("FAIL (over 10 min)" if code == 0 else f"FAIL (exit {code})")}
            if (run_dir / "summary.json").exists():
                row["summary"] = json.loads((run_dir / "summary.json").read_text())
                row["final"] = lookup(row["summary"], AFTER)
                row.update(family_figures(run_dir))
                run_dirs.append(run_dir)
            print(f"[{name}/{variant}] {row['status']} in {wall:.0f} s  final={row.get('final')} "
                  f"to 90%={row.get('time_to_90_s')}", flush=True)
            rows.append(row)
        if run_dirs:
            plot_family(run_dirs, [d.name for d in run_dirs], out / f"{name.replace('-sort', '')}-{task}.png",
                        f"GRPO's family on {task}, from the same checkpoint")
            plot_runs(run_dirs, out / f"{name}-plots", x="wall_s", labels=[d.name for d in run_dirs])
        lines = family_table(rows, task, before)
        if task == "addition":  # what RL changes: pass@k before and after, from temperature-1 samples
            grpo_ckpt = out / name / "grpo" / "checkpoint"
            passes = {"pretrain": pass_at_k_of(ckpt, task, out / f"{name}-pass-at-k-pretrain.json")}
            if grpo_ckpt.exists():
                passes["grpo"] = pass_at_k_of(grpo_ckpt, task, out / f"{name}-pass-at-k-grpo.json")
            lines += ["", pass_at_k_table(passes)]
            for r in rows:
                r["pass_at_k"] = passes
        (out / f"{name.replace('-sort', '')}-{task}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        return rows

    def teacher_run():
        """The GRPO run on addition (the `grpo` entry's, one already in this results folder, else one made here):
        the teacher, and GRPO's curve."""
        for r in results:
            if r["chapter"] == "grpo" and r["status"] == "ok":
                return out / "grpo"
        if (out / "grpo" / "summary.json").exists() and (out / "grpo" / "checkpoint").exists():
            print("[grpo] reusing the run in this results folder", flush=True)
            return out / "grpo"
        results.append(bench("grpo"))
        return out / "grpo" if results[-1]["status"] == "ok" else None

    def bench_distill(name):
        """On-policy and off-policy distillation of the GRPO-trained model into the plateau checkpoint (or a
        smaller one), beside GRPO from the same start: one overlay and a table."""
        student = pretrained_for("addition")
        grpo_dir = teacher_run()
        if grpo_dir is None:
            return [{"chapter": name, "status": "FAIL (no teacher)", "wall_s": 0.0}]
        rows, run_dirs, labels = [], [], []
        if DISTILL[name] != "tiny":  # a smaller student: pretrained here on the same corpus
            small = out / f"pretrain-{DISTILL[name]}"
            cmd = ["pretrain", "--task", "addition", "--preset", DISTILL[name]]
            print(f"[{name}] mlx-rl {' '.join(cmd)}", flush=True)
            code, wall = run_command(cmd, small, out / f"{name}-pretrain.log")
            rows.append({"chapter": f"{name}/pretrain", "command": "mlx-rl " + " ".join(cmd), "wall_s": round(wall, 1),
                         "status": "ok" if code == 0 else f"FAIL (exit {code})",
                         "final": lookup(json.loads((small / "summary.json").read_text()), AFTER) if code == 0 else None})
            student = small / "checkpoint"
        else:
            rows.append({"chapter": f"{name}/grpo", "command": "(the grpo entry)", "status": "ok",
                         "wall_s": json.loads((grpo_dir / "summary.json").read_text())["wall_s"],
                         **family_figures(grpo_dir)})
            run_dirs.append(grpo_dir)
            labels.append("GRPO (the teacher's own run)")
        before = first_eval_of_checkpoint(student, "addition", out / f"{name}-before.json")
        for label, extra in [("on-policy distillation", []), ("off-policy distillation (SFT on teacher samples)",
                                                                ["--off-policy"])]:
            cmd = ["distill", "--task", "addition", "--teacher", str(grpo_dir / "checkpoint"), "--model", str(student),
                   *extra]
            run_dir = out / name / ("off-policy" if extra else "on-policy")
            print(f"[{name}] mlx-rl {' '.join(cmd)}", flush=True)
            code, wall = run_command(cmd, run_dir, out / f"{name}-{run_dir.name}.log")
            ok = code == 0 and wall <= DISTILL_LIMIT_S
            row = {"chapter": f"{name}/{run_dir.name}", "command": "mlx-rl " + " ".join(cmd), "wall_s": round(wall, 1),
                   "before": before, "status": "ok" if ok else ("FAIL (over 5 min)" if code == 0 else f"FAIL (exit {code})")}
            if (run_dir / "summary.json").exists():
                row["final"] = lookup(json.loads((run_dir / "summary.json").read_text()), AFTER)
                row.update(family_figures(run_dir))
                run_dirs.append(run_dir)
                labels.append(label)
            print(f"[{row['chapter']}] {row['status']} in {wall:.0f} s  final={row.get('final')} "
                  f"to 90%={row.get('time_to_90_s')}", flush=True)
            rows.append(row)
        if run_dirs:
            plot_distill(run_dirs, labels, out / f"{name}-addition.png",
                         f"Distilling the GRPO-trained model into {'a smaller' if DISTILL[name] != 'tiny' else 'the plateau'}"
                         " checkpoint, from the same start")
        fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
        secs = lambda v: f"{v:.0f} s" if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines = [f"Student's held-out greedy accuracy at the start: {fmt(before)}. Time to 90%: seconds of training to "
                 "the first evaluation at 90% or more.", "", "| run | status | final accuracy | time to 90% | "
                 "wall time (training) | wall time (command) |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['chapter']} | {r['status']} | {fmt(r.get('final_accuracy', r.get('final')))} | "
                         f"{secs(r.get('time_to_90_s'))} | {secs(r.get('train_s'))} | {secs(r['wall_s'])} |")
        (out / f"{name}-addition.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        return rows

    def bench_staleness(name):
        """GRPO with rollouts K steps stale, without and with the sampler correction, from one checkpoint."""
        task = STALENESS[name]
        ckpt = pretrained_for(task)
        rows, run_dirs, labels = [], [], []
        for k in STALE_KS:
            for correction in ("none", STALE_CORRECTION):
                cmd = ["grpo", "--task", task, "--model", str(ckpt), "--rollout-staleness", str(k),
                       "--is-correction", correction]
                run_dir = out / name / f"k{k}-{correction}"
                print(f"[{name}] mlx-rl {' '.join(cmd)}", flush=True)
                code, wall = run_command(cmd, run_dir, out / f"{name}-{run_dir.name}.log")
                row = {"chapter": f"{name}/{run_dir.name}", "command": "mlx-rl " + " ".join(cmd),
                       "wall_s": round(wall, 1), "status": "ok" if code == 0 else f"FAIL (exit {code})"}
                if (run_dir / "summary.json").exists():
                    row["final"] = lookup(json.loads((run_dir / "summary.json").read_text()), AFTER)
                    row.update(family_figures(run_dir))
                    mismatch = [r["policy/sampler_mismatch"] for r in read_rows(run_dir) if "policy/sampler_mismatch" in r]
                    row["sampler_mismatch_mean"] = float(sum(mismatch) / len(mismatch)) if mismatch else None
                    run_dirs.append(run_dir)
                    labels.append(f"staleness {k}, correction {correction}")
                print(f"[{row['chapter']}] {row['status']} in {wall:.0f} s  final={row.get('final')}", flush=True)
                rows.append(row)
        if run_dirs:
            plot_runs(run_dirs, out / f"{name}-plots", x="step", labels=labels)
            plot_staleness(run_dirs, labels, out / f"{name}-{task}.png",
                           f"GRPO on {task} with stale rollouts, without and with the sampler correction")
        fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
        lines = ["| run | status | final accuracy | time to 90% | sampler mismatch (mean over steps) | wall time |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            mm = r.get("sampler_mismatch_mean")
            t90 = r.get("time_to_90_s")
            lines.append(f"| {r['chapter']} | {r['status']} | {fmt(r.get('final'))} | "
                         f"{f'{t90:.0f} s' if t90 is not None else '-'} | {f'{mm:.4f}' if mm is not None else '-'} | "
                         f"{r['wall_s']:.0f} s |")
        (out / f"{name}-{task}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        return rows

    for name in names:
        if any(r["chapter"] == name for r in results):
            continue
        if name in STALENESS:
            results += bench_staleness(name)
        elif name in DISTILL:
            results += bench_distill(name)
        elif name in FAMILIES:
            results += bench_family(name)
        else:
            results.append(bench(name))

    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if any(r["chapter"] in RLHF for r in results):
        (out / "rlhf.md").write_text("\n".join(rlhf_table(results)) + "\n")
        ppo_runs = [out / n for n in ("rlhf-ppo", "rlhf-ppo-kl") if (out / n / "metrics.jsonl").exists()]
        if ppo_runs:
            plot_rlhf(ppo_runs, [f"kl_coef {json.loads((d / 'config.json').read_text())['kl_coef']:g}" for d in ppo_runs],
                      out / "rlhf-hacking.png", "PPO on a learned reward: the reward model's score and the verifier's")
    lines = ["| chapter | status | wall time | before (or optimal) | final | control (same time) | slowest phases (ms/step) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        phases = r.get("phases_ms_per_step", {})
        top = ", ".join(f"{k} {v}" for k, v in list(phases.items())[:3] if isinstance(v, (int, float)))
        fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
        optimal = r.get("optimal", {}).get("all") if isinstance(r.get("optimal"), dict) else r.get("optimal")
        lines.append(f"| {r['chapter']} | {r['status']} | {r['wall_s']:.0f} s | {fmt(r.get('before', optimal))} | "
                     f"{fmt(r.get('final'))} | {fmt(r.get('control', {}).get('final'))} | {top} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")
    sys.exit(0 if all(r["status"] == "ok" for r in results) else 1)


def rlhf_figures(run_dir):
    """From a run's metrics.jsonl. A reward model: final held-out pair accuracy, training seconds to the first
    evaluation at 90% or more, how often it scores the longer answer higher. A PPO run on a learned reward: the
    verifier's held-out accuracy at the start, its peak (and step) and the end, the drop from the peak, and the
    learned reward (eval/reward_rm) and completion length at those points."""
    from mlx_rl.runs import read_jsonl

    rows = list(read_jsonl(Path(run_dir) / "metrics.jsonl"))
    t0 = rows[0]["wall_s"]
    pair_evals = [r for r in rows if "eval/pair_accuracy" in r]
    if pair_evals:  # a reward model
        evals = pair_evals
        first = next((r for r in evals if r["eval/pair_accuracy"] >= 0.9), None)
        return {"pair_accuracy": evals[-1]["eval/pair_accuracy"], "prefers_longer": evals[-1].get("eval/prefers_longer"),
                "time_to_90_s": round(first["wall_s"] - t0, 1) if first else None,
                "train_s": round(rows[-1]["wall_s"] - t0, 1)}
    evals = [r for r in rows if "eval/accuracy" in r]
    if not evals:
        return {}
    peak = max(evals, key=lambda r: r["eval/accuracy"])
    lengths = {r["step"]: r["policy/completion_len"] for r in rows if "policy/completion_len" in r}

    def at(r):  # (step 0 is the evaluation before training: its length is the first rollout's)
        return {"step": r["step"], "accuracy": r["eval/accuracy"], "reward_rm": r["eval/reward_rm"],
                "completion_len": lengths.get(max(r["step"], 1))}

    return {"start": at(evals[0]), "peak": at(peak), "end": at(evals[-1]),
            "drop_from_peak": peak["eval/accuracy"] - evals[-1]["eval/accuracy"],
            "reward_rm": [(r["step"], round(r["eval/reward_rm"], 3)) for r in evals],
            "train_s": round(rows[-1]["wall_s"] - t0, 1)}


def rlhf_table(results):
    pct = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
    num = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    secs = lambda v: f"{v:.0f} s" if isinstance(v, (int, float)) else "-"  # noqa: E731
    lines = ["| run | status | wall time | held-out pair accuracy | time to 90% | prefers longer |", "|---|---|---|---|---|---|"]
    for r in results:
        f = r.get("rlhf", {})
        if r["chapter"].startswith("reward-model"):
            lines.append(f"| {r['chapter']} | {r['status']} | {r['wall_s']:.0f} s | {pct(f.get('pair_accuracy'))} | "
                         f"{secs(f.get('time_to_90_s'))} | {pct(f.get('prefers_longer'))} |")
    lines += ["", "| run | status | wall time | accuracy start -> peak (step) -> end | drop from peak | learned reward "
              "start -> peak -> end | completion length start -> end (tokens) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.get("rlhf", {})
        if r["chapter"].startswith("rlhf") and f:
            s, p, e = f["start"], f["peak"], f["end"]
            lines.append(f"| {r['chapter']} | {r['status']} | {r['wall_s']:.0f} s | {pct(s['accuracy'])} -> "
                         f"{pct(p['accuracy'])} ({p['step']}) -> {pct(e['accuracy'])} | {pct(f['drop_from_peak'])} | "
                         f"{num(s['reward_rm'])} -> {num(p['reward_rm'])} -> {num(e['reward_rm'])} | "
                         f"{num(s['completion_len'])} -> {num(e['completion_len'])} |")
    return lines


def plot_rlhf(run_dirs, labels, path, title):
    """One figure, three panels, one line per run, against PPO steps: the verifier's held-out accuracy, the
    learned reward of the same held-out answers (eval/reward_rm), and the completion length of the samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlx_rl.runs import read_jsonl

    panels = [("eval/accuracy", "verifier: held-out accuracy (greedy)"),
              ("eval/reward_rm", "reward model: held-out score (std units)"),
              ("policy/completion_len", "sampled completion length (tokens, EOS included)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for run_dir, label in zip(run_dirs, labels):
        rows = list(read_jsonl(Path(run_dir) / "metrics.jsonl"))
        for ax, (metric, _) in zip(axes, panels):
            points = [(r["step"], r[metric]) for r in rows if metric in r]
            if points:
                ax.plot(*zip(*points), marker="o" if metric.startswith("eval/") else None, ms=3, lw=1.5, label=label)
    for ax, (metric, name) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        if metric == "eval/accuracy":
            ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def family_figures(run_dir, threshold=0.9):
    """From a run's metrics.jsonl: final held-out accuracy, seconds of training to the first evaluation at or
    above threshold (None if never), and training seconds in all. Seconds count from the first evaluation
    (step 0), so the start's pass@k and model loading, the same for every variant, are left out."""
    from mlx_rl.runs import read_jsonl

    rows = list(read_jsonl(Path(run_dir) / "metrics.jsonl"))
    evals = [r for r in rows if "eval/accuracy" in r]
    t0 = rows[0]["wall_s"] if rows else 0.0
    first = next((r for r in evals if r["eval/accuracy"] >= threshold), None)
    at = {r["step"]: r["eval/accuracy"] for r in evals}
    trained = [r for r in rows if "policy/entropy" in r]
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs) if rs and all(key in r for r in rs) else None  # noqa: E731
    return {"final_accuracy": evals[-1]["eval/accuracy"] if evals else None,
            "time_to_90_s": round(first["wall_s"] - t0, 1) if first else None,
            "train_s": round(rows[-1]["wall_s"] - t0, 1) if rows else None,
            "accuracy_step_10": at.get(10), "accuracy_step_20": at.get(20),
            "first_step_at_90": first["step"] if first else None,
            "entropy_first_10": mean("policy/entropy", [r for r in trained if r["step"] <= 10]),
            "clipfrac_mean": mean("policy/clipfrac", trained),
            "k3_kl_end": trained[-1].get("kl/k3") if trained else None}


def family_table(rows, task, before):
    fmt = lambda v: f"{v:.1%}" if isinstance(v, float) else "-"  # noqa: E731
    secs = lambda v: f"{v:.0f} s" if isinstance(v, (int, float)) else "-"  # noqa: E731
    lines = [f"GRPO's family on {task}, every variant at its defaults from one checkpoint (held-out greedy accuracy "
             f"{fmt(before)} at the start). Time to 90%: seconds of training to the first evaluation at 90% or more. "
             "Wall time: training, then the whole command (loading, pass@k at start and end, plots).", "",
             "| variant | status | step 10 | step 20 | final accuracy | first step at 90% | time to 90% | "
             "entropy, first 10 steps | clip fraction, mean | k3 KL at the end | wall time (training) | "
             "wall time (command) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['variant']} | {r['status']} | {fmt(r.get('accuracy_step_10'))} | "
                     f"{fmt(r.get('accuracy_step_20'))} | {fmt(r.get('final_accuracy'))} | "
                     f"{num(r.get('first_step_at_90'), 'd')} | {secs(r.get('time_to_90_s'))} | "
                     f"{num(r.get('entropy_first_10'), '.3f')} | {num(r.get('clipfrac_mean'), '.2%')} | "
                     f"{num(r.get('k3_kl_end'), '.2f')} | {secs(r.get('train_s'))} | {secs(r['wall_s'])} |")
    return lines


def overlay_over_time(run_dirs, labels, panels, figsize):
    """One panel per (metric, title), one line per run, against seconds of training (from the run's first
    logged row): held-out accuracy as its evaluations (dots), every other metric smoothed over 3 steps.
    Returns (plt, fig, axes) for the caller's own touches and saving (`save_overlay`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlx_rl.plots import load_run, moving_average

    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    for run_dir, label in zip(run_dirs, labels):
        run = load_run(run_dir, label)
        t0 = min((float(s.wall[0]) for s in run.series.values() if len(s.wall)), default=0.0)
        for ax, (metric, _) in zip(axes, panels):
            if metric in run.series:
                series = run.series[metric]
                if metric == "eval/accuracy":
                    ax.plot(series.wall - t0, series.values, label=label, lw=1.4, marker="o", ms=3)
                else:
                    ax.plot(series.wall - t0, moving_average(series.values, 3), label=label, lw=1.4)
    for ax, (metric, name) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("seconds of training", fontsize=9)
        ax.grid(alpha=0.3)
    return plt, fig, axes


def save_overlay(plt, fig, axes, path, title):
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_family(run_dirs, labels, path, title):
    """One figure, four panels, one line per run: held-out accuracy, entropy, completion length, clip fraction
    against seconds of training (from the first evaluation)."""
    panels = [("eval/accuracy", "held-out greedy accuracy"), ("policy/entropy", "entropy (nats per token)"),
              ("policy/completion_len", "completion length (tokens)"), ("policy/clipfrac", "clip fraction")]
    plt, fig, axes = overlay_over_time(run_dirs, labels, panels, figsize=(17, 3.6))
    for ax, (metric, _) in zip(axes, panels):
        if metric == "policy/completion_len":
            ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # from 0, with room above: a flat length stays visible
        ax.tick_params(labelsize=8)
    return save_overlay(plt, fig, axes, path, title)


def plot_distill(run_dirs, labels, path, title):
    """Two panels, one line per run, against seconds of training (from the first evaluation): held-out greedy
    accuracy, and the exact reverse KL to the teacher on the student's samples (on-policy runs only)."""
    panels = [("eval/accuracy", "held-out greedy accuracy"),
              ("distill/reverse_kl", "KL(student || teacher) on the student's samples (nats / token)")]
    plt, fig, axes = overlay_over_time(run_dirs, labels, panels, figsize=(11, 3.8))
    axes[0].set_ylim(0, 1.02)
    return save_overlay(plt, fig, axes, path, title)


def read_rows(run_dir):
    from mlx_rl.runs import read_jsonl

    return list(read_jsonl(Path(run_dir) / "metrics.jsonl"))


def plot_staleness(run_dirs, labels, path, title):
    """Held-out accuracy against GRPO steps, one line per (staleness, correction): solid without, dashed with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for run_dir, label in zip(run_dirs, labels):
        k = label.split(",")[0]
        colour = colours.setdefault(k, f"C{len(colours)}")
        points = [(r["step"], r["eval/accuracy"]) for r in read_rows(run_dir) if "eval/accuracy" in r]
        ax.plot(*zip(*points), color=colour, ls="-" if label.endswith("none") else "--", marker="o", ms=3, lw=1.4,
                label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pass_at_k_of(ckpt, task, json_path, ks=PASS_K):
    """pass@k of a checkpoint on the task's held-out prompts (`mlx-rl eval --pass-k ... --json`), or None."""
    p = subprocess.run(MLXRL + ["eval", "--model", str(ckpt), "--task", task, "--pass-k", ks, "--show-samples", "0", "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return None
    json_path.write_text(p.stdout)
    figures = json.loads(p.stdout)
    return {k: v for k, v in figures.items() if k.startswith("pass@") or k == "eval/accuracy"}


def pass_at_k_table(passes):
    ks = [f"pass@{k}" for k in PASS_K.split(",")]
    lines = ["| checkpoint | greedy accuracy | " + " | ".join(ks) + " |", "|---|---|" + "---|" * len(ks)]
    for name, figures in passes.items():
        figures = figures or {}
        cells = [f"{figures[k]:.1%}" if k in figures else "-" for k in ["eval/accuracy", *ks]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def icemaze_optimum(run_dir):
    """The best any policy can do on the run's held-out episodes (value iteration, same boards, same move limit)."""
    from mlx_rl.data.envs import IceMazeTask

    cfg = json.loads((run_dir / "config.json").read_text())
    task = IceMazeTask(cfg["map"], cfg["slippery"], cfg.get("max_turns", 0), seed=cfg["seed"])
    rows = task.heldout_rows(cfg["eval_prompts"], cfg["seed"])
    starts = [r for r in rows if r["kind"] == "start"]
    return {"all": task.optimal_success(rows), "start": task.optimal_success(starts)}


def first_eval_of_checkpoint(ckpt, task, json_path):
    """Held-out greedy accuracy of the starting checkpoint (the 'before' figure)."""
    p = subprocess.run(MLXRL + ["eval", "--model", str(ckpt), "--task", task, "--json"], capture_output=True,
                       text=True, cwd=ROOT)
    if p.returncode != 0:
        return None
    json_path.write_text(p.stdout)
    return json.loads(p.stdout).get("eval/accuracy")


if __name__ == "__main__":
    main()
