"""The loop every LLM chapter runs: a chapter hands it a step function, the loop does the rest.

    loop.run(session, step, steps=cfg.steps, signals={"reward": "reward/mean", ...})

`step(i) -> row` does one training step (its phases timed with `session.timer`)
and returns that step's metrics. Around it the loop, the same for every chapter:

  - evaluates the starting policy at step 0 (so every curve has its first point),
    then every --eval-every steps and at the end, printing a few samples;
  - logs each step to metrics.jsonl (phase timings, peak memory) *before* any
    checkpoint claims that step, then saves at evaluations, every --save-every
    steps, every --save-minutes and at the end;
  - stops at the first non-finite loss, gradient or weight with one line naming
    the step (the last good checkpoint stays; nothing non-finite is saved);
  - on Ctrl-C finishes the step, logs it, saves, and exits with status 130;
  - shows one live line (step/total, ETA, the chapter's signals by name);
  - at the end draws the plots, writes summary.json (the same keys in every
    chapter) and prints one closing line with every accuracy split.
"""

import json
import signal
import threading
import time

import numpy as np

from mlx_rl.config import MlxRlError
from mlx_rl.engine import faults
from mlx_rl.engine.live import LiveLine, accuracy_summary, fmt_duration, sample_lines
from mlx_rl.engine.session import peak_memory_gb
from mlx_rl.engine.update import NonFinite
from mlx_rl.runs import find_checkpoint


class Interrupted(MlxRlError):
    exit_code = 130


class Diverged(MlxRlError):
    exit_code = 3


def eval_metrics(row):
    return {k: v for k, v in row.items() if k.startswith("eval/")}


def run(session, step, *, steps, signals, chapter_state=None, chapter_arrays=None, stop_when=None, eval_when=None,
        details=None, evaluate=None):
    """Train with `step` until `steps` (an int, or a function giving the current total), then summarise.

    signals: {label: metric} shown on the live line. chapter_state() -> JSON-able
    dict and chapter_arrays() -> {file: {name: array}} are saved with every
    checkpoint. stop_when(step, row) ends the run early (a time limit).
    eval_when(step) replaces the every-N-steps evaluation schedule.
    details() -> dict of chapter figures for summary.json, computed at the end.
    evaluate() -> (metrics, samples) replaces the held-out greedy evaluation (the reward
    model scores held-out pairs instead).
    """
    cfg, run_dir = session.cfg, session.run
    total = steps if callable(steps) else (lambda: steps)
    eval_when = eval_when or (lambda i: bool(cfg.eval_every) and i % cfg.eval_every == 0)
    chapter_state = chapter_state or (lambda: {})
    chapter_arrays = chapter_arrays or (lambda: None)
    live = LiveLine(session.command, total(), session.start_step, signals, enabled=session.world.rank == 0)
    evaluate = evaluate or session.evaluate
    i = session.start_step

    def save(i):
        session.save(i, chapter_state(), chapter_arrays())

    before = {}
    if i == 0:  # where we start from, so every curve has its first point
        metrics, samples = evaluate()
        run_dir.log_samples(0, samples)
        run_dir.log(0, {**metrics, **session.timer.pop()})
        before = metrics
        live.say(f"{session.command}: before training, {accuracy_summary({}, metrics) or 'evaluated'}")
        live.say(sample_lines(0, samples))
        after = before
    else:
        logged = run_dir.metrics()
        before = next((eval_metrics(m) for m in logged if m.get("step") == 0), {})
        after = next((eval_metrics(m) for m in reversed(logged) if eval_metrics(m)), before)
    last_row = {}
    live.shown.update(before)  # the live line starts from the held-out figures at step 0
    last_save = time.perf_counter()
    stop = StopFlag()
    try:
        with stop.on_sigint(live), session.world.guard():
            while i < total():
                session.seed_step(i)  # MLX's sampling RNG from (seed, step): --resume samples the same tokens
                try:
                    row = step(i)
                except NonFinite as e:
                    raise Diverged(f"step {i + 1}: {e}; stopped there, nothing of that step was saved. "
                                   f"{last_good(session, i)}") from None
                i += 1
                finishing = i >= total() or (stop_when is not None and stop_when(i, row))
                if stop_when is not None and session.world.size > 1:  # (a time limit): every rank stops together
                    finishing = bool(session.world.sum(np.array([float(finishing)]))[0] > 0)
                if eval_when(i) or finishing:
                    metrics, samples = evaluate()
                    row.update(metrics)
                    after = metrics
                    run_dir.log_samples(i, samples)
                    live.say(sample_lines(i, samples))
                skipped = sum(u.skipped for u in session.updates)
                if skipped or cfg.on_nan == "skip":
                    row["optim/skipped_updates"] = skipped
                row.update(session.timer.pop())
                tokens_per_second(row)
                row["perf/peak_memory_gb"] = peak_memory_gb()
                last_row = run_dir.log(i, row)  # on disk before any checkpoint claims step i
                faults.reached("after_log")
                minutes = (time.perf_counter() - last_save) / 60
                if (finishing or eval_when(i) or (cfg.save_every and i % cfg.save_every == 0)
                        or (cfg.save_minutes and minutes >= cfg.save_minutes) or stop.requested):
                    save(i)  # marked finished only once the summary is written (a kill before: resume finishes it)
                    last_save = time.perf_counter()
                session.world.progress()
                live.total = total()
                live.update(i, row)
                if stop.requested and not finishing:
                    live.close()
                    raise Interrupted(f"interrupted at step {i}; checkpoint saved. Continue with: "
                                      f"mlx-rl {session.command} --resume {run_dir.path}")
                if finishing:
                    break
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        live.close()
        raise Interrupted(f"stopped at once; {last_good(session, i)}") from None
    live.close()
    faults.reached("before_finish")
    summary = finish(session, i, before, after, last_row, details)
    session.mark_finished()
    return summary


def tokens_per_second(row):
    """perf/tokens_per_s, one definition in every chapter: the tokens of the step's training batch (prompts and
    answers or completions, padding excluded, each counted once; the chapter puts the count in row["perf/tokens"])
    per second of the step, every phase but evaluation counted (sampling, scoring and updates included)."""
    tokens = row.pop("perf/tokens", None)
    if tokens is None:
        return
    seconds = sum(v for k, v in row.items() if k.startswith("time/") and k != "time/eval_s" and is_number(v))
    row["perf/tokens_per_s"] = float(tokens) / max(seconds, 1e-9)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def last_good(session, step):
    ckpt = find_checkpoint(session.run.path)
    if ckpt is None:
        return f"No checkpoint was saved yet; `--resume {session.run.path}` starts it again."
    saved = json.loads((ckpt / "trainer_state.json").read_text()).get("step")
    return f"The last good checkpoint (step {saved}) is intact: {ckpt} (--resume {session.run.path} continues from it)"


def phase_seconds(rows):
    totals = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("time/") and isinstance(v, (int, float)):
                name = k[len("time/"):].removesuffix("_s")
                totals[name] = totals.get(name, 0.0) + v
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def summary_dict(chapter, steps, wall_s, before, after, final, phases, checkpoint, run_path, details=None, status="finished"):
    """summary.json: the same keys in every chapter (docs/metrics.md describes them)."""
    import mlx.core as mx

    return {
        "chapter": chapter,
        "status": status,
        "steps": int(steps),
        "wall_s": round(wall_s, 2),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
        "before": before,
        "after": after,
        "final": final,
        "phase_seconds": phases,
        "checkpoint": checkpoint,
        "run": str(run_path),
        "details": details or {},
    }


def finish(session, steps, before, after, last_row, details):
    run_dir = session.run
    details = details() if details else {}
    if run_dir.writer:
        from mlx_rl.plots import plot_run

        plot_run(run_dir.path)
    last_row = last_row or (run_dir.metrics() or [{}])[-1]  # a resumed run with no step left: the log's last
    final = {k: v for k, v in last_row.items() if not k.startswith(("time/", "eval/")) and k not in ("step", "wall_s")}
    summary = run_dir.write_summary(summary_dict(
        session.command, steps, run_dir.wall_s, before, after, final, phase_seconds(run_dir.metrics()),
        str(run_dir.checkpoint_dir), run_dir.path, details))
    if session.world.rank == 0:
        print(f"{session.command}: {accuracy_summary(before, after) or 'done'} in {fmt_duration(summary['wall_s'])}; "
              f"run in {run_dir.path}", flush=True)
    return summary


class StopFlag:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.requested = False

    def on_sigint(self, live):
        flag = self

        class Handler:
            def __enter__(self):
                self.in_main = threading.current_thread() is threading.main_thread()
                if self.in_main:
                    self.previous = signal.signal(signal.SIGINT, self.handle)
                return flag

            def handle(self, signum, frame):
                if flag.requested:
                    raise KeyboardInterrupt
                flag.requested = True
                live.say("stopping after this step and saving a checkpoint (Ctrl-C again to quit now)")

            def __exit__(self, *exc):
                if self.in_main:
                    signal.signal(signal.SIGINT, self.previous)
                return False

        return Handler()
