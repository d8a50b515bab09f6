"""Run directories: the one place that decides what a run writes, and how.

Every training command writes the same layout:

    RUN/config.json      the resolved config (repeat the run with --config RUN/config.json)
    RUN/metrics.jsonl    one JSON object per step: step, wall_s, metrics, time/<phase>_s
    RUN/samples.jsonl    sample completions with their rewards, at eval points
    RUN/plots/*.png      curves drawn from metrics.jsonl
    RUN/checkpoint/      the latest mlx-lm checkpoint (+ trainer_state.* for --resume)
    RUN/summary.json     final figures and total wall time

Checkpoints are written to a temporary folder and swapped in with renames, so a
kill at any moment leaves the last good checkpoint loadable.
"""

import json
import os
import shutil
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from mlx_rl.config import MlxRlError, to_dict


def atomic_write_text(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StopRequested(KeyboardInterrupt):
    """Raised by Run.log after a Ctrl-C, once the step's metrics are written."""


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


class Progress:
    """A one-line progress bar with the live loss; plain lines when not a terminal."""

    def __init__(self, total, start=0, every=None, desc=""):
        self.total, self.step, self.desc = total, start, desc
        self.tty = sys.stderr.isatty()
        self.every = every or max(1, total // 20)
        self.start = time.perf_counter()

    def update(self, step, **shown):
        self.step = step
        if not self.tty and step % self.every and step != self.total:
            return
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "-" * (width - done)
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        elapsed = time.perf_counter() - self.start
        line = f"{self.desc} [{bar}] {step}/{self.total} {elapsed:5.0f}s {text}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(100))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


def default_out(command):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{command}-{stamp}")


class Run:
    """One run directory. `Run.create` for a new run, `Run.open_for_resume` to continue one."""

    def __init__(self, path, config, wall_offset=0.0):
        self.path = Path(path)
        self.config = config
        self.started = time.perf_counter() - wall_offset
        self.plots_dir = self.path / "plots"
        self.checkpoint_dir = self.path / "checkpoint"
        self.stop_requested = False  # set by Ctrl-C (see train.interruptible)

    @classmethod
    def create(cls, command, config):
        if config.out is None:
            config.out = default_out(command)
        path = Path(config.out)
        if path.exists() and any(path.iterdir()):
            raise MlxRlError(
                f"run directory {path} already exists and is not empty "
                f"(use --resume {path} to continue it, or choose another --out)"
            )
        path.mkdir(parents=True, exist_ok=True)
        (path / "plots").mkdir(exist_ok=True)
        data = to_dict(config)
        data["command"] = command
        atomic_write_json(path / "config.json", data)
        return cls(path, config)

    @classmethod
    def open_for_resume(cls, config):
        """Reopen config.resume; returns (run, trainer_state) with metrics cut back to the checkpoint."""
        path = Path(config.resume)
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise MlxRlError(f"cannot resume {path}: it has no checkpoint to continue from")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step = state["step"]
        # Steps logged after the checkpoint will be redone: drop them so the log reads as one run.
        kept = [m for m in read_jsonl(path / "metrics.jsonl") if m["step"] <= step]
        atomic_write_text(path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        samples = [s for s in read_jsonl(path / "samples.jsonl") if s.get("step", 0) <= step]
        atomic_write_text(path / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        config.out = str(path)
        data = to_dict(config)
        data["command"] = json.loads((path / "config.json").read_text()).get("command")
        atomic_write_json(path / "config.json", data)
        run = cls(path, config, wall_offset=state.get("wall_s", 0.0))
        return run, state

    @property
    def wall_s(self):
        return time.perf_counter() - self.started

    def log(self, step, metrics):
        """Append one step's metrics (floats, ints or 0-d arrays) to metrics.jsonl."""
        row = {"step": int(step), "wall_s": round(self.wall_s, 4)}
        for k, v in metrics.items():
            row[k] = v.item() if hasattr(v, "item") else v
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.stop_requested:
            raise StopRequested
        return row

    def log_samples(self, step, rows):
        with open(self.path / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": int(step), **r}) + "\n")

    def metrics(self):
        return read_jsonl(self.path / "metrics.jsonl")

    def write_summary(self, **figures):
        import mlx.core as mx

        summary = {"wall_s": round(self.wall_s, 2), "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4), **figures}
        atomic_write_json(self.path / "summary.json", summary)
        return summary


def find_checkpoint(run_path):
    """The run's last complete checkpoint (or the previous one if a swap was cut short)."""
    run_path = Path(run_path)
    for name in ("checkpoint", "checkpoint.old"):
        p = run_path / name
        if (p / "trainer_state.json").exists() or (p / "config.json").exists():
            return p
    return None


def swap_in_checkpoint(tmp_dir, final_dir):
    """Make tmp_dir (fully written) the new final_dir, keeping the old one until the end."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
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
