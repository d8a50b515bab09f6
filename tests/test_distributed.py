"""Data-parallel training with `mlx.launch -n 2` (ring backend over loopback): two processes equal one.

For every LLM chapter (distillation included), 3 steps on the same global batch: the losses, rewards and final weights of a 2-process run
equal the 1-process run to 1e-5 relative, and only rank 0 wrote the run directory. A rank killed mid-run makes the
other stop with a clear line, within 60 s.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_rl.runs import read_jsonl

LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
SMALL = ["--eval-every", "0", "--eval-prompts", "20", "--steps", "3"]
CHAPTERS = {
    "pretrain": ["pretrain", "--preset", "micro", "--batch-size", "8"],
    "grpo": ["grpo", "--prompts-per-step", "4", "--group-size", "4", "--kl-coef", "0.04", "--pass-k", "1,2",
             "--pass-k-prompts", "8"],
    "ppo": ["ppo", "--rollout-batch", "16", "--minibatch-size", "8", "--value-warmup", "1"],
    "dpo": ["dpo", "--rounds", "2", "--pair-prompts", "16", "--batch-size", "4"],
    # a fresh student (--model, below) and the briefly pretrained model as its teacher
    "distill": ["distill", "--prompts-per-step", "8"],
    # episodes with a user's environment (tests/envs/echo_env.py): each rank plays its share of the groups
    "grpo-env": ["grpo", "--env", str(Path(__file__).parent / "envs" / "echo_env.py") + ":make", "--data",
                 str(Path(__file__).parent / "envs" / "echo_data"), "--prompts-per-step", "4", "--group-size", "4",
                 "--pass-k", ""],
}
# Continuous figures that must agree; discrete ones (clip fractions, counts) may differ where a value sits on the edge.
COMPARED = ("loss/", "reward/", "eval/", "kl/k3", "dpo/margin", "value/explained_variance", "optim/grad_norm", "env/",
            "distill/")

pytestmark = pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch is not installed")


def run(args, processes, out):
    cmd = [sys.executable, "-m", "mlx_rl", *args, "--out", str(out)]
    if processes > 1:
        cmd = [LAUNCH, "-n", str(processes), "--", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


def weights(path):
    from mlx_rl.testing import checkpoint_weights

    return {k: np.array(v, dtype=np.float64) for k, v in checkpoint_weights(path).items()}


@pytest.mark.parametrize("chapter", list(CHAPTERS))
def test_two_processes_equal_one(tmp_path, trained_micro, micro_checkpoint, chapter):
    args = [*CHAPTERS[chapter], *SMALL] + ([] if chapter == "pretrain" else ["--model", str(trained_micro[1])])
    if chapter == "distill":
        args = [*CHAPTERS[chapter], *SMALL, "--model", str(micro_checkpoint), "--teacher", str(trained_micro[1])]
    run(args, 1, tmp_path / "one")
    log = run(args, 2, tmp_path / "two")
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # one line per step: rank 1 wrote no metrics
    compared = 0
    for a, b in zip(one, two):
        for k, v in a.items():
            if k.startswith(COMPARED) and isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (a["step"], k)
                compared += 1
    assert compared >= 3 * 2
    w1, w2 = weights(tmp_path / "one" / "checkpoint"), weights(tmp_path / "two" / "checkpoint")
    num = sum(((w1[k] - w2[k]) ** 2).sum() for k in w1)
    den = sum((w1[k] ** 2).sum() for k in w1)
    assert np.sqrt(num / den) < 1e-5
    assert len(read_jsonl(tmp_path / "two" / "samples.jsonl")) == len(read_jsonl(tmp_path / "one" / "samples.jsonl"))
    runtime = json.loads((tmp_path / "two" / "config.json").read_text())["runtime"]
    assert runtime["world_size"] == 2 and runtime["backend"] == "ring"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_resume_of_a_data_parallel_run(tmp_path, trained_micro):
    args = [*CHAPTERS["grpo"], "--model", str(trained_micro[1]), "--eval-every", "0", "--eval-prompts", "20"]
    run([*args, "--steps", "3"], 1, tmp_path / "straight")
    run([*args, "--steps", "2", "--save-every", "1"], 2, tmp_path / "resumed")
    run(["grpo", "--resume", str(tmp_path / "resumed"), "--steps", "3"], 2, tmp_path / "resumed")
    a, b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert b[3]["loss/total"] == pytest.approx(a[3]["loss/total"], rel=1e-5, abs=1e-6)


def rank_pid(out, rank):
    """The pid of the process mlx.launch started as `rank` (MLX_RANK in its environment) for the run in `out`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and str(out).encode() in cmdline:
            return int(proc.name)
    return None


def test_a_killed_rank_stops_the_other_within_a_minute(tmp_path, trained_micro):
    out = tmp_path / "killed"
    cmd = [LAUNCH, "-n", "2", "--", sys.executable, "-m", "mlx_rl", "pretrain", "--preset", "micro", "--steps", "100000",
           "--batch-size", "8", "--eval-every", "0", "--eval-prompts", "10", "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(read_jsonl(out / "metrics.jsonl")) < 4:
            time.sleep(0.3)
        victim = rank_pid(out, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        text, _ = p.communicate(timeout=60)
        assert time.time() - killed_at < 60
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    # Either rank 0 noticed first (our line), or mlx.launch saw rank 1 die and stopped rank 0 itself (its line):
    # both name the failed rank, and which comes first is a race between the ring's error and the launcher.
    ours = "rank 0 of 2: stopped, another rank failed" in text
    launchers = re.search(r"rank 1 exited with code -9", text) is not None
    assert ours or launchers, text[-2000:]  # (mlx.launch itself exits 0 whatever its ranks did)
    assert "Traceback" not in text
    assert len(read_jsonl(out / "metrics.jsonl")) >= 4  # what rank 0 wrote before is still readable
    survivor = rank_pid(out, 0)
    assert survivor is None  # rank 0 exited too
    shutil.rmtree(out, ignore_errors=True)


def test_ranks_on_one_machine_share_its_cores(tmp_path, monkeypatch):
    """mlx.launch -n 2 over loopback: each rank gets half the cores for OpenBLAS (unless the user said otherwise);
    ranks on other machines don't count, and a run not started by the launcher is left alone."""
    from mlx_rl.engine import blas

    hostfile = tmp_path / "hosts.json"
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    assert blas.ranks_on_loopback() == 0 and blas.share_cores() is None  # no MLX_RANK: not launched
    monkeypatch.setenv("MLX_RANK", "1")
    assert blas.ranks_on_loopback() == 2
    assert blas.share_cores() == 4 and os.environ["OPENBLAS_NUM_THREADS"] == "4"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert blas.share_cores() is None and os.environ["OPENBLAS_NUM_THREADS"] == "3"  # the user's setting wins
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    hostfile.write_text(json.dumps([["192.168.1.10:5000"], ["192.168.1.11:5000"]]))  # two Macs
    assert blas.ranks_on_loopback() == 0 and blas.share_cores() is None
    hostfile.write_text("not json")
    assert blas.ranks_on_loopback() == 0


def test_openblas_kernels_follow_the_cpus_instruction_sets(monkeypatch):
    """An old OpenBLAS can mistake a new CPU for an old one; the kernels are chosen from the flags, unless set."""
    from mlx_rl.engine import blas

    assert blas.kernels_for({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma"}) == "SkylakeX"
    assert blas.kernels_for({"avx512f", "avx2", "fma"}) == "Haswell"  # AVX-512 without BW/DQ/VL: not SkylakeX's
    assert blas.kernels_for({"avx2", "fma", "sse4_2"}) == "Haswell"
    assert blas.kernels_for({"sse4_2"}) is None and blas.kernels_for(set()) is None
    monkeypatch.setattr(blas, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    assert blas.choose_kernels() == "Haswell" and os.environ["OPENBLAS_CORETYPE"] == "Haswell"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Zen")
    assert blas.choose_kernels() is None and os.environ["OPENBLAS_CORETYPE"] == "Zen"  # the user's choice stays
