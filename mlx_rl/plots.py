"""Plots drawn from metrics.jsonl that a model builder can trust at a glance.

`mlx-rl plot RUN [RUN...]` draws one PNG per metric group (the prefix before the slash: `loss/…`,
`reward/…`, `eval/…`), runs overlaid, plus `time.png`: where each step's time goes, stacked by phase.
Chapters call `plot_run(run_path)` at the end of a run; `mlx-rl report` embeds the same figures.

What makes them trustworthy:
- Every panel is titled in words with its unit on the y axis, and the figure title names the chapter
  and the run. Names nobody has described yet still plot, titled with their own name.
- Shares (accuracies, clip fractions, success rates) are drawn on [0, 1], so 0.26 -> 0.31 looks as small as
  it is. `eval/accuracy` carries a 95% Wilson band for the number of held-out prompts.
- A series that never changes (`grpo/skipped` = 0, completion length on a fixed-length task) is folded
  into a note under the figure instead of taking a panel; a group with nothing else is a figure that is
  only its note. Held-out `eval/*` results are always drawn: a flat accuracy is a finding.
- Dense curves show the raw values faintly and a centred moving average on top; long runs are
  bucketed (min/max envelope + mean) so a 3000-step run draws in a few seconds.
- DPO's rounds are marked with vertical lines where `dpo/round` changes (margins restart each round).
- The step-0 evaluation (the model before training) is drawn as the first point.

The overwrite rule. A run directory's `plots/` also holds figures a chapter draws itself (Ice Maze's
`values.png`: learned V beside V*). Every figure this module writes carries a stamp in its PNG text
chunks (`mlx-rl-figure: generic`), and a generic figure only ever replaces a PNG that carries that
stamp. If the name is taken by a file without it, the figure goes to `<name>-curves.png` instead. So a
figure this module did not write is never touched, whatever order chapter and plot command run in.

Overlays. `mlx-rl plot A B` without `--out` writes into a folder beside the first run, named after the
runs: `<parent of A>/compare-A-vs-B/`. `--labels a,b` names the runs in legends (default: folder names).

X axes. `--x step`, `--x wall_s` (seconds since the run started), or `--x samples`: completions or pairs
seen, from the run's config (GRPO prompts_per_step x group_size, PPO rollout_batch, DPO batch_size pairs,
pretrain batch_size examples), so runs of different chapters are compared by data seen rather than by
steps that mean different things (a DPO step is 8 pairs, a GRPO step 256 completions). A run whose chapter
has no such figure keeps step. The default, `auto`, is step, or samples when the runs' chapters differ.
"""

import json
import math
import os
import re
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from mlx_rl.config import MlxRlError

STAMP_KEY, STAMP_VALUE = "mlx-rl-figure", "generic"
X_CHOICES = ("auto", "step", "wall_s", "samples")
MAX_POINTS = 1000  # longer series are bucketed to this many points before drawing
DPI = 100

# --- what a metric means: title in words, unit ------------------------------------------------------

# name -> (title, y-axis unit). Units starting with "share" mark a quantity in [0, 1].
METRICS = {
    "loss/cross_entropy": ("Cross-entropy on the answer tokens", "nats / token"),
    "loss/total": ("Total loss (the one differentiated)", "loss"),
    "loss/policy": ("Policy loss", "loss"),
    "loss/value": ("Value loss (icemaze: the baseline's)", "squared error"),
    "loss/kl": ("KL penalty term of the loss", "loss"),
    "loss/dpo": ("DPO preference loss", "nats / pair"),
    "loss/nll": ("NLL of the chosen answers", "nats / token"),
    "reward/mean": ("Mean reward of the sampled completions", "reward"),
    "reward/std": ("Reward spread of the sampled completions", "reward (std)"),
    "train/accuracy": ("Sampled completions exactly right", "share correct"),
    "eval/accuracy": ("Held-out accuracy (greedy)", "share correct"),
    "eval/prompts": ("Held-out prompts (or episodes) evaluated", "prompts"),
    "eval/accuracy_carry": ("Held-out accuracy on carry problems (the corpus errs)", "share correct"),
    "eval/accuracy_no_carry": ("Held-out accuracy on problems without a carry", "share correct"),
    "eval/accuracy_repeats": ("Held-out accuracy on lists with repeats (the corpus errs)", "share correct"),
    "eval/accuracy_distinct": ("Held-out accuracy on lists of distinct digits", "share correct"),
    "eval/reward": ("Held-out mean reward (greedy)", "reward"),
    "eval/reward_exact": ("Held-out answers exactly right (reward exact)", "share correct"),
    "eval/reward_chars": ("Held-out characters in their right place (reward chars)", "characters"),
    "reward/exact": ("Sampled completions exactly right (reward exact)", "share correct"),
    "reward/chars": ("Characters in their right place (reward chars)", "characters"),
    "policy/sampler_mismatch": ("Sampler vs trainer log-prob difference", "nats / token"),
    "policy/is_weight_mean": ("Sampler correction: weight pi_old / pi_sampler, mean", "weight"),
    "policy/is_weight_max": ("Sampler correction: weight pi_old / pi_sampler, largest", "weight"),
    "policy/is_masked_frac": ("Sampler correction: tokens the cap truncated or masked", "share of tokens"),
    "distill/reverse_kl": ("KL(student || teacher), exact over the vocabulary", "nats / token"),
    "distill/k1": ("KL(student || teacher), k1 estimate", "nats / token"),
    "distill/k3": ("KL(student || teacher), k3 estimate", "nats / token"),
    "optim/skipped_updates": ("Updates skipped for a non-finite value", "updates"),
    "dpo/round": ("On-policy round", "round"),
    "dapo/filtered_frac": ("Dynamic sampling: groups replaced for having no signal", "share of groups"),
    "dapo/refill_rounds": ("Dynamic sampling: refill rounds", "rounds"),
    "dapo/repeated_groups": ("Dynamic sampling: groups repeated to fill the batch", "groups"),
    "kl/k1": ("KL estimate k1", "nats / token"),
    "kl/k2": ("KL estimate k2", "nats / token"),
    "kl/k3": ("KL(policy || reference), k3 estimate", "nats / token"),
    "kl/exact": ("Exact KL", "nats / token"),
    "kl/sequence": ("KL summed over a completion", "nats / completion"),
    "kl/coef": ("KL coefficient", "coefficient"),
    "kl/approx": ("Policy change per update (approx. KL old -> new)", "nats / token"),
    "policy/entropy": ("Policy entropy on the sampled tokens", "nats / token"),
    "policy/clipfrac": ("Tokens where the ratio clip was active", "share of tokens"),
    "policy/ratio_mean": ("Probability ratio new / old, mean", "ratio"),
    "policy/ratio_min": ("Probability ratio new / old, minimum", "ratio"),
    "policy/ratio_max": ("Probability ratio new / old, maximum", "ratio"),
    "policy/completion_len": ("Completion length (EOS included)", "tokens"),
    "grpo/zero_signal_frac": ("Groups with no reward signal", "share of groups"),
    "grpo/skipped": ("Step skipped: no group had signal", "share of steps"),
    "grpo/group_reward_std": ("Reward spread within a group", "reward (std)"),
    "value/explained_variance": ("Value head: explained variance of returns", "1 = perfect, 0 = mean"),
    "value/mean": ("Value head prediction, mean", "return"),
    "value/return_mean": ("GAE return, mean", "return"),
    "value/advantage_mean": ("Advantage, mean (PPO: GAE; icemaze: A(s, a))", "advantage"),
    "value/advantage_std": ("GAE advantage, spread", "advantage (std)"),
    "value/clipfrac": ("Values where the value clip was active", "share of tokens"),
    "dpo/margin": ("Implicit reward margin, chosen - rejected", "beta * log-ratio"),
    "dpo/accuracy": ("Pairs ranked right (chosen above rejected)", "share of pairs"),
    "dpo/reward_chosen": ("Implicit reward of the chosen answer", "beta * log-ratio"),
    "dpo/reward_rejected": ("Implicit reward of the rejected answer", "beta * log-ratio"),
    "dpo/logp_chosen": ("Log-probability of the chosen answer", "nats / sequence"),
    "dpo/logp_rejected": ("Log-probability of the rejected answer", "nats / sequence"),
    "pairs/count": ("Pairs built in the round", "pairs"),
    "loss/bradley_terry": ("Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected)", "nats / pair"),
    "rm/accuracy": ("Training pairs ranked as the labeller did", "share of pairs"),
    "rm/margin": ("Reward margin, chosen - rejected", "reward"),
    "rm/chosen": ("Reward of the chosen answers", "reward"),
    "rm/rejected": ("Reward of the rejected answers", "reward"),
    "rm/epoch": ("Passes over the training pairs", "epoch"),
    "eval/pair_accuracy": ("Held-out pairs ranked as labelled", "share of pairs"),
    "eval/loss": ("Bradley-Terry loss", "nats / pair"),
    "eval/margin": ("Reward margin, chosen - rejected", "reward"),
    "eval/calibration_error": ("Calibration error", "|predicted - observed|"),
    "eval/prefers_longer": ("The longer answer scores higher", "share of pairs"),
    "eval/verifier_agreement": ("Ranked as the verifier would", "share of pairs"),
    "eval/pair_accuracy_same_length": ("Pairs of one length: as labelled", "share of pairs"),
    "eval/pair_accuracy_different_length": ("Pairs of two lengths: as labelled", "share of pairs"),
    "eval/reward_rm": ("Learned reward (reward model)", "reward (std units)"),
    "reward/rm": ("Learned reward of the sampled completions", "reward (std units)"),
    "pairs/skipped_prompts": ("Prompts with no pair (all samples tied)", "prompts"),
    "pairs/chosen_correct": ("Chosen answers exactly right", "share of pairs"),
    "optim/lr": ("Learning rate", "learning rate"),
    "optim/grad_norm": ("Gradient norm before clipping", "L2 norm"),
    "perf/tokens_per_s": ("Throughput", "tokens / s"),
    "perf/peak_memory_gb": ("Peak MLX memory", "GB"),
    "env/return": ("Episode return (discounted)", "return"),
    "env/length": ("Episode length", "moves"),
    "env/success": ("Success rate (behaviour policy)", "share of episodes"),
    "policy/epsilon": ("Exploration rate epsilon", "share of moves"),
    "optim/alpha": ("TD step size alpha", "step size"),
    "loss/td_error": ("TD error", "value"),
    "loss/bellman_error": ("Bellman residual (largest change of V)", "value"),
    "value/v_start": ("V of the start square", "value"),
    "value/advantage_taken": ("Advantage of the actions taken", "value"),
}

GROUPS = {  # in the order the figures are listed: what was learned first, then how
    "eval": "Held-out evaluation", "reward": "Reward of the sampled completions", "train": "Training samples",
    "loss": "Losses", "kl": "KL divergence", "policy": "Policy", "grpo": "GRPO signal",
    "value": "Value head", "distill": "Distillation", "dpo": "DPO implicit rewards", "dapo": "DAPO dynamic sampling", "pairs": "Preference pairs", "rm": "Reward model (training pairs)", "optim": "Optimiser",
    "perf": "Throughput and memory", "time": "Where the time goes", "env": "Episodes",
    "misc": "Other metrics",
}

CHAPTERS = {"icemaze": "Ice Maze", "pretrain": "Pretraining", "kl": "KL estimators", "grpo": "GRPO",
            "ppo": "PPO", "dpo": "DPO", "distill": "Distillation", "reward-model": "Reward model"}

# What one step of each chapter consumes, for --x samples: (config keys multiplied, unit in words).
SAMPLES_PER_STEP = {
    "grpo": (("prompts_per_step", "group_size"), "completions"),
    "ppo": (("rollout_batch",), "completions"),
    "dpo": (("batch_size",), "pairs"),
    "distill": (("prompts_per_step",), "completions"),
    "reward-model": (("batch_size",), "pairs"),
    "pretrain": (("batch_size",), "corpus examples"),
}
# Chapters whose `step` counts something other than updates.
STEP_MEANS = {"icemaze": "episode", "kl": "samples per estimate"}

# Phases that happen only at some steps: drawn apart from the per-step stack.
INTERMITTENT_PHASES = {"eval", "save"}
# One colour per phase everywhere (figures and report), so "generate" is always the same blue.
PHASE_COLOURS = {
    "generate": "#4e79a7", "reward": "#f28e2b", "reference": "#e15759", "forward_backward": "#76b7b2",
    "optimizer": "#59a14f", "update": "#2e6b30", "data": "#edc948", "allreduce": "#b07aa1",
    "value": "#ff9da7", "score": "#9c755f", "advantages": "#bab0ac", "eval": "#8cd17d", "save": "#d4a6c8",
    "teacher": "#e15759",
}
OTHER_COLOURS = ["#86bcb6", "#f1ce63", "#a0cbe8", "#ffbe7d", "#d37295", "#fabfd2", "#b6992d", "#499894"]

SHARE_WORDS = re.compile(r"(accuracy|frac|success|correct|(^|_)rate($|_))")


def describe(name):
    """(title in words, y-axis unit) of a metric; unknown names are titled with themselves."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith("time/"):
        return f"Time in {phase_of(name).replace('_', ' ')}", "seconds / step"
    group, _, tail = name.partition("/")
    base = name.removesuffix("_std")
    if base != name and base in METRICS:  # kl/k1_std: the spread of kl/k1 across trials
        title, unit = METRICS[base]
        return f"{title}: spread (std)", unit
    if group == "eval" and tail.startswith("accuracy_"):  # eval splits: eval/accuracy_<kind>
        return f"Held-out accuracy (greedy): {tail[len('accuracy_'):].replace('_', ' ')}", "share correct"
    if group in ("eval", "reward") and tail.startswith("reward_") or group == "reward" and tail not in ("mean", "std"):
        reward = tail.removeprefix("reward_")  # a reward of the task's, by its name: eval/reward_format, reward/format
        where = "Held-out reward (greedy)" if group == "eval" else "Reward of the sampled completions"
        return f"{where}: {reward.replace('_', ' ')}", "reward"
    if SHARE_WORDS.search(tail or group):
        return name, "share"
    return name, "seconds" if name.endswith("_s") else "value"


def is_share(name):
    """Does the name say the quantity lies in [0, 1] (an accuracy, a fraction, a rate)?"""
    unit = describe(name)[1]
    return unit.startswith("share")


def heldout_count(run):
    """How many held-out prompts (or episodes) each evaluation scored: logged as eval/prompts (fewer than
    --eval-prompts when the data has fewer held-out rows); older runs: the configured --eval-prompts."""
    logged = run.series.get("eval/prompts")
    if logged is not None and len(logged.values) and is_number(logged.values[-1]) and logged.values[-1] > 0:
        return int(logged.values[-1])
    n = run.config.get("eval_prompts")
    return int(n) if is_number(n) and n > 0 else None


def phase_of(name):
    """time/forward_backward_s -> forward_backward"""
    return name[len("time/"):].removesuffix("_s")


def group_of(name):
    return name.split("/")[0] if "/" in name else "misc"


# --- reading a run --------------------------------------------------------------------------------


def read_jsonl_tolerant(path):
    """(rows, bad_lines): JSON objects of a .jsonl file, skipping lines that do not parse.

    A run killed mid-write leaves a torn last line; plotting and reports must still work on it
    (mlx_rl.runs.read_jsonl raises on such a line, which is right for --resume, wrong here).
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Series:
    steps: np.ndarray  # (N,) step of each logged value
    wall: np.ndarray  # (N,) seconds since the run started
    values: np.ndarray  # (N,)


@dataclass
class RunData:
    """One run directory, read once: config, metric series and what its x axes mean."""

    path: Path
    label: str
    config: dict
    rows: list
    series: dict = field(default_factory=dict)  # metric name -> Series
    bad_lines: int = 0

    @property
    def command(self):
        return self.config.get("command")

    @property
    def chapter(self):
        return CHAPTERS.get(self.command, self.command or "run")

    @property
    def title(self):
        return f"{self.chapter} · {self.label}"

    @property
    def samples_per_step(self):
        """(completions or pairs per step, unit) from the config, or (None, None) if unknown."""
        keys, unit = SAMPLES_PER_STEP.get(self.command, ((), None))
        if not keys or not all(is_number(self.config.get(k)) for k in keys):
            return None, None
        return math.prod(self.config[k] for k in keys), unit

    def x_of(self, steps, wall, x):
        """x values for the chosen axis; --x samples falls back to step where unknown."""
        if x == "wall_s":
            return wall
        per_step, _ = self.samples_per_step
        if x == "samples" and per_step:
            return steps * per_step
        return steps

    def x_label(self, x):
        if x == "wall_s":
            return "seconds since start"
        per_step, unit = self.samples_per_step
        if x == "samples" and per_step:
            return f"{unit} seen ({per_step} per step)"
        step = STEP_MEANS.get(self.command, "step")
        return step if x == "step" else f"{step} (samples per step unknown for {self.chapter})"


def load_run(run_path, label=None):
    """Read a run directory; an empty or missing metrics.jsonl is a user error (one line, no traceback)."""
    path = Path(run_path)
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise MlxRlError(f"{run_path}: no such run directory")
    if not metrics.exists():
        raise MlxRlError(f"{run_path} is not a run directory (no metrics.jsonl)")
    rows, bad = read_jsonl_tolerant(metrics)
    rows = [r for r in rows if is_number(r.get("step"))]
    if not rows:
        raise MlxRlError(f"{metrics} has no metric rows yet: nothing to plot")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    if not isinstance(config, dict):
        config = {}
    run = RunData(path=path, label=label or path.resolve().name, config=config, rows=rows, bad_lines=bad)
    columns = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "wall_s") and is_number(v):
                columns.setdefault(k, []).append((row["step"], row.get("wall_s", math.nan), v))
    for k, triples in columns.items():
        a = np.asarray(triples, dtype=float)  # (N, 3): step, wall_s, value
        run.series[k] = Series(a[:, 0], a[:, 1], a[:, 2])
    return run


def load_runs(run_paths, labels=None):
    if labels is not None and len(labels) != len(run_paths):
        raise MlxRlError(f"--labels names {len(labels)} runs but {len(run_paths)} were given")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(run_paths)]
    seen = {}
    for r in runs:  # legends and tables key on the label: two runs named "pretrain" become "pretrain (2)"
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} ({seen[r.label]})"
    return runs


def parse_labels(text):
    return [s.strip() for s in text.split(",")] if text else None


# --- helpers for the drawing ----------------------------------------------------------------------


def is_constant(values):
    """At least two values and all the same (to float noise): nothing to see in a panel."""
    if len(values) < 2:
        return False
    return float(np.ptp(values)) <= 1e-9 * max(1.0, float(np.abs(values).max()))


def fmt(v, share=False):
    if share:
        return f"{v:.1%}"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def moving_average(ys, window):
    """Centred moving average (edges average over what exists), so the smooth curve does not lag."""
    if window <= 1:
        return ys
    kernel = np.ones(window)
    num = np.convolve(ys, kernel, mode="same")
    den = np.convolve(np.ones_like(ys), kernel, mode="same")
    return num / den


def bucket(xs, ys, n=MAX_POINTS):
    """(x, mean, min, max) over n equal buckets of a long series: fast to draw, spikes kept in min/max."""
    starts = np.unique(np.linspace(0, len(xs), n + 1).astype(int)[:-1])  # (n,) first index of each bucket
    counts = np.diff(np.append(starts, len(xs)))
    mean = lambda v: np.add.reduceat(v, starts) / counts  # noqa: E731
    return mean(xs), mean(ys), np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)


def wilson(p, n, z=1.96):
    """95% Wilson interval of a proportion p over n trials (sane near 0 and 1, unlike p +- 2 SE)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def round_boundaries(run, x):
    """[(x, round number from 1)]: halfway between the last step of a round and the first of the next.

    Any `*/round` metric counts (DPO's `dpo/round`, 0-based); the first round has no line.
    """
    name = next((k for k in sorted(run.series) if k.endswith("/round")), None)
    if name is None:
        return []
    s = run.series[name]
    xs = run.x_of(s.steps, s.wall, x)
    cut = np.nonzero(np.diff(s.values) != 0)[0]
    return [((float(xs[i]) + float(xs[i + 1])) / 2, int(s.values[i + 1]) + 1) for i in cut]


def runs_title(runs):
    """ "GRPO · grpo-a vs DPO · dpo-b" (a label that is the chapter's name is not said twice)."""
    return " vs ".join(r.chapter if r.label.lower() == r.chapter.lower() else r.title for r in runs)


def figure_title(group_title, runs):
    return f"{group_title} — {runs_title(runs)}"


def figure_style():
    import matplotlib

    matplotlib.use("Agg")
    return {
        "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.labelsize": 9,
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
        "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8, "legend.frameon": False,
        "figure.facecolor": "white", "axes.prop_cycle": matplotlib.cycler(color=[
            "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]),
    }


@dataclass
class Drawn:
    """A figure and what it shows, so tests and the report can check it without reading pixels."""

    stem: str  # file name without .png
    fig: object
    title: str = ""
    axes: dict = field(default_factory=dict)  # metric (or panel) name -> matplotlib Axes
    constant: dict = field(default_factory=dict)  # metric -> {run label: value}
    round_lines: dict = field(default_factory=dict)  # run label -> [x, ...]
    notes: list = field(default_factory=list)


# --- the metric-group figures ---------------------------------------------------------------------


def _draw_series(ax, run, name, x, colour, label, single, ls="-"):
    s = run.series[name]
    xs, ys = run.x_of(s.steps, s.wall, x), s.values
    sparse = len(ys) <= 60 or name.startswith("eval/")
    if sparse:
        ax.plot(xs, ys, ls, marker="o", color=colour, lw=1.5, ms=3.5, label=label, clip_on=False, zorder=3)
        if name == "eval/accuracy" and heldout_count(run):
            lo, hi = wilson(ys, heldout_count(run))
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0)
        if single and name.startswith("eval/") and len(ys) >= 2:  # the before -> after a reader looks for
            # inside the axes, in the right-hand corner away from where the curve ends
            share = is_share(name)
            lo_y, hi_y = (0.0, 1.0) if share else (min(ys), max(ys))
            rose = hi_y == lo_y or (ys[-1] - lo_y) / (hi_y - lo_y) >= 0.5  # ends high: the bottom corner is free
            ax.text(0.98, 0.04 if rose else 0.96, f"{fmt(ys[0], share)} → {fmt(ys[-1], share)}", transform=ax.transAxes,
                    ha="right", va="bottom" if rose else "top", fontsize=8.5, color="#333", zorder=5,
                    bbox=dict(facecolor="white", alpha=0.85, edgecolor="none", pad=1.5))
        return
    if len(ys) > MAX_POINTS:
        bx, mean, lo, hi = bucket(xs, ys)
        ax.fill_between(bx, lo, hi, color=colour, alpha=0.25, lw=0)
        ax.plot(bx, moving_average(mean, max(1, len(mean) // 100)), ls, color=colour, lw=1.4, label=label)
    else:
        ax.plot(xs, ys, ls, color=colour, lw=0.8, alpha=0.35)
        ax.plot(xs, moving_average(ys, max(1, len(ys) // 50)), ls, color=colour, lw=1.6, label=label)


# Metrics read together share a panel: a ratio's mean with its extremes, DPO's chosen with its rejected.
FAMILIES = [(("_mean", "-", "mean"), ("_min", ":", "min"), ("_max", "--", "max")),
            (("_chosen", "-", "chosen"), ("_rejected", "--", "rejected"))]
COUNT_UNITS = {"tokens", "moves", "pairs", "prompts", "GB"}


def panels_of(names):
    """[[(name, linestyle, role)], ...]: one panel per metric, families (see FAMILIES) sharing one."""
    panels, used = [], set()
    for name in names:
        if name in used:
            continue
        panel = [(name, "-", None)]
        for family in FAMILIES:
            suffix = next((f for f in family if name.endswith(f[0])), None)
            if suffix is None:
                continue
            stem = name[: -len(suffix[0])]
            members = [(stem + sfx, ls, role) for sfx, ls, role in family if stem + sfx in names]
            if len(members) > 1:
                panel = members
            break
        used.update(m[0] for m in panel)
        panels.append(panel)
    return panels


def panel_title(panel):
    if len(panel) == 1:
        return describe(panel[0][0])
    title, unit = describe(panel[0][0])
    stem = title.rsplit(",", 1)[0] if "," in title else title
    if panel[0][2] == "chosen":
        stem = title.replace(" of the chosen answer", "").replace("chosen", "").strip()
        return f"{stem}: chosen vs rejected", unit
    return f"{stem} ({', '.join(role for _, _, role in panel)})", unit


def group_figure(runs, group, names, x="step"):
    """One figure for a metric group: a panel per varying metric, constants in a note, rounds marked."""
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = Drawn(stem=group, fig=None)
    varying = []
    for name in names:
        present = [r for r in runs if name in r.series]
        if name.endswith("/round"):  # drawn as vertical lines in every panel instead
            continue
        # A held-out result is drawn even when flat: "accuracy stayed at 0%" is the finding, on [0, 1].
        if not name.startswith("eval/") and all(is_constant(r.series[name].values) for r in present):
            drawn.constant[name] = {r.label: float(r.series[name].values[0]) for r in present}
        else:
            varying.append(name)
    if not varying:  # the figure is only its note: the file is where a reader looks ("reward stuck at 0")

        drawn.title = figure_title(GROUPS.get(group, group), runs)
        text = "\n".join(textwrap.fill(n, 120) for n in _notes(drawn, runs, group))
        height = 0.62 + 0.2 * (text.count("\n") + 1)
        drawn.fig = plt.figure(figsize=(9.2, height))
        drawn.fig.suptitle(drawn.title, x=0.01, y=1 - 0.12 / height, ha="left", va="top", fontsize=12, fontweight="bold")
        drawn.fig.text(0.01, 1 - 0.5 / height, text, ha="left", va="top", fontsize=9, color="#333")
        return drawn
    panels = panels_of(varying)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows + 0.9), squeeze=False)
    drawn.fig = fig
    single = len(runs) == 1
    rounds = {r.label: round_boundaries(r, x) for r in runs}
    drawn.round_lines = {label: [bx for bx, _ in b] for label, b in rounds.items() if b}
    for ax, panel in zip(axes.flat, panels):
        title, unit = panel_title(panel)
        for i, r in enumerate(runs):
            for name, ls, role in panel:
                if name in r.series:
                    label = " ".join(t for t in (None if single else r.label, role) if t) or None
                    _draw_series(ax, r, name, x, colours[i % len(colours)], label, single, ls)
        for i, r in enumerate(runs):
            if not any(n in r.series for n, _, _ in panel):
                continue  # a DPO run's rounds mean nothing in a GRPO-only panel
            for bx, number in rounds[r.label]:
                ax.axvline(bx, color=colours[i % len(colours)] if not single else "#777", ls="--", lw=0.9, alpha=0.7)
                if ax is axes.flat[0] and single:
                    ax.text(bx, 1.0, f" round {number}", transform=ax.get_xaxis_transform(), fontsize=7,
                            va="top", color="#555")
        values = np.concatenate([r.series[n].values for r in runs for n, _, _ in panel if n in r.series])
        if values.min() < 0 < values.max():  # margins, advantages: which side of zero matters
            ax.axhline(0, color="#999", lw=0.8, zorder=1)
        if all(is_share(n) for n, _, _ in panel) and values.min() >= -1e-9 and values.max() <= 1 + 1e-9:
            ax.set_ylim(0, 1)  # a share is read against its whole range: 0.26 -> 0.31 is small
            ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
        elif unit in COUNT_UNITS and values.min() >= 0:
            ax.set_ylim(0, values.max() * 1.1)  # counts start at zero: 3.98 vs 4 tokens is no change
        elif unit.startswith("nats") and group == "loss" and values.min() > 0 and values.max() > 20 * values.min():
            ax.set_yscale("log")  # cross-entropy falling 5 -> 0.1: on a linear axis the last 90% of training is flat
        ax.set_title(textwrap.fill(title, 52), loc="left")  # a long title takes two lines, not its neighbour's
        ax.set_ylabel(unit)
        ax.set_xlabel(_x_label(runs, x))
        if STEP_MEANS.get(runs[0].command) == "samples per estimate" and x == "step":
            ax.set_xscale("log")
        elif x != "wall_s":
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # no step 2.5
        if len(panel) > 1 or (not single and ax is axes.flat[0]):
            ax.legend(loc="best")
        for name, _, _ in panel:
            drawn.axes[name] = ax
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    drawn.title = figure_title(GROUPS.get(group, group), runs)
    _finish(fig, drawn.title, _notes(drawn, runs, group))
    return drawn


def _x_label(runs, x):
    labels = {r.x_label(x) for r in runs}
    if len(labels) == 1:
        return labels.pop()
    units = sorted({r.samples_per_step[1] or "steps" for r in runs}) if x == "samples" else []
    return f"samples seen ({', '.join(units)})" if units else x.replace("_", " ")


def _notes(drawn, runs, group):
    notes = list(drawn.notes)
    if drawn.constant:
        parts = []
        for name, by_run in drawn.constant.items():
            share = is_share(name)
            vals = sorted({fmt(v, share) for v in by_run.values()})
            parts.append(f"{describe(name)[0]} ({name}) = {' / '.join(vals)}")
        notes.append("Constant over the run, not drawn: " + "; ".join(parts) + ".")
    if drawn.round_lines:
        notes.append("Dashed lines: a new DPO round (fresh pairs from the current policy).")
    if group == "eval" and any("eval/accuracy" in r.series and heldout_count(r) for r in runs):
        n = sorted({str(heldout_count(r)) for r in runs if "eval/accuracy" in r.series and heldout_count(r)})
        step0 = any("eval/accuracy" in r.series and r.series["eval/accuracy"].steps[0] == 0 for r in runs)
        notes.append(f"Band: 95% Wilson interval over {'/'.join(n)} held-out prompts"
                     + ("; step 0 is the model before training." if step0 else "."))
    if any(len(r.series[m].values) > 60 for r in runs for m in drawn.axes if m in r.series):
        notes.append("Faint: raw values (or min-max per bucket on long runs); solid: centred moving average.")
    for r in runs:
        if r.bad_lines:
            notes.append(f"{r.label}: skipped {r.bad_lines} malformed line(s) of metrics.jsonl.")
    return notes


def _finish(fig, title, notes):
    """Figure title on top, notes at the bottom, panels laid out in between."""

    width_in = fig.get_size_inches()[0]
    chars = int(width_in * 15)
    text = "\n".join(textwrap.fill(n, chars) for n in notes)
    lines = text.count("\n") + 1 if text else 0
    height_in = fig.get_size_inches()[1]
    bottom = (0.12 + 0.16 * lines) / height_in if lines else 0.0
    fig.suptitle(title, x=0.01, ha="left", fontsize=12, fontweight="bold")
    fig.tight_layout(rect=(0, bottom, 1, 1))  # tight_layout leaves room for the suptitle itself
    if text:
        fig.text(0.01, 0.06 / height_in, text, ha="left", va="bottom", fontsize=8, color="#444")


# --- where the time goes ----------------------------------------------------------------------------


def phase_table(rows, skip_first=1):
    """{phase: {"mean_s", "total_s", "share"}}: where a run's time goes, one definition for `mlx-rl profile` and
    the report's table.

    Training steps only: the step-0 row (the evaluation before training) is not a step and is left out, and so
    is the first step (it compiles the update). Eval and save are averaged over those steps: their cost per step
    of the run, not per evaluation.
    """
    steps = [r for r in rows if isinstance(r.get("step"), int) and r["step"] > 0]
    steps = steps[skip_first:] or steps
    totals = {}
    for row in steps:
        for k, v in row.items():
            if k.startswith("time/") and is_number(v):
                totals[phase_of(k)] = totals.get(phase_of(k), 0.0) + v
    grand = sum(totals.values()) or 1.0
    return {p: {"mean_s": t / len(steps), "total_s": t, "share": t / grand}
            for p, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def phase_colours(phases):
    others = iter(OTHER_COLOURS * 4)
    return {p: PHASE_COLOURS.get(p) or next(others) for p in phases}


def _steady_phases(run):
    """Phases logged on most steps (drawn stacked), apart from eval/save (intermittent)."""
    steps = [r for r in run.rows if r.get("step", 0) > 0]
    counts = {}
    for r in steps:
        for k, v in r.items():
            if k.startswith("time/") and is_number(v):
                counts[phase_of(k)] = counts.get(phase_of(k), 0) + 1
    return [p for p, c in counts.items() if p not in INTERMITTENT_PHASES and c >= 0.5 * len(steps)]


def time_figure(runs, x="step"):
    """Stacked time per phase per step (ms), and the mean split per step (eval and save amortised)."""
    import matplotlib.pyplot as plt

    drawn = Drawn(stem="time", fig=None)
    tables = {r.label: phase_table(r.rows) for r in runs}
    if not any(tables.values()):
        return drawn
    steady = {r.label: _steady_phases(r) for r in runs}
    # every phase gets a colour, also one seen only on the (skipped) first step of a short run
    all_phases = list(dict.fromkeys([p for t in tables.values() for p in t] + [p for v in steady.values() for p in v]))
    colours = phase_colours(all_phases)
    single = len(runs) == 1
    ncols = len(runs) + 1
    fig, axes = plt.subplots(1, ncols, figsize=(min(5.2 * ncols, 17), 4.4 if single else 4.9), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] * len(runs) + [1.25 if single else 1.0 + 0.15 * len(runs)]})
    drawn.fig = fig
    for ax, r in zip(axes.flat, runs):
        phases = sorted(steady[r.label], key=lambda p: -tables[r.label].get(p, {}).get("total_s", 0))
        steps = [row for row in r.rows if row.get("step", 0) > 0]
        if not phases or not steps:
            ax.axis("off")
            continue
        st = np.array([row["step"] for row in steps], dtype=float)
        wall = np.array([row.get("wall_s", math.nan) for row in steps], dtype=float)
        xs = r.x_of(st, wall, x)
        stack = np.array([[1000 * row.get(f"time/{p}_s", 0.0) for row in steps] for p in phases])  # (P, N) ms
        total = stack.sum(axis=0)  # (N,)
        # The first step compiles and can be 10x the rest: keep the scale for the steady state.
        rest = total[1:] if len(total) > 2 else total
        top = float(np.percentile(rest, 99)) * 1.25
        worst = int(total.argmax())
        outlier = (int(st[worst]), float(total[worst])) if total[worst] > 2 * top > 0 else None
        if len(xs) > MAX_POINTS:  # bucket means: the area (time spent) is kept, the drawing stays fast
            stack = np.stack([bucket(xs, s)[1] for s in stack])
            xs = bucket(xs, xs)[1]
        ax.stackplot(xs, stack, colors=[colours[p] for p in phases], labels=[p.replace("_", " ") for p in phases],
                     alpha=0.9, lw=0)
        if outlier:
            ax.set_ylim(0, top)
            ax.annotate(f"step {outlier[0]}: {outlier[1]:.0f} ms, off scale", xy=(0.99, 0.985), ha="right",
                        xycoords="axes fraction", va="top", fontsize=7, color="#555")
        ax.set_title(f"Time per step by phase{'' if single else ': ' + r.label}", loc="left")
        ax.set_ylabel("ms / step")
        ax.set_xlabel(r.x_label(x))
        ax.set_xlim(xs.min(), xs.max()) if len(xs) > 1 else None
        drawn.axes[f"stack:{r.label}"] = ax
    ax = axes.flat[-1]
    if single:
        table = tables[runs[0].label]
        names = list(table)[::-1]
        ms = [1000 * table[p]["mean_s"] for p in names]
        ax.barh([p.replace("_", " ") for p in names], ms, color=[colours[p] for p in names])
        for yi, p in enumerate(names):
            ax.text(ms[yi], yi, f"  {ms[yi]:.1f} ms · {table[p]['share']:.0%}", va="center", fontsize=7.5)
        ax.set_xlim(0, max(ms) * 1.45 if ms else 1)
        ax.set_title("Mean per step (eval, save amortised)", loc="left")
    else:
        labels = [r.label for r in runs][::-1]
        left = np.zeros(len(labels))
        for p in all_phases:
            ms = np.array([1000 * tables[lab].get(p, {}).get("mean_s", 0.0) for lab in labels])
            ax.barh(labels, ms, left=left, color=colours[p], label=p.replace("_", " "))
            left += ms
        for yi, v in enumerate(left):
            ax.text(v, yi, f" {v:.0f} ms", va="center", fontsize=7.5)
        ax.set_xlim(0, left.max() * 1.25 if left.max() > 0 else 1)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
        ax.set_title("Mean time per step (eval, save amortised)", loc="left")
    ax.set_xlabel("ms / step")
    ax.grid(axis="y", alpha=0)
    drawn.axes["split"] = ax
    notes = ["First training step skipped in the means (compilation), as in `mlx-rl profile`."]
    apart = []
    for r in runs:
        names = [p.replace("_", " ") for p in tables[r.label] if p not in steady[r.label]]
        if names:
            apart.append(", ".join(names) if single else f"{r.label}: {', '.join(names)}")
    if apart:
        notes.append(f"Run only at some steps (eval points, round starts), so not stacked: {'; '.join(apart)}. "
                     "The bars spread them over all steps.")
    drawn.title = figure_title(GROUPS["time"], runs)
    _finish(fig, drawn.title, notes)
    return drawn


# --- every figure of a set of runs ----------------------------------------------------------------


def resolve_x(runs, x):
    """"auto": step for runs of one chapter; samples when chapters differ (their steps are not comparable)."""
    if x not in X_CHOICES:
        raise MlxRlError(f"--x must be one of {', '.join(X_CHOICES)}, not {x!r}")
    if x == "auto":
        return "samples" if len({r.command for r in runs}) > 1 else "step"
    return x


def draw(runs, x="auto"):
    """All figures for the runs (RunData list): [Drawn] in file order; close them with close_all."""
    import matplotlib.pyplot as plt

    x = resolve_x(runs, x)
    groups = {}
    for r in runs:
        for name in r.series:
            if not name.startswith("time/"):
                groups.setdefault(group_of(name), set()).add(name)
    out = []
    with plt.rc_context(figure_style()):
        order = [g for g in GROUPS if g in groups] + sorted(g for g in groups if g not in GROUPS)
        for group in order:
            known = [m for m in METRICS if m in groups[group]]  # the table's order: main metric first
            out.append(group_figure(runs, group, known + sorted(groups[group] - set(known)), x))
        if any(k.startswith("time/") for r in runs for k in r.series):
            out.append(time_figure(runs, x))
    return out


def close_all(drawn):
    import matplotlib.pyplot as plt

    for d in drawn:
        if d.fig is not None:
            plt.close(d.fig)


def constant_notes(drawn):
    """{metric: {run: value}} of every series folded into a note (for the CLI and the report)."""
    out = {}
    for d in drawn:
        out.update(d.constant)
    return out


# --- writing files: the overwrite rule ------------------------------------------------------------


def png_text(path):
    """The tEXt chunks of a PNG as a dict ({} if not a readable PNG)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return {}
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return {}
    out, i = {}, 8
    while i + 8 <= len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        body = data[i + 8:i + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            k, v = body.split(b"\0", 1)
            out[k.decode("latin-1")] = v.decode("latin-1")
        elif kind == b"zTXt" and b"\0" in body:
            k, v = body.split(b"\0", 1)
            try:
                out[k.decode("latin-1")] = zlib.decompress(v[1:]).decode("latin-1")
            except zlib.error:
                pass
        elif kind == b"IEND":
            break
        i += 12 + length
    return out


def is_generic_figure(path):
    return png_text(path).get(STAMP_KEY) == STAMP_VALUE


def target_path(out_dir, stem):
    """Where a generic figure `stem` may be written: its own name unless a foreign file holds it."""
    path = out_dir / f"{stem}.png"
    n = 0
    while path.exists() and not is_generic_figure(path):
        n += 1
        path = out_dir / f"{stem}-curves{'' if n == 1 else f'-{n}'}.png"
    return path


def save(drawn, out_dir):
    """Write the figures (stamped, atomically) under out_dir; returns [(path, displaced foreign file or None)]."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for d in drawn:
        if d.fig is None:
            continue
        path = target_path(out_dir, d.stem)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        d.fig.savefig(tmp, dpi=DPI, format="png", metadata={STAMP_KEY: STAMP_VALUE, "Software": "mlx-rl plot"})
        os.replace(tmp, path)
        foreign = out_dir / f"{d.stem}.png"
        written.append((path, foreign if path != foreign else None))
    return written


def overlay_dir(run_paths):
    """Default folder for an overlay: beside the first run, named after the runs (compare-A-vs-B)."""
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", Path(p).resolve().name) for p in run_paths]
    name = "compare-" + "-vs-".join(names)
    if len(name) > 100:  # keep it a legal, readable file name; the hash keeps it unique
        digest = zlib.crc32("\0".join(str(Path(p).resolve()) for p in run_paths).encode())
        name = f"{name[:88]}-{digest:08x}"
    return Path(run_paths[0]).resolve().parent / name


def plot_runs(run_paths, out_dir=None, x="auto", labels=None):
    """Draw the runs' figures into out_dir (default: RUN/plots, or overlay_dir for several); returns the paths."""
    runs = load_runs(list(run_paths), labels)
    if out_dir is None:
        out_dir = Path(run_paths[0]) / "plots" if len(run_paths) == 1 else overlay_dir(run_paths)
    drawn = draw(runs, x)
    try:
        return [path for path, _ in save(drawn, out_dir)]
    finally:
        close_all(drawn)


def plot_run(run_path):
    """What chapters call at the end of a run: the generic figures into RUN/plots."""
    return plot_runs([run_path])


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="where to write: the folder for the PNGs (default: RUN/plots for one run; for several, a folder beside the "
                   "first run named compare-RUN1-vs-RUN2)")
@click.option("--x", "x", type=click.Choice(X_CHOICES), default="auto", show_default=True,
              help="x axis: step, wall_s (seconds), or samples (completions or pairs seen, from the config); "
                   "auto: step, or samples when the runs are of different chapters")
@click.option("--labels", default=None, help="comma-separated names for the runs in legends, e.g. grpo,control")
def cli(runs, out, x, labels):
    """Draw a run's curves, or overlay several runs (one PNG per metric group, plus time.png)."""
    data = load_runs(list(runs), parse_labels(labels))
    out_dir = Path(out) if out else Path(runs[0]) / "plots" if len(runs) == 1 else overlay_dir(runs)
    from mlx_rl.runs import check_writable_folder

    check_writable_folder(out_dir, "--out")  # a folder that can't be written: one line, before anything is drawn
    drawn = draw(data, x)
    try:
        for path, foreign in save(drawn, out_dir):
            click.echo(path)
            if foreign is not None:
                click.echo(f"  ({foreign.name} was not drawn by mlx-rl plot, so it was kept: a chapter's own figure, "
                           "or one from an older mlx-rl)")
    finally:
        close_all(drawn)
    for name, by_run in constant_notes(drawn).items():
        if all(name not in d.axes for d in drawn):
            values = ", ".join(f"{lab}={fmt(v, is_share(name))}" for lab, v in by_run.items())
            click.echo(f"constant, not drawn: {name} ({values})")
    for r in data:
        if r.bad_lines:
            click.echo(f"{r.label}: skipped {r.bad_lines} malformed line(s) of metrics.jsonl")
