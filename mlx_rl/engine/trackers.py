"""`--log-to tensorboard|wandb|trackio`: a run's metrics, config and samples, also in the tracker you use.

The run directory stays the record (metrics.jsonl, samples.jsonl, config.json); a tracker gets a
copy of the same things under the same names, written by one hook in runs.Run (so every chapter
logs the same way, and no chapter knows trackers exist):

    Run.write_config  -> the resolved config       (TensorBoard: a text "config"; W&B / trackio: the run's config)
    Run.log           -> every numeric metric of the step, named as in metrics.jsonl (reward/mean, time/generate_s, ...)
    Run.log_samples   -> the sample completions as a table of text ("samples/eval": held-out; "samples/train")
    Run.write_summary -> the tracker run is finished and flushed

Where each writes:
    tensorboard  RUN/tensorboard/ (event files): `tensorboard --logdir runs/` shows every run
    wandb        W&B project $WANDB_PROJECT (default mlx-rl), run named after the run directory; its local
                 files in RUN/wandb/. WANDB_MODE=offline keeps it on this machine (`wandb sync` uploads later)
    trackio      trackio's local store (~/.cache/huggingface/trackio, or $TRACKIO_DIR), project
                 $TRACKIO_PROJECT (default mlx-rl): `trackio show` opens the dashboard

Each is an optional extra (`pip install 'mlx-rl[tensorboard]'`, `[wandb]`, `[trackio]`); a missing one is a
one-line error before anything is loaded. A resumed run continues its W&B run (the id is kept in
RUN/trackers.json) and its trackio run (by name); TensorBoard appends a new event file to the same folder.
"""

import json
import math
import os
import secrets
import time
from pathlib import Path

from mlx_rl.config import MlxRlError

KINDS = ("tensorboard", "wandb", "trackio")


def check(names):
    """A one-line error for a tracker whose package is not installed (before any model is loaded)."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise MlxRlError(f"--log-to {name} needs the {name} package: pip install 'mlx-rl[{name}]'") from None


def scalars(row):
    """The numeric metrics of a metrics.jsonl row (not `step`; NaN, written as null, and text left out)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def sample_table(rows):
    """(columns, data) of sample rows: every key in first-seen order, chat prompts as JSON text."""
    columns = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    cell = lambda v: v if isinstance(v, (int, float, str)) or v is None else json.dumps(v, ensure_ascii=False)  # noqa: E731
    return columns, [[cell(r.get(c)) for c in columns] for r in rows]


def markdown_table(rows):
    columns, data = sample_table(rows)
    text = lambda v: str(v).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(text(v) for v in row) + " |" for row in data])


def by_split(rows):
    """{"samples/eval": rows, "samples/train": rows}: held-out samples (no "split") and a chapter's training
    samples are logged under their own names (a step can log both)."""
    out = {}
    for r in rows:
        out.setdefault(f"samples/{r.get('split', 'eval')}", []).append(r)
    return out


class TensorBoard:
    def __init__(self, run_path, name, config, state):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(Path(run_path) / "tensorboard"))
        self.text(0, "config", "```\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```")

    def event(self, step, values):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary_pb2.Summary(value=values)))

    def text(self, step, tag, text):
        from tensorboard.plugins.text.summary_v2 import text_pb

        self.event(step, list(text_pb(tag, text).value))

    def log(self, step, row):
        from tensorboard.compat.proto import summary_pb2

        self.event(step, [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars(row).items()])

    def samples(self, step, rows):
        for tag, split in by_split(rows).items():
            self.text(step, tag, markdown_table(split))

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, run_path, name, config, state):
        import wandb

        state.setdefault("wandb_id", secrets.token_hex(4))  # kept in RUN/trackers.json: --resume continues it
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlx-rl"), name=name, dir=str(run_path),
                              config=config, id=state["wandb_id"], resume="allow", reinit="finish_previous")

    def log(self, step, row):
        self.run.log(scalars(row), step=int(step))

    def samples(self, step, rows):
        tables = {tag: self.wandb.Table(*sample_table(split)) for tag, split in by_split(rows).items()}
        self.run.log(tables, step=int(step))

    def close(self):
        self.run.finish()


class Trackio:
    def __init__(self, run_path, name, config, state):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "mlx-rl"), name=name, config=config,
                                resume="allow", embed=False)

    def log(self, step, row):
        self.trackio.log(scalars(row), step=int(step))

    def samples(self, step, rows):
        tables = {tag: self.trackio.Table(*sample_table(split)) for tag, split in by_split(rows).items()}
        self.trackio.log(tables, step=int(step))

    def close(self):
        self.trackio.finish()


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """The trackers of one run, fed by runs.Run; an empty Trackers does nothing."""

    def __init__(self, names=(), run_path=None, config=None):
        self.open = []
        if not names:
            return
        check(names)
        run_path = Path(run_path)
        state_path = run_path / "trackers.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        name = run_path.resolve().name
        self.open = [CLASSES[n](run_path, name, config, state) for n in dict.fromkeys(names)]
        state_path.write_text(json.dumps(state) + "\n")

    def log(self, step, row):
        for t in self.open:
            t.log(step, row)

    def samples(self, step, rows):
        for t in self.open:
            t.samples(step, rows)

    def close(self):
        while self.open:
            self.open.pop().close()
