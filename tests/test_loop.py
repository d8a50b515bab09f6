"""The one loop every chapter runs: the same summary keys, phase names and kl/approx everywhere; the sampler and the
trainer agree; padded positions can't overflow; NaN stops a run at its step; resume from any moment."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_rl.chapters import dpo, grpo, grpo_family, ppo
from mlx_rl.cli import main
from mlx_rl.runs import read_jsonl

MICRO_RL = ["--eval-every", "0", "--eval-prompts", "20"]
CHAPTERS = {
    "pretrain": ["pretrain", "--preset", "micro", "--steps", "3", "--batch-size", "8", *MICRO_RL],
    "grpo": ["grpo", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--pass-k", "1,2",
             "--pass-k-prompts", "8", *MICRO_RL],
    "ppo": ["ppo", "--steps", "2", "--rollout-batch", "16", "--minibatch-size", "8", "--value-warmup", "0", *MICRO_RL],
    "dpo": ["dpo", "--rounds", "1", "--pair-prompts", "16", "--batch-size", "4", *MICRO_RL],
    "distill": ["distill", "--steps", "2", "--prompts-per-step", "8", *MICRO_RL],
}


def run_cli(args, expect=0):
    """Run `mlx-rl ARGS` in a subprocess; returns (exit code, stdout + stderr)."""
    p = subprocess.run([sys.executable, "-m", "mlx_rl", *args], capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    if expect is not None:
        assert p.returncode == expect, out[-3000:]
    return p.returncode, out


@pytest.fixture(scope="module")
def chapter_runs(tmp_path_factory, trained_micro):
    """One short run of every chapter: {name: run dir}."""
    root = tmp_path_factory.mktemp("chapters")
    runs = {}
    for name, args in CHAPTERS.items():
        out = root / name
        extra = [] if name == "pretrain" else ["--model", str(trained_micro[1])]
        if name == "distill":  # the model distilled into a copy of itself: enough for the plumbing
            extra += ["--teacher", str(trained_micro[1])]
        main([*args, *extra, "--out", str(out)])
        runs[name] = out
    main(["icemaze", "--episodes", "200", "--out", str(root / "icemaze"), "--no-plots"])
    main(["kl", "--preset", "micro", "--prompts", "8", "--max-new-tokens", "4", "--max-samples", "64", "--trials", "20",
          "--out", str(root / "kl")])
    runs["icemaze"], runs["kl"] = root / "icemaze", root / "kl"
    return runs


def test_every_chapter_writes_the_same_summary_keys(chapter_runs):
    keys = {name: set(json.loads((path / "summary.json").read_text())) for name, path in chapter_runs.items()}
    first = keys["pretrain"]
    assert {"chapter", "before", "after", "phase_seconds", "wall_s", "steps", "details"} <= first
    for name, k in keys.items():
        assert k == first, f"{name}: {sorted(k ^ first)}"
    for name in ("pretrain", "grpo", "ppo", "dpo", "distill"):
        summary = json.loads((chapter_runs[name] / "summary.json").read_text())
        assert "eval/accuracy" in summary["before"] and "eval/accuracy" in summary["after"]
        assert summary["chapter"] == name


def test_every_llm_chapter_logs_the_same_phase_names_and_a_step0_eval(chapter_runs):
    from mlx_rl.tools.profile import phase_profile

    for name in ("pretrain", "grpo", "ppo", "dpo", "distill"):
        rows = read_jsonl(chapter_runs[name] / "metrics.jsonl")
        assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0], name  # a held-out point at step 0
        phases = set(phase_profile(chapter_runs[name], skip_first=0))
        assert {"forward_backward", "optimizer"} <= phases, (name, phases)
        assert "update" not in phases
        steps = [r["step"] for r in rows]
        assert steps == list(range(len(steps))), name  # no step missing or repeated


def test_grpo_summary_has_pass_at_k_at_start_and_end(chapter_runs):
    details = json.loads((chapter_runs["grpo"] / "summary.json").read_text())["details"]["pass_at_k"]
    for when in ("start", "end"):
        assert set(details[when]) == {"pass@1", "pass@2"}
        assert 0.0 <= details[when]["pass@1"] <= details[when]["pass@2"] <= 1.0


def test_config_json_records_runtime(chapter_runs):
    cfg = json.loads((chapter_runs["grpo"] / "config.json").read_text())
    runtime = cfg["runtime"]
    assert {"blas", "fast_swiglu", "mlx", "world_size", "backend"} <= set(runtime)
    assert runtime["world_size"] == 1
    if sys.platform.startswith("linux") and os.environ.get("MLX_RL_OPENBLAS", "auto") != "0":
        from mlx_rl.engine import blas

        assert runtime["blas"] == (blas.loaded_path or "MLX's bundled BLAS")


# --- kl/approx means one thing ----------------------------------------------------------------


def test_kl_approx_is_the_same_estimate_in_grpo_and_ppo():
    rng = np.random.default_rng(0)
    B, T = 5, 7
    old = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    new = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    logr = (new - old)[mask > 0]
    want = float(np.mean(np.exp(logr) - 1 - logr))  # k3(log pi - log pi_old): KL(pi_old || pi) on pi_old's samples
    variant = grpo_family.make_variant(grpo.GRPOConfig(), 7)
    _, g = variant.loss(mx.array(new), mx.array(old), mx.zeros((B, T)), mx.array(adv[:, 0]), mx.array(mask), 0.0,
                        mx.array(float(B)), mx.array(mask.sum()))
    _, p = ppo.policy_loss(mx.array(new), mx.array(old), mx.array(adv), mx.array(mask), 0.2)
    assert g["kl/approx"].item() == pytest.approx(want, rel=1e-5)
    assert p["kl/approx"].item() == pytest.approx(want, rel=1e-5)


# --- padded positions can't overflow ------------------------------------------------------------


def padded_batch():
    B, T = 3, 6
    mask = np.ones((B, T), dtype=np.float32)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    logprobs = np.full((B, T), -1.0, dtype=np.float32)
    logprobs[0, 5] = -1e4  # a padded position 1e4 nats below the reference: exp overflows unless masked first
    return mx.array(logprobs), mx.array(mask)


@pytest.mark.parametrize("variant", list(grpo_family.VARIANTS))
def test_padded_minus_1e4_leaves_grpo_loss_and_gradient_finite(variant):
    logprobs, mask = padded_batch()
    v = grpo_family.make_variant(grpo.GRPOConfig(variant=variant), 6)
    adv = mx.array([1.0, -1.0, 0.5])

    def loss(lp):
        return v.loss(lp, mx.zeros_like(lp) - 1.0, mx.zeros_like(lp), adv, mask, 0.04, mx.array(3.0), mask.sum())[0]

    value, grad = mx.value_and_grad(loss)(logprobs)
    assert np.isfinite(value.item()) and np.isfinite(np.array(grad)).all()
    assert np.array(grad)[0, 5] == 0.0  # nothing reaches a padded position


def test_padded_minus_1e4_leaves_ppo_loss_and_gradient_finite():
    logprobs, mask = padded_batch()
    adv = mx.ones_like(logprobs)
    value, grad = mx.value_and_grad(lambda lp: ppo.policy_loss(lp, mx.zeros_like(lp) - 1.0, adv, mask, 0.2)[0])(logprobs)
    assert np.isfinite(value.item()) and np.isfinite(np.array(grad)).all()
    values = mx.where(mask > 0, 0.0, 1e4)
    vloss, vgrad = mx.value_and_grad(lambda v: ppo.value_loss(v, mx.zeros_like(v), mx.zeros_like(v), mask, 0.2)[0])(values)
    assert np.isfinite(vloss.item()) and np.isfinite(np.array(vgrad)).all()


def test_padded_minus_1e4_leaves_dpo_loss_and_gradient_finite(micro_model):
    from mlx_rl.engine.logprobs import masked

    logprobs, mask = padded_batch()
    seq = lambda lp: masked(lp, mask).sum(axis=1)  # noqa: E731  what sequence_logprobs does with the mask
    ref = mx.zeros((3,))

    def loss(lp):
        s = seq(lp)
        return dpo.dpo_loss(s[:1], s[1:2], ref[:1], ref[1:2], 0.1)[0] + dpo.chosen_nll(s[:1], mask[:1].sum())

    value, grad = mx.value_and_grad(loss)(logprobs)
    assert np.isfinite(value.item()) and np.isfinite(np.array(grad)).all()


# --- the sampler and the trainer agree ------------------------------------------------------------


def grpo_session(tmp_path, checkpoint, **overrides):
    from mlx_rl.engine.session import start

    cfg = grpo.GRPOConfig(model=str(checkpoint), out=str(tmp_path / "run"), prompts_per_step=4, group_size=4,
                          eval_prompts=8, kl_coef=0.0, pass_k=(), **overrides)
    return cfg, start("grpo", cfg)


def test_sampler_mismatch_is_tiny_and_large_when_the_trainer_uses_another_temperature(tmp_path, trained_micro):
    import dataclasses

    cfg, session = grpo_session(tmp_path, trained_micro[1])
    N = session.task.max_new_tokens
    variant = grpo_family.make_variant(cfg, N)
    optimizer = session.optimizer(cfg.lr, cfg.steps)
    same = session.update_step(grpo.make_loss_fn(cfg, variant), optimizer)
    other = session.update_step(grpo.make_loss_fn(dataclasses.replace(cfg, temperature=0.5), variant), optimizer)
    mismatch = {}
    for name, update in (("same", same), ("other", other)):
        for i in range(4):  # until a step has signal (a step with none takes no update and logs no mismatch)
            session.seed_step(i)
            row, _ = grpo.grpo_step(session, cfg, variant, update, N)
            if "policy/sampler_mismatch" in row:
                mismatch[name] = row["policy/sampler_mismatch"]
                break
    assert mismatch["same"] < 1e-4
    assert mismatch["other"] > 0.05


# --- faults: NaN, resume, bad states ------------------------------------------------------------------


@pytest.fixture()
def good_run(tmp_path):
    """A finished 6-step pretraining run with a checkpoint at step 6 (constant learning rate)."""
    out = tmp_path / "pt"
    run_cli(["pretrain", "--preset", "micro", "--steps", "6", "--batch-size", "8", "--eval-every", "3",
             "--eval-prompts", "10", "--lr-schedule", "constant", "--warmup", "0", "--out", str(out)])
    return out


def checkpoint_weights(path):
    from mlx_rl.testing import checkpoint_weights as weights

    return {k: np.array(v) for k, v in weights(path).items()}


def test_nan_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(good_run):
    before = checkpoint_weights(good_run / "checkpoint")
    code, out = run_cli(["pretrain", "--resume", str(good_run), "--steps", "20", "--lr", "1e30"], expect=None)
    assert code == 3, out
    import re

    stopped = re.search(r"error: step (\d+): (loss|gradient norm|weights after the update) is (nan|inf|-inf)", out)
    assert stopped and int(stopped.group(1)) > 6 and "Traceback" not in out, out
    assert "The last good checkpoint (step 6) is intact" in out
    after = checkpoint_weights(good_run / "checkpoint")
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the good checkpoint is intact
    state = json.loads((good_run / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    from mlx_lm import load

    model, tokenizer = load(str(good_run / "checkpoint"))  # and mlx-lm loads it
    assert np.isfinite(np.array(model(mx.array([[1, 5, 6]])))).all()
    for text in [p.read_text() for p in good_run.glob("*.json*")]:
        assert "NaN" not in text and "Infinity" not in text


def test_on_nan_skip_skips_the_update_and_counts_it(tmp_path):
    out = tmp_path / "skip"
    run_cli(["pretrain", "--preset", "micro", "--steps", "3", "--batch-size", "8", "--eval-every", "0", "--eval-prompts", "10",
             "--lr", "1e30", "--warmup", "0", "--lr-schedule", "constant", "--on-nan", "skip", "--out", str(out)])
    rows = read_jsonl(out / "metrics.jsonl")
    # step 1's update is finite (huge weights); from step 2 the loss is not, and each of those updates is skipped
    assert [r.get("optim/skipped_updates") for r in rows[1:]] == [0, 1, 2]
    weights = checkpoint_weights(out / "checkpoint")
    assert all(np.isfinite(v).all() for v in weights.values())


def test_resume_of_a_finished_run_says_so_and_changes_nothing(good_run):
    metrics = (good_run / "metrics.jsonl").read_text()
    code, out = run_cli(["pretrain", "--resume", str(good_run)], expect=0)
    assert "already finished at step 6" in out
    assert (good_run / "metrics.jsonl").read_text() == metrics
    assert (good_run / "summary.json").exists()


def test_resume_extends_a_finished_run_and_applies_a_new_learning_rate(good_run):
    run_cli(["pretrain", "--resume", str(good_run), "--steps", "8", "--lr", "0.0005"])
    rows = read_jsonl(good_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(9))
    assert rows[-1]["optim/lr"] == pytest.approx(5e-4)  # applied, under a constant schedule
    assert rows[6]["optim/lr"] == pytest.approx(1e-3)
    assert json.loads((good_run / "config.json").read_text())["lr"] == 5e-4  # and recorded


def test_resume_refuses_a_changed_fixed_setting_without_touching_the_run(good_run):
    config = (good_run / "config.json").read_text()
    code, out = run_cli(["pretrain", "--resume", str(good_run), "--steps", "9", "--batch-size", "16"], expect=2)
    assert "--batch-size was 8 in this run and is 16 now" in out and "Traceback" not in out
    assert (good_run / "config.json").read_text() == config


def test_resume_with_the_wrong_command_names_the_mismatch(good_run):
    code, out = run_cli(["grpo", "--resume", str(good_run)], expect=2)
    assert "that is a `pretrain` run" in out and "mlx-rl pretrain --resume" in out


def test_resume_drops_a_torn_last_line_and_the_steps_after_the_checkpoint(tmp_path):
    out = tmp_path / "torn"
    run_cli(["pretrain", "--preset", "micro", "--steps", "4", "--batch-size", "8", "--eval-every", "2", "--eval-prompts", "10",
             "--out", str(out)])
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    state["step"] = 2  # pretend the checkpoint is the step-2 one: steps 3 and 4 must be redone
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/cr')  # a line torn by a kill
    (out / "summary.json").unlink()
    (out / "checkpoint" / "trainer_state.json").write_text(json.dumps({**state, "chapter": {}}))
    code, text = run_cli(["pretrain", "--resume", str(out)], expect=0)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_run_killed_before_its_first_checkpoint_restarts_in_place(tmp_path):
    out = tmp_path / "early"
    env = {**os.environ, "MLX_RL_KILL_AT": "after_log:2"}  # killed once step 2 is logged, before any checkpoint
    p = subprocess.run([sys.executable, "-m", "mlx_rl", "pretrain", "--preset", "micro", "--steps", "4", "--batch-size", "8",
                        "--eval-every", "0", "--eval-prompts", "10", "--out", str(out)], env=env, capture_output=True)
    assert p.returncode == -9
    assert not (out / "checkpoint").exists() and (out / "config.json").exists()
    code, text = run_cli(["pretrain", "--out", str(out)], expect=2)
    assert f"--resume {out}" in text
    code, text = run_cli(["pretrain", "--resume", str(out)], expect=0)
    assert "no checkpoint yet: starting it again from step 0" in text
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_damaged_trainer_state_is_one_line(good_run):
    (good_run / "checkpoint" / "trainer_state.json").write_text("{not json")
    code, out = run_cli(["pretrain", "--resume", str(good_run), "--steps", "9"], expect=2)
    assert "trainer_state.json is damaged" in out and "Traceback" not in out


def test_ctrl_c_exits_130_after_saving(tmp_path):
    import signal
    import time

    out = tmp_path / "sigint"
    p = subprocess.Popen([sys.executable, "-m", "mlx_rl", "pretrain", "--preset", "micro", "--steps", "100000",
                          "--batch-size", "8", "--eval-every", "0", "--eval-prompts", "10", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(out / "metrics.jsonl")) < 5:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 130, text
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == read_jsonl(out / "metrics.jsonl")[-1]["step"]  # the checkpoint holds every logged step


def test_time_based_checkpoints(tmp_path):
    out = tmp_path / "timed"
    run_cli(["pretrain", "--preset", "micro", "--steps", "6", "--batch-size", "8", "--eval-every", "0", "--eval-prompts", "10",
             "--save-minutes", "1e-9", "--out", str(out)])
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    # --save-minutes 1e-9 (60 ns): every step is longer, so every step saves, however fast the machine
    # a kill after step 4's log and save: the checkpoint is at step 4 (saved every step), not missing
    out2 = tmp_path / "timed-killed"
    env = {**os.environ, "MLX_RL_KILL_AT": "after_log:5"}
    subprocess.run([sys.executable, "-m", "mlx_rl", "pretrain", "--preset", "micro", "--steps", "6", "--batch-size", "8",
                    "--eval-every", "0", "--eval-prompts", "10", "--save-minutes", "1e-9", "--out", str(out2)], env=env,
                   capture_output=True)
    assert json.loads((out2 / "checkpoint" / "trainer_state.json").read_text())["step"] == 4


def test_the_live_line_names_its_signals_and_shows_an_eta(trained_micro):
    code, out = run_cli(["grpo", "--model", str(trained_micro[1]), "--steps", "3", "--prompts-per-step", "4", "--group-size",
                         "4", "--eval-every", "2", "--eval-prompts", "10", "--kl-coef", "0.04", "--pass-k", "",
                         "--out", str(trained_micro[0].parent / "live")])
    lines = [line for line in out.splitlines() if line.startswith("grpo  ")]
    assert lines, out
    assert any("ETA" in line for line in lines)
    for signal in ("reward", "held-out acc", "KL", "clip", "entropy"):
        assert all(signal in line for line in lines), (signal, lines[-1])
    assert "samples at step 2:" in out and "expected" in out  # a few samples with their answers at each evaluation
    final = next(line for line in out.splitlines() if line.startswith("grpo: "))  # the closing line, every split shown
    assert final.startswith("grpo: held-out accuracy") and "carry" in final and "no_carry" in final and " in 0:" in final


def test_a_run_killed_after_its_last_save_finishes_its_summary_on_resume(tmp_path):
    out = tmp_path / "last"
    env = {**os.environ, "MLX_RL_KILL_AT": "before_finish:1"}
    p = subprocess.run([sys.executable, "-m", "mlx_rl", "pretrain", "--preset", "micro", "--steps", "3", "--batch-size", "8",
                        "--eval-every", "0", "--eval-prompts", "10", "--out", str(out)], env=env, capture_output=True)
    assert p.returncode == -9 and not (out / "summary.json").exists()
    run_cli(["pretrain", "--resume", str(out)], expect=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "eval/accuracy" in summary["after"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]
    code, text = run_cli(["pretrain", "--resume", str(out)], expect=0)
    assert "already finished at step 3" in text
