"""The Python API: every command runs from Python as it does from the command line.

    from mlx_rl import api
    summary = api.grpo(task="addition", steps=20, out="runs/grpo-py")   # the summary.json dict
    run = api.Run(summary["run"])                                         # the run directory, opened
    run.metrics.column("reward/mean")                                     # (steps, values)

Settings are the command's flags as keyword arguments (`--group-size 4` is `group_size=4`),
checked the same way: a wrong type, a value out of bounds or an unknown name raises MlxRlError
with the same one line the CLI prints. A built-in task's own defaults apply as on the CLI, and
`config_file=` reads a YAML/JSON file of settings under the keywords given. Or build the
config yourself and run it:

    cfg = api.config("grpo", task="addition", steps=20)   # a GRPOConfig, checked
    cfg.group_size = 4
    summary = api.run(cfg)

The CLI is a thin layer over the same path: each command's flags become `given` for
`config.resolve`, and its config goes to the chapter's `train(cfg)`, which returns the
summary. `Run` reads a run directory back: config, metrics (a list of dicts with a column
accessor, no pandas), samples, plots, summary and checkpoint (runs.Run is the writer).
"""

from mlx_rl.engine import speed

speed.enable()  # OpenBLAS before MLX is imported (Linux); a no-op when already on

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

from mlx_rl.config import MlxRlError, resolve  # noqa: E402
from mlx_rl.runs import read_json, read_jsonl  # noqa: E402

TRAINING_COMMANDS = ("icemaze", "pretrain", "kl", "grpo", "ppo", "dpo", "distill", "reward-model", "label-pairs", "dpo-pairs",
                     "eval")


def command_of(name):
    """The click command `mlx-rl NAME` runs: it carries its config class and run function."""
    from mlx_rl.cli import COMMANDS

    name = name.replace("_", "-")
    if name not in TRAINING_COMMANDS:
        raise MlxRlError(f"no command '{name}' runs from a config (one of: {', '.join(TRAINING_COMMANDS)})")
    module = importlib.import_module(COMMANDS[name])
    return getattr(module, "cli_" + name.replace("-", "_"), None) or module.cli


def config(command, config_file=None, **settings):
    """The checked config `mlx-rl COMMAND` would run with, given these settings (flags as keywords)."""
    cmd = command_of(command)
    return resolve(cmd.name, cmd.config_class, settings, config_file)


def run(command_or_config, config_file=None, **settings):
    """Run a command (a name and settings, or a config dataclass) and return its summary dict.

    A config you built is checked as flags would be: every field that differs from its default
    counts as given (so a task's own defaults fill in the rest, as on the CLI).
    """
    if dataclasses.is_dataclass(command_or_config) and not isinstance(command_or_config, type):
        cfg = command_or_config
        name = next((n for n in TRAINING_COMMANDS if command_of(n).config_class is type(cfg)), None)
        if name is None:
            raise MlxRlError(f"{type(cfg).__name__} is not a command's config")
        given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != default_of(f)}
        cfg = config(name, config_file, **given, **settings)
    else:
        cfg = config(command_or_config, config_file, **settings)
    cmd = command_of(next(n for n in TRAINING_COMMANDS if command_of(n).config_class is type(cfg)))
    return cmd.run_config(cfg)


def default_of(f):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _chapter(name):
    def call(config_file=None, **settings):
        return run(name, config_file, **settings)

    call.__name__ = name.replace("-", "_")
    call.__doc__ = (f"`mlx-rl {name}` from Python: settings as keywords (the flags, with _ for -); "
                    "returns the summary dict (eval: the metrics).")
    return call


icemaze = _chapter("icemaze")
pretrain = _chapter("pretrain")
kl = _chapter("kl")
grpo = _chapter("grpo")
ppo = _chapter("ppo")
dpo = _chapter("dpo")
distill = _chapter("distill")
reward_model = _chapter("reward-model")
label_pairs = _chapter("label-pairs")
dpo_pairs = _chapter("dpo-pairs")
evaluate = _chapter("eval")


# --- a run directory, opened -------------------------------------------------------------------


class Column(typing.NamedTuple):
    """One metric over a run: the steps that logged it and its values there (None where it was NaN)."""

    steps: list
    values: list


class Metrics(list):
    """metrics.jsonl: a list of dicts, one per logged step, plus a column accessor.

        m = run.metrics
        m[-1]["reward/mean"]         # the last step's row, a dict
        m.column("reward/mean")      # Column(steps=[...], values=[...]): only the rows that logged it
        m["reward/mean"]             # the same Column
        m.names                      # every metric name logged
    """

    @property
    def names(self):
        return sorted({k for row in self for k in row if k != "step"})

    def column(self, name):
        if not any(name in row for row in self):
            raise KeyError(f"no metric '{name}' in this run (it has: {', '.join(self.names)})")
        rows = [row for row in self if name in row]
        return Column([row.get("step") for row in rows], [row[name] for row in rows])

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.column(key)
        return super().__getitem__(key)

    def last(self, name):
        """The last value logged for `name`."""
        return self.column(name).values[-1]


class Run:
    """A run directory opened as an object: `mlx_rl.Run("runs/grpo-...")`.

    config (dict: the resolved settings, as config.json), command, metrics (Metrics), samples (list
    of dicts), plots ({name: Path}), summary (dict, None while the run is unfinished), checkpoint
    (Path or None). Each is read from disk when asked for, so a run still training shows its latest.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MlxRlError(f"{self.path}: no such run directory")
        if not (self.path / "config.json").is_file():
            raise MlxRlError(f"{self.path}: not a run directory (no config.json)")

    def __repr__(self):
        status = (self.summary or {}).get("status", "unfinished")
        return f"Run({str(self.path)!r}: {self.command}, {len(self.metrics)} rows logged, {status})"

    @property
    def config(self):
        return read_json(self.path / "config.json", "run config")

    @property
    def command(self):
        return self.config.get("command")

    @property
    def metrics(self):
        return Metrics(read_jsonl(self.path / "metrics.jsonl"))

    @property
    def samples(self):
        return read_jsonl(self.path / "samples.jsonl")

    def samples_at(self, step=None):
        """The sample completions logged at `step` (default: the last step that logged any)."""
        samples = self.samples
        if step is None:
            step = max((s.get("step", 0) for s in samples), default=0)
        return [s for s in samples if s.get("step") == step]

    @property
    def summary(self):
        path = self.path / "summary.json"
        return read_json(path, "run summary") if path.is_file() else None

    @property
    def plots(self):
        return {p.stem: p for p in sorted((self.path / "plots").glob("*.png"))}

    @property
    def checkpoint(self):
        from mlx_rl.runs import find_checkpoint

        return find_checkpoint(self.path)

    def show(self, *names):
        """Display plots inline in a notebook (all of them, or those named); returns their paths."""
        plots = self.plots
        missing = [n for n in names if n not in plots]
        if missing:
            raise MlxRlError(f"{self.path}: no plot {', '.join(missing)} (it has: {', '.join(plots) or 'none'})")
        paths = [plots[n] for n in names] if names else list(plots.values())
        try:
            from IPython.display import Image, display
        except ImportError:
            return paths
        for p in paths:
            display(Image(filename=str(p)))
        return paths
