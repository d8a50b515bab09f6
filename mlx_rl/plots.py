"""Plots drawn from metrics.jsonl: one PNG per metric group, runs overlaid.

Metric names are grouped by their prefix (`loss/…`, `reward/…`, `eval/…`,
`time/…`), and each group becomes RUN/plots/<group>.png with one panel per
metric. `mlx-rl plot RUN [RUN...]` overlays several runs, e.g. GRPO beside the
continued-pretraining control.
"""

import math
from collections import defaultdict
from pathlib import Path

import click

from mlx_rl.config import MlxRlError
from mlx_rl.runs import read_jsonl

SKIP = {"step", "wall_s"}


def load_series(run_path):
    """{metric: ([x...], [y...])} from a run's metrics.jsonl (steps where the metric was logged)."""
    path = Path(run_path) / "metrics.jsonl"
    if not path.exists():
        raise MlxRlError(f"{run_path} is not a run directory (no metrics.jsonl)")
    series = defaultdict(lambda: ([], [], []))
    for row in read_jsonl(path):
        for k, v in row.items():
            if k in SKIP or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if isinstance(v, float) and math.isnan(v):
                continue
            xs, ys, ws = series[k]
            xs.append(row["step"])
            ys.append(v)
            ws.append(row.get("wall_s", 0.0))
    return dict(series)


def smooth(ys, window):
    if window <= 1 or len(ys) < 2 * window:
        return ys
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_paths, out_dir, x="step", labels=None):
    """Draw every metric group of the runs into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(labels[i] if labels else Path(p).name, load_series(p)) for i, p in enumerate(run_paths)]
    groups = defaultdict(set)
    for _, series in runs:
        for name in series:
            groups[name.split("/")[0] if "/" in name else "misc"].add(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, names in sorted(groups.items()):
        names = sorted(names)
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for label, series in runs:
                if name not in series:
                    continue
                steps, ys, walls = series[name]
                xs = walls if x == "wall_s" else steps
                window = max(1, len(ys) // 50) if group not in ("eval",) else 1
                line = ax.plot(xs, smooth(ys, window), label=label, lw=1.3)
                if len(ys) < 30:
                    ax.scatter(xs, ys, s=10, color=line[0].get_color())
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("seconds" if x == "wall_s" else "step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        if len(runs) > 1:
            axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_run(run_path):
    return plot_runs([run_path], Path(run_path) / "plots")


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="folder for the PNGs (default: RUN/plots for one run)")
@click.option("--x", "x", type=click.Choice(["step", "wall_s"]), default="step", show_default=True, help="x axis")
def cli(runs, out, x):
    """Draw a run's curves, or overlay several runs (one PNG per metric group)."""
    if out is None:
        if len(runs) > 1:
            raise MlxRlError("give --out DIR when overlaying several runs")
        out = Path(runs[0]) / "plots"
    for path in plot_runs(runs, out, x=x):
        click.echo(path)
