"""Config files and options: YAML equals JSON, kebab or snake keys, did-you-mean, aliases, finite bounds, resume rules."""

import json

import pytest

from mlx_rl.chapters.grpo import GRPOConfig
from mlx_rl.chapters.pretrain import PretrainConfig
from mlx_rl.config import MlxRlError, build, check_resume_changes, read_config_file, to_dict


def test_yaml_and_json_give_the_same_resolved_config(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.0003\ngroup-size: 4\nkl_coef: 0\nreward:\n  - exact\n  - chars\n"
                                     "reward-weights: [1, 0.1]\nchat_template: true\n")
    (tmp_path / "c.json").write_text(json.dumps({"lr": 3e-4, "group_size": 4, "kl-coef": 0.0, "reward": ["exact", "chars"],
                                                 "reward_weights": [1.0, 0.1], "chat-template": True}))
    from_yaml = build(GRPOConfig, read_config_file(tmp_path / "c.yaml"))
    from_json = build(GRPOConfig, read_config_file(tmp_path / "c.json"))
    assert to_dict(from_yaml) == to_dict(from_json)
    assert from_yaml.group_size == 4 and from_yaml.reward == ("exact", "chars") and from_yaml.reward_weights == (1.0, 0.1)
    assert from_yaml.lr == 3e-4 and from_yaml.chat_template is True


def test_unknown_key_gets_a_did_you_mean(tmp_path):
    (tmp_path / "c.yaml").write_text("grup_size: 4\n")
    with pytest.raises(MlxRlError, match=r"unknown setting 'grup_size'.*did you mean 'group-size'"):
        build(GRPOConfig, read_config_file(tmp_path / "c.yaml"))


def test_old_names_still_work_as_aliases():
    cfg = build(GRPOConfig, {"beta": 0.1, "inner_iters": 3})
    assert cfg.kl_coef == 0.1 and cfg.epochs == 3
    cfg = build(GRPOConfig, None, {"beta": 0.2})
    assert cfg.kl_coef == 0.2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["lr", "max_grad_norm", "temperature", "kl_coef"])
def test_non_finite_floats_never_pass_the_bounds(name, value):
    with pytest.raises(MlxRlError, match="finite"):
        build(GRPOConfig, None, {name: value})


def test_nan_in_a_json_config_file_is_refused(tmp_path):
    (tmp_path / "c.json").write_text('{"lr": NaN}')
    with pytest.raises(MlxRlError, match="finite"):
        build(PretrainConfig, read_config_file(tmp_path / "c.json"))


def test_bad_files_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(MlxRlError, match="not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(MlxRlError, match="mapping"):
        read_config_file(tmp_path / "list.json")
    with pytest.raises(MlxRlError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")


def test_resume_refuses_a_changed_fixed_setting_and_allows_a_resumable_one():
    saved = to_dict(GRPOConfig(group_size=8, lr=1e-4))
    with pytest.raises(MlxRlError, match=r"--group-size was 8 in this run and is 16 now"):
        check_resume_changes(GRPOConfig, saved, {"group_size": 16})
    check_resume_changes(GRPOConfig, saved, {"lr": 3e-4, "steps": 100})  # resumable: no error
    check_resume_changes(GRPOConfig, saved, {"group_size": 8})  # unchanged: no error


def test_a_task_brings_its_own_defaults_and_a_flag_or_file_still_wins(tmp_path):
    from click.testing import CliRunner

    from mlx_rl.config import command
    from mlx_rl.data.envs import TASK_CHAPTER_DEFAULTS

    seen = []
    cmd = command("pretrain", PretrainConfig, seen.append, "test")
    runner = CliRunner()
    assert runner.invoke(cmd, ["--task", "addition"]).exit_code == 0
    assert runner.invoke(cmd, ["--task", "icemaze"]).exit_code == 0
    assert runner.invoke(cmd, ["--task", "icemaze", "--steps", "7"]).exit_code == 0
    (tmp_path / "c.yaml").write_text("task: calculator\neval-every: 3\n")
    assert runner.invoke(cmd, ["-c", str(tmp_path / "c.yaml")]).exit_code == 0
    addition, icemaze, flag, from_file = seen
    assert addition.steps == PretrainConfig().steps == 3000
    assert icemaze.steps == TASK_CHAPTER_DEFAULTS["icemaze"]["pretrain"]["steps"] != addition.steps
    assert flag.steps == 7
    assert from_file.steps == TASK_CHAPTER_DEFAULTS["calculator"]["pretrain"]["steps"] and from_file.eval_every == 3
    help_text = " ".join(runner.invoke(cmd, ["--help"]).output.split())
    assert "--task icemaze 300" in help_text
