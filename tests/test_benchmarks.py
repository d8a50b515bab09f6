"""The step benchmarks run, split their time by phase, and save the untrained model a peer benchmark loads."""

import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from mlx_rl.engine.models import get_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_dpo_step  # noqa: E402
import bench_grpo_step  # noqa: E402


def assert_saved_untrained(path, preset):
    """What the peer (TRL) loads: a standard checkpoint holding the benchmarked model's untrained weights."""
    model, tokenizer = load(str(path))
    assert tokenizer.encode("07+45=")[0] == tokenizer.bos_token_id
    fresh, _, _ = get_model(None, preset, seed=0)
    saved, start = dict(tree_flatten(model.parameters())), dict(tree_flatten(fresh.parameters()))
    assert saved.keys() == start.keys()
    assert all(mx.array_equal(saved[k], start[k]).item() for k in start)


def test_grpo_step_benchmark_times_every_phase_and_saves_a_loadable_model(tmp_path):
    args = bench_grpo_step.parse_args(["--preset", "micro", "--steps", "2", "--warmup", "1", "--prompts", "2",
                                       "--save-model", str(tmp_path / "model")])
    result = bench_grpo_step.measure(args)
    assert result["step_s_min"] > 0 and result["step_s_mean"] >= result["step_s_min"]
    assert {"generate", "reward", "forward_backward", "optimizer"} <= set(result["phase_s_mean"])
    assert sum(result["phase_s_mean"].values()) <= result["step_s_mean"] * 1.01  # phases are parts of the step
    assert_saved_untrained(tmp_path / "model", "micro")


def test_dpo_step_benchmark_times_the_update_and_saves_the_untrained_model(tmp_path):
    result = bench_dpo_step.measure(bench_dpo_step.parse_args(["--steps", "2", "--warmup", "1",
                                                               "--save-model", str(tmp_path / "model")]))
    # the update's two phases, as every chapter times them (update.make_update)
    assert result["step_s_mean"] > 0 and set(result["phases_s"]) == {"time/forward_backward_s", "time/optimizer_s"}
    assert all(v > 0 for v in result["phases_s"].values())
    assert sum(result["phases_s"].values()) <= result["step_s_mean"] * 1.01  # phases are parts of the step
    assert_saved_untrained(tmp_path / "model", "tiny")


def test_a_peer_runs_in_its_own_process_and_every_failure_is_one_line(tmp_path):
    """benchmarks/peers/peer_process.py, which every benchmark uses to call a peer: the figures from the last JSON
    line, and for each way a peer can fail (its venv missing, an error, SIGKILL as from the out-of-memory killer,
    no JSON) a one-line reason instead of a crash."""
    from peers import peer_process

    def script(name, body):
        path = tmp_path / name
        path.write_text("import json, os, signal, sys\n" + body)
        return path

    ok = script("ok.py", "print('progress...')\nprint(json.dumps({'step_s': [1.5], 'args': sys.argv[1:], "
                         "'preload': os.environ.get('LD_PRELOAD')}))\n")
    figures, failure = peer_process.run_peer(sys.executable, ok, ["--steps", 1], openblas="/lib/fake-blas.so")
    assert failure is None and figures["step_s"] == [1.5] and figures["args"] == ["--steps", "1"]
    assert figures["preload"] == "/lib/fake-blas.so" and figures["process_s"] > 0

    cases = {
        "error.py": ("sys.stderr.write('Traceback ...\\nValueError: no such model\\n'); sys.exit(3)\n",
                     "exit 3: ValueError: no such model"),
        "killed.py": ("os.kill(os.getpid(), signal.SIGKILL)\n", "killed by SIGKILL (out of memory?)"),
        "silent.py": ("print('done')\n", "no JSON on the last line of silent.py's output"),
    }
    for name, (body, error) in cases.items():
        figures, failure = peer_process.run_peer(sys.executable, script(name, body), [])
        assert figures is None and failure["error"] == error, failure
    figures, failure = peer_process.run_peer(tmp_path / "no-venv" / "python", ok, [])
    assert figures is None and "not found" in failure["error"]
    with pytest.raises(SystemExit, match="the TRL benchmark failed: exit 3: ValueError: no such model"):
        peer_process.or_exit("TRL", peer_process.run_peer(sys.executable, tmp_path / "error.py", []))
