"""The Python API (mlx_rl/api.py): the same configs, checks and summaries as the CLI, and run directories opened."""

import json

import pytest

import mlx_rl
from mlx_rl import api
from mlx_rl.chapters.grpo import GRPOConfig
from mlx_rl.cli import main
from mlx_rl.config import MlxRlError

TINY_GRPO = dict(prompts_per_step=2, group_size=4, eval_prompts=4, eval_every=1, steps=2)


def test_config_is_the_cli_config():
    cfg = api.config("grpo", task="icemaze", group_size=4)
    assert isinstance(cfg, GRPOConfig) and cfg.group_size == 4
    # a built-in task brings its own defaults, as on the CLI
    from mlx_rl.config import task_defaults

    for name, value in task_defaults("grpo", "icemaze").items():
        assert getattr(cfg, name) == value
    assert api.config("grpo", **{"kl-coef": 0.1}).kl_coef == 0.1  # kebab case and aliases as in config files
    assert api.config("grpo", beta=0.2).kl_coef == 0.2


@pytest.mark.parametrize("settings, words", [
    ({"group_size": 1}, "group_size"),  # out of bounds
    ({"group_size": "four"}, "must be int"),
    ({"group_sise": 4}, "did you mean 'group-size'"),
])
def test_bad_settings_are_one_line(settings, words):
    with pytest.raises(MlxRlError) as e:
        api.config("grpo", **settings)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_command():
    with pytest.raises(MlxRlError, match="no command 'grop'"):
        api.config("grop")


def test_grpo_from_python_equals_the_cli(tmp_path, trained_micro):
    """The same settings through api.grpo and through `mlx-rl grpo`: the same metrics, bit for bit."""
    micro_checkpoint = trained_micro[1]
    summary = api.grpo(model=str(micro_checkpoint), out=str(tmp_path / "py"), **TINY_GRPO)
    main(["grpo", "--model", str(micro_checkpoint), "--out", str(tmp_path / "cli"), "--prompts-per-step", "2",
          "--group-size", "4", "--eval-prompts", "4", "--eval-every", "1", "--steps", "2"])
    cli_summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["chapter"] == "grpo"
    assert summary["final"]["grpo/skipped"] == 0.0  # a step that trained
    drop = ("perf/peak_memory_gb", "perf/tokens_per_s")  # (how fast, not what was computed)
    assert {k: v for k, v in summary["final"].items() if k not in drop} == \
        {k: v for k, v in cli_summary["final"].items() if k not in drop}

    run = mlx_rl.Run(summary["run"])
    assert run.command == "grpo" and run.config["group_size"] == 4
    assert [row["step"] for row in run.metrics] == [0, 1, 2]
    steps, rewards = run.metrics.column("reward/mean")
    assert steps == [1, 2] and rewards[-1] == summary["final"]["reward/mean"]
    assert run.metrics["eval/accuracy"].steps == [0, 1, 2]  # evaluated at every step, the start included
    assert run.metrics.last("loss/total") == summary["final"]["loss/total"]
    assert "reward/mean" in run.metrics.names and "step" not in run.metrics.names
    with pytest.raises(KeyError, match="no metric 'nope'"):
        run.metrics.column("nope")
    assert run.summary == summary
    assert "reward" in run.plots and run.plots["reward"].is_file()
    assert run.samples and {s["step"] for s in run.samples_at()} == {2}
    assert (run.checkpoint / "model.safetensors").is_file()
    assert "grpo" in repr(run) and "finished" in repr(run)


def test_run_a_config_built_in_python(tmp_path, micro_checkpoint):
    cfg = GRPOConfig(model=str(micro_checkpoint), out=str(tmp_path / "run"), **TINY_GRPO)
    cfg.steps = 1
    summary = api.run(cfg)
    assert summary["steps"] == 1 and mlx_rl.Run(tmp_path / "run").config["steps"] == 1
    bad = GRPOConfig(model=str(micro_checkpoint), group_size=0)
    with pytest.raises(MlxRlError, match="group_size"):  # a config built by hand is checked as flags are
        api.run(bad)


def test_resume_from_python(tmp_path, micro_checkpoint):
    out = tmp_path / "run"
    api.grpo(model=str(micro_checkpoint), out=str(out), **{**TINY_GRPO, "steps": 1})
    summary = api.grpo(resume=str(out), steps=2)
    assert summary["steps"] == 2 and [r["step"] for r in mlx_rl.Run(out).metrics] == [0, 1, 2]
    with pytest.raises(MlxRlError, match="--group-size"):  # a run keeps its settings
        api.grpo(resume=str(out), steps=3, group_size=2)


def test_icemaze_and_kl_from_python(tmp_path, micro_checkpoint):
    summary = api.icemaze(algo="q_learning", episodes=20, batch_episodes=10, eval_episodes=20, out=str(tmp_path / "ice"))
    assert summary["chapter"] == "icemaze" and "values" in mlx_rl.Run(tmp_path / "ice").plots
    summary = api.kl(model=str(micro_checkpoint), prompts=8, max_new_tokens=4, max_samples=32, out=str(tmp_path / "kl"))
    assert summary["final"]["kl/k3"] >= 0


def test_run_rejects_what_is_not_a_run(tmp_path):
    with pytest.raises(MlxRlError, match="no such run directory"):
        mlx_rl.Run(tmp_path / "missing")
    with pytest.raises(MlxRlError, match="not a run directory"):
        mlx_rl.Run(tmp_path)
