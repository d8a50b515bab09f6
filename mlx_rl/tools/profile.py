"""`mlx-rl profile RUN`: where does a run's time go? Seconds per phase, from metrics.jsonl.

The phase names are the same in every LLM chapter (docs/metrics.md): generate,
reward, reference, forward_backward, optimizer, allreduce, data, eval, save, ...
The step-0 row (the evaluation before training) is not a training step and is
left out, and so is the first step (it compiles the update).
"""

from pathlib import Path

import click

from mlx_rl.config import MlxRlError
from mlx_rl.runs import read_jsonl


def training_rows(run_path):
    path = Path(run_path) / "metrics.jsonl"
    if not Path(run_path).is_dir():
        raise MlxRlError(f"{run_path} is not a run directory")
    rows = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] > 0]
    if not rows:
        raise MlxRlError(f"{run_path} has no training steps in metrics.jsonl to profile")
    return rows


def phase_profile(run_path, skip_first=1):
    """{phase: {"mean_s", "total_s", "share"}} over a run's training steps (plots.phase_table: the report's too)."""
    from mlx_rl.plots import phase_table

    return phase_table(training_rows(run_path), skip_first)


@click.command("profile")
@click.argument("run", type=click.Path())
def cli(run):
    """Per-step timing profile of a run: mean milliseconds per phase and share of the total."""
    prof = phase_profile(run)
    steps = len(training_rows(run))
    per_step = sum(p["mean_s"] for p in prof.values())
    click.echo(f"{run}: {steps} training steps, {per_step * 1000:.1f} ms per step (the first step, which compiles, skipped)")
    click.echo(f"{'phase':<22}{'ms/step':>10}{'total s':>10}{'share':>8}")
    for name, p in prof.items():
        click.echo(f"{name:<22}{p['mean_s'] * 1000:>10.2f}{p['total_s']:>10.1f}{p['share']:>8.1%}")
