"""Run directories: the one place that decides what a run writes, and how.

Every training command writes the same layout:

    RUN/config.json      the resolved config, plus "runtime" (BLAS, fast SwiGLU, MLX version, world size)
                         (repeat the run with --config RUN/config.json)
    RUN/metrics.jsonl    one JSON object per step: step, wall_s, metrics, time/<phase>_s
    RUN/samples.jsonl    sample completions with their rewards, at eval points
    RUN/plots/*.png      curves drawn from metrics.jsonl
    RUN/checkpoint/      the latest mlx-lm checkpoint (+ trainer_state.* for --resume)
    RUN/summary.json     final figures, the same keys in every chapter (docs/metrics.md)
    RUN/tensorboard/     with --log-to tensorboard (W&B and trackio: engine/trackers.py)

What keeps a run safe when it is killed at any moment:
- a step's metrics line is written (and flushed to disk) *before* the checkpoint
  that claims that step, so a resumed run never misses a step; --resume drops
  the lines logged after its checkpoint (they are redone) and a torn last line;
- checkpoints are written to a temporary folder and swapped in with renames, so
  the last good checkpoint stays loadable; a temporary left by a kill is removed;
- JSON never holds a bare NaN (written as null).
In a data-parallel run only rank 0 writes (`Run.writer`).
"""

import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from mlx_rl.config import MlxRlError, to_dict
from mlx_rl.engine.trackers import Trackers


def json_safe(obj):
    """NaN and infinities as None (JSON has no NaN); arrays and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return obj
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, **kwargs):
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def atomic_write_text(path, text):
    """Write a file so that a reader (or a kill) sees the old content or the new, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def read_jsonl(path, strict=False):
    """Rows of a JSONL file. A torn last line (a kill mid-write) is skipped; so are damaged lines
    elsewhere unless strict, which raises one line naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if strict and number < len(lines):
                raise MlxRlError(f"{path}:{number} is damaged (not valid JSON)") from None
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path, what):
    """A JSON object from a file, or a one-line error naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MlxRlError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MlxRlError(f"{what} {path} is damaged (not valid JSON)") from None
    if not isinstance(data, dict):
        raise MlxRlError(f"{what} {path} is damaged (not a JSON object)")
    return data


class PhaseTimer:
    """Seconds per phase of a step: `with timer("generate"): ...`, then `timer.pop()`.

    MLX is lazy: a phase only costs what it evaluates, so end each phase with
    `mx.eval` of what it produced, or its work is billed to the next phase.
    """

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, phase):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time/{phase}_s"] += time.perf_counter() - start

    def pop(self):
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def default_out(command):
    """runs/<command>-<date>-<time>: one naming scheme for every command."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{command}-{stamp}")


def check_out_dir(path):
    """A one-line error unless `path` can become a new run directory (nothing is created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MlxRlError(f"--out {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        hint = f"use --resume {path} to continue it, or " if (path / "config.json").exists() else ""
        raise MlxRlError(f"run directory {path} already exists and is not empty ({hint}choose another --out)")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise MlxRlError(f"--out {path}: cannot write in {parent} (permission denied)")


def check_out_file(path, force=False, flag="--out"):
    """A one-line error unless `path` can be written as a new output file (nothing is created).

    An existing file is kept unless force (a user's pairs or plots are never overwritten without --force);
    its folder must exist or be creatable, and be writable.
    """
    path = Path(path)
    if path.is_dir():
        raise MlxRlError(f"{flag} {path} is a folder, not a file")
    if path.exists() and not force:
        raise MlxRlError(f"{flag} {path} already exists: choose another {flag}, or add --force to overwrite it")
    check_writable_folder(path.parent, flag, path)


def check_writable_folder(folder, flag, what=None):
    """A one-line error unless files can be written in `folder` (it may not exist yet: its nearest parent counts)."""
    folder = Path(folder)
    what = what or folder
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise MlxRlError(f"{flag} {what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MlxRlError(f"{flag} {what}: cannot write in {existing} (permission denied)")


class Run:
    """One run directory. `Run.create` for a new run, `Run.reopen` to continue one."""

    def __init__(self, path, config, wall_offset=0.0, writer=True):
        self.path = Path(path)
        self.config = config
        self.started = time.perf_counter() - wall_offset
        self.plots_dir = self.path / "plots"
        self.checkpoint_dir = self.path / "checkpoint"
        self.writer = writer  # False on the other ranks of a data-parallel run: they write nothing
        self.trackers = Trackers()  # --log-to: the same config, metrics and samples to TensorBoard, W&B, trackio

    @classmethod
    def create(cls, command, config, runtime, writer=True):
        if config.out is None:
            config.out = default_out(command)
        path = Path(config.out)
        if writer:
            try:
                path.mkdir(parents=True, exist_ok=True)
                (path / "plots").mkdir(exist_ok=True)
            except OSError as e:
                raise MlxRlError(f"--out {path}: cannot create it ({e.strerror})") from None
        run = cls(path, config, writer=writer)
        run.write_config(command, runtime)
        return run

    @classmethod
    def reopen(cls, config, step, wall_s, command, runtime, writer=True):
        """Continue the run in config.resume from a checkpoint at `step` (0: no checkpoint, start again)."""
        path = Path(config.resume)
        config.out = str(path)
        run = cls(path, config, wall_offset=wall_s, writer=writer)
        if writer:
            # Steps logged after the checkpoint are redone: drop them (and a torn last line).
            kept = [m for m in read_jsonl(path / "metrics.jsonl") if m.get("step", 0) <= step and step > 0]
            atomic_write_text(path / "metrics.jsonl", "".join(dumps(m) + "\n" for m in kept))
            samples = [s for s in read_jsonl(path / "samples.jsonl") if s.get("step", 0) <= step and step > 0]
            atomic_write_text(path / "samples.jsonl", "".join(dumps(s) + "\n" for s in samples))
            (path / "summary.json").unlink(missing_ok=True)
            (path / "plots").mkdir(exist_ok=True)
            remove_temporaries(path)
        run.write_config(command, runtime)
        return run

    def write_config(self, command, runtime):
        if self.writer:
            config = {**to_dict(self.config), "command": command, "runtime": runtime}
            atomic_write_json(self.path / "config.json", config)
            names = tuple(getattr(self.config, "log_to", ()) or ())
            if names and not self.trackers.open:
                import atexit

                self.trackers = Trackers(names, self.path, config)
                atexit.register(self.trackers.close)  # a run stopped early still flushes what it logged

    @property
    def wall_s(self):
        return time.perf_counter() - self.started

    def log(self, step, metrics):
        """Append one step's metrics (floats, ints or 0-d arrays) to metrics.jsonl, flushed to disk."""
        row = json_safe({"step": int(step), "wall_s": round(self.wall_s, 4), **metrics})
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.trackers.log(step, row)
        return row

    def log_samples(self, step, rows):
        if self.writer and rows:
            with open(self.path / "samples.jsonl", "a") as f:
                for r in rows:
                    f.write(dumps({"step": int(step), **r}) + "\n")
            self.trackers.samples(step, json_safe(rows))

    def metrics(self):
        return read_jsonl(self.path / "metrics.jsonl")

    def write_summary(self, summary):
        if self.writer:
            atomic_write_json(self.path / "summary.json", summary)
            self.trackers.close()
        return json_safe(summary)


def find_checkpoint(run_path):
    """The run's last complete checkpoint (or the previous one if a swap was cut short), or None."""
    run_path = Path(run_path)
    for name in ("checkpoint", "checkpoint.old"):
        p = run_path / name
        if (p / "trainer_state.json").exists():
            return p
    return None


def remove_temporaries(run_path):
    """Temporary checkpoint folders and files left behind by a kill mid-save."""
    for p in Path(run_path).glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    old = Path(run_path) / "checkpoint.old"
    if old.exists() and (Path(run_path) / "checkpoint" / "trainer_state.json").exists():
        shutil.rmtree(old, ignore_errors=True)


def swap_in_checkpoint(tmp_dir, final_dir):
    """Make tmp_dir (fully written) the new final_dir. At every moment one complete checkpoint exists:
    a kill between the two renames leaves only checkpoint.old, which find_checkpoint takes."""
    from mlx_rl.engine import faults

    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        if old.exists():  # left by a swap cut short after its second rename: final_dir is the newer one
            shutil.rmtree(old)
        os.replace(final_dir, old)
        faults.reached("mid_swap")
        os.replace(tmp_dir, final_dir)
    else:  # only checkpoint.old (a swap cut short between its renames) or nothing yet
        os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def temp_dir_beside(final_dir):
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def fsync_tree(path):
    """Flush every file under path to disk (before a checkpoint swap makes it the real one)."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


