"""Fault injection: kill -9 a pretraining run and a GRPO run again and again, at random moments and at the worst
ones (during a checkpoint save, between the two renames of the swap, between a step's log line and its checkpoint),
resume each time, and compare with an uninterrupted run: the same metrics, bit for bit the same final weights, and
no step missing or repeated in metrics.jsonl. Slow (a few minutes): `pytest -m slow tests/test_faults.py`.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mlx_rl.runs import read_jsonl

pytestmark = pytest.mark.slow

# long enough for 14 kills, each a few steps after the last resume, to land mid-run
PRETRAIN = ["pretrain", "--preset", "micro", "--steps", "400", "--batch-size", "8", "--eval-every", "100",
            "--eval-prompts", "20", "--save-every", "3"]
GRPO = ["grpo", "--steps", "160", "--prompts-per-step", "4", "--group-size", "4", "--eval-every", "40", "--eval-prompts", "20",
        "--save-every", "2", "--pass-k", "1,2", "--pass-k-prompts", "8"]
TARGETED = ["mid_save:1", "mid_swap:1", "after_log:2", "mid_save:2", "mid_swap:3", "after_log:5"]


def command(args, out, resume):
    base = [sys.executable, "-m", "mlx_rl"]
    return base + ([args[0], "--resume", str(out)] if resume else [*args, "--out", str(out)])


def comparable(rows):
    drop = ("wall_s",)
    return [{k: v for k, v in r.items() if k not in drop and not k.startswith(("time/", "perf/"))} for r in rows]


def weights(path):
    from mlx_rl.testing import checkpoint_weights

    return {k: np.array(v) for k, v in checkpoint_weights(path).items()}


def logged_steps(out):
    path = out / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def killed_until_done(args, out, rng, random_kills, targeted):
    """Start the run, kill it at the targeted points and at random moments, resume until it finishes.
    Returns the number of kills."""
    kills, resume = 0, False
    plan = [("point", t) for t in targeted] + [("random", None)] * random_kills
    rng.shuffle(plan)
    for kind, point in plan:
        env = dict(os.environ)
        if kind == "point":
            env["MLX_RL_KILL_AT"] = point
            p = subprocess.run(command(args, out, resume), env=env, capture_output=True, text=True, timeout=600)
            if p.returncode == 0:  # the run finished before reaching the point: nothing to kill
                return kills
            assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
        else:
            # a random moment measured in the run's own progress, not in seconds: a fast machine finishes the run
            # in a few seconds, so a wall-clock delay would often land after the end
            start = logged_steps(out)
            target, jitter = start + rng.randint(1, 12), rng.uniform(0.0, 0.05)
            p = subprocess.Popen(command(args, out, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while p.poll() is None and logged_steps(out) < target:
                time.sleep(0.005)
            time.sleep(jitter)
            if p.poll() is not None:  # finished before the kill
                assert p.returncode == 0, p.stderr.read()
                return kills
            p.send_signal(signal.SIGKILL)
            p.wait()
        kills += 1
        resume = True
        steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
        assert steps == sorted(set(steps)), steps  # never a step twice, whatever the moment of the kill
    p = subprocess.run(command(args, out, resume), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return kills


@pytest.mark.parametrize("name,args,model", [("pretrain", PRETRAIN, False), ("grpo", GRPO, True)])
def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, trained_micro, name, args, model):
    args = args + (["--model", str(trained_micro[1])] if model else [])
    straight = tmp_path / "straight"
    subprocess.run(command(args, straight, False), check=True, capture_output=True, timeout=600)
    rng = random.Random(1234)
    out = tmp_path / "killed"
    kills = killed_until_done(args, out, rng, random_kills=8, targeted=TARGETED)
    assert kills >= 10
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(len(a)))  # every step once
    assert comparable(b) == comparable(a)
    wa, wb = weights(straight / "checkpoint"), weights(out / "checkpoint")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"] == json.loads((straight / "summary.json").read_text())["after"]
    assert not list(out.glob(".*.tmp-*"))  # no temporary left behind
