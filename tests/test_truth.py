"""Figures the tools print agree with each other: one phase-timing definition, the band from the rows evaluated."""

import json

import pytest

from mlx_rl import plots, report
from mlx_rl.tools.profile import phase_profile


def write_run(path, rows, config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_profile_and_the_reports_phase_table_are_one_definition(tmp_path):
    """Step 0 (the evaluation before training) and the first, compiling step are left out by both."""
    rows = [{"step": 0, "wall_s": 9.0, "time/eval_s": 9.0},  # an expensive evaluation before training
            {"step": 1, "wall_s": 12.0, "time/generate_s": 2.0, "time/forward_backward_s": 1.0},  # compiles
            {"step": 2, "wall_s": 12.6, "time/generate_s": 0.4, "time/forward_backward_s": 0.2},
            {"step": 3, "wall_s": 13.4, "time/generate_s": 0.4, "time/forward_backward_s": 0.2, "time/eval_s": 0.2}]
    run = write_run(tmp_path / "run", rows, {"command": "grpo"})
    from_profile = phase_profile(run)
    from_report = plots.phase_table(plots.load_run(run).rows)
    assert from_profile == from_report
    assert from_profile["generate"]["mean_s"] == pytest.approx(0.4)
    assert from_profile["eval"]["mean_s"] == pytest.approx(0.1)  # step 3's 0.2 s over 2 steps; step 0 not in
    assert sum(p["share"] for p in from_profile.values()) == pytest.approx(1.0)


def test_the_band_and_count_come_from_the_rows_evaluated(tmp_path):
    """--eval-prompts 500 on data with 40 held-out rows: the band is Wilson's for 40, and the page says 40."""
    rows = [{"step": s, "wall_s": float(s), "eval/accuracy": a, "eval/prompts": 40}
            for s, a in ((0, 0.25), (5, 0.5), (10, 0.75))]
    run = write_run(tmp_path / "run", rows, {"command": "grpo", "eval_prompts": 500})
    data = plots.load_run(run)
    assert plots.heldout_count(data) == 40
    page = report.build([str(run)])
    lo, hi = plots.wilson(0.75, 40)
    assert "40 held-out prompts per evaluation" in page and f"{lo:.1%} – {hi:.1%}" in page
    assert "500 held-out prompts" not in page


def test_an_older_run_without_the_count_uses_the_configured_one(tmp_path):
    rows = [{"step": s, "wall_s": float(s), "eval/accuracy": 0.5} for s in (0, 5)]
    run = write_run(tmp_path / "run", rows, {"command": "grpo", "eval_prompts": 64})
    assert plots.heldout_count(plots.load_run(run)) == 64


def test_evaluation_logs_how_many_rows_it_scored(micro_checkpoint):
    """A task with fewer held-out rows than asked for: eval/prompts is what was scored."""
    from mlx_rl.data.tasks import TaskConfig, make_task
    from mlx_rl.engine.evaluate import evaluate
    from mlx_rl.engine.models import load_model

    model, tokenizer, _ = load_model(str(micro_checkpoint))
    task = make_task(TaskConfig(task="addition", digits=1))  # 1-digit addition: 100 problems in all
    rows = task.heldout_rows(500, seed=0)
    metrics, _ = evaluate(model, tokenizer, task, rows, False, n_samples=0)
    assert metrics["eval/prompts"] == len(rows) < 500


def test_warmup_counts_steps_whatever_the_updates_per_step():
    """GRPO makes --epochs updates per step, PPO epochs x minibatches: --warmup 3 still means three steps."""
    import types

    import mlx.core as mx

    from mlx_rl.engine.session import Session

    holder = types.SimpleNamespace(checkpoint=None, optimizers={})
    opt = Session.optimizer(holder, 1e-3, steps=10, warmup=3, updates_per_step=4)
    rate = opt._schedulers["learning_rate"]
    assert rate(mx.array(11)).item() < 1e-3 * 0.99  # within step 3 (updates 8..11): still warming up
    assert rate(mx.array(12)).item() == pytest.approx(1e-3)  # after three steps' updates: the peak
    cosine = Session.optimizer(holder, 1e-3, steps=10, warmup=0, schedule="cosine", updates_per_step=4)
    end = cosine._schedulers["learning_rate"]
    assert end(mx.array(40)).item() == pytest.approx(1e-3 / 20, rel=1e-3)  # decayed over all 10 steps' updates
    assert end(mx.array(10)).item() > 1e-3 / 2
