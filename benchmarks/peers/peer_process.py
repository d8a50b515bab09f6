"""Run a peer's benchmark script in its own venv and process: the one way every benchmark here calls a peer.

A peer script (trl_*.py, mlxlora_grpo_step.py, llamacpp_logits.py) prints its figures as JSON on its last stdout
line. `run_peer` runs it, times the whole process, and returns those figures, or the reason there are none in
one line: the peer's venv is missing, it exited with an error (its last line of stderr), or it was killed with
SIGKILL, which on Linux is almost always the kernel's out-of-memory killer. A benchmark that compares peers
can then record the failure and go on to the next peer (bench_scale.py: a peer that does not fit is a result),
or stop (`or_exit`).
"""

import json
import os
import subprocess
import time
from pathlib import Path


def run_peer(python, script, args, openblas=None, cwd=None):
    """(figures, None) or (None, {"error": one line, "returncode": ...}); both with "process_s"."""
    if not Path(python).exists():
        return None, {"error": f"{python} not found (install the peer's venv: see benchmarks/peers/)"}
    env = dict(os.environ)
    if openblas:
        env["LD_PRELOAD"] = openblas  # the same BLAS as mlx-rl's (see peers/mlxlora_grpo_step.py)
    started = time.perf_counter()
    done = subprocess.run([str(python), str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)
    process_s = time.perf_counter() - started
    if done.returncode == -9:  # SIGKILL: on Linux, the kernel's out-of-memory killer (dmesg says)
        return None, {"error": "killed by SIGKILL (out of memory?)", "returncode": -9, "process_s": process_s}
    if done.returncode != 0:
        tail = [line for line in done.stderr.strip().splitlines() if "warn" not in line.lower()]
        return None, {"error": f"exit {done.returncode}" + (f": {tail[-1].strip()}" if tail else ""),
                      "returncode": done.returncode, "process_s": process_s, "stderr": done.stderr[-3000:]}
    lines = done.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return None, {"error": f"no JSON on the last line of {Path(script).name}'s output", "returncode": 0,
                      "process_s": process_s}
    return {**figures, "process_s": process_s}, None


def or_exit(name, result):
    """The figures of a run_peer result, or exit with its error and the peer's stderr."""
    figures, failure = result
    if failure is not None:
        raise SystemExit(f"the {name} benchmark failed: {failure['error']}\n{failure.get('stderr', '')}")
    return figures
