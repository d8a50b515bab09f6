"""Nothing silently ignored or overwritten: a config file's run-only keys, an existing output file, an unwritable --out."""

import json

import pytest

from mlx_rl.cli import main


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("text, key", [("out: somewhere\n", "out"), ("resume: runs/x\n", "resume"),
                                       ("runtime: {}\n", "runtime")])
def test_a_config_files_run_only_key_is_an_error_naming_it(tmp_path, capsys, text, key):
    (tmp_path / "c.yaml").write_text(text + "steps: 2\n")
    err = one_line_error(capsys, ["grpo", "-c", str(tmp_path / "c.yaml")])
    assert f"'{key}'" in err and "config file" in err


def test_a_runs_own_config_json_repeats_it_in_a_new_directory(tmp_path, capsys):
    """A run's config.json records out/command/runtime: `-c RUN/config.json` reads its settings, not its location
    (the run's own steps: 0 is refused by the bounds check, which comes after the file's keys were accepted)."""
    (tmp_path / "config.json").write_text(json.dumps({"command": "grpo", "out": "runs/old", "resume": None,
                                                      "runtime": {"mlx": "x"}, "steps": 0}))
    err = one_line_error(capsys, ["grpo", "-c", str(tmp_path / "config.json")])
    assert "setting 'steps'" in err and ">= 1" in err


def test_another_commands_run_config_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"command": "ppo", "out": "runs/old", "steps": 2}))
    err = one_line_error(capsys, ["grpo", "-c", str(tmp_path / "config.json")])
    assert "`ppo` run" in err and "mlx-rl ppo -c" in err


def test_dpo_pairs_never_overwrites_an_existing_file(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text("mine\n")
    err = one_line_error(capsys, ["dpo-pairs", "--out", str(out), "--model", str(tmp_path / "no-model")])
    assert "already exists" in err and "--force" in err
    assert out.read_text() == "mine\n"


def test_label_pairs_never_overwrites_an_existing_file(tmp_path, capsys):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "valid.jsonl").write_text("mine\n")
    err = one_line_error(capsys, ["label-pairs", "--out", str(tmp_path / "pairs"), "--pair-prompts", "4",
                                  "--eval-prompts", "4"])
    assert "valid.jsonl already exists" in err
    assert (tmp_path / "pairs" / "valid.jsonl").read_text() == "mine\n"
    assert not (tmp_path / "pairs" / "train.jsonl").exists()
    main(["label-pairs", "--out", str(tmp_path / "pairs"), "--pair-prompts", "4", "--eval-prompts", "4", "--force"])
    assert (tmp_path / "pairs" / "valid.jsonl").read_text() != "mine\n"


@pytest.mark.parametrize("command", ["dpo-pairs", "plot"])
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "wall_s": 1.0, "loss/total": 1.0}) + "\n")
    (run / "config.json").write_text(json.dumps({"command": "grpo"}))
    argv = {"dpo-pairs": ["dpo-pairs", "--out", str(blocker / "pairs.jsonl"), "--model", str(tmp_path / "m")],
            "plot": ["plot", str(run), "--out", str(blocker / "plots")]}[command]
    err = one_line_error(capsys, argv)
    assert "is a file, not a folder" in err


def test_resume_of_weights_without_trainer_state_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"command": "grpo", "steps": 2}))
    (run / "checkpoint" / "model.safetensors").write_bytes(b"weights a user cares about")
    err = one_line_error(capsys, ["grpo", "--resume", str(run)])
    assert "no trainer_state.json" in err and "--model" in err
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == b"weights a user cares about"


def test_a_reward_files_folder_goes_last_on_sys_path(tmp_path, monkeypatch):
    """A helper beside the reward file is found, but never in place of an installed module of the same name."""
    import sys

    from mlx_rl.data.rewards import import_file

    installed, mine = tmp_path / "site", tmp_path / "mine"
    installed.mkdir()
    mine.mkdir()
    (installed / "mlxrl_shared_name.py").write_text("WHO = 'installed'\n")
    (mine / "mlxrl_shared_name.py").write_text("WHO = 'beside the reward file'\n")
    (mine / "mlxrl_own_helper.py").write_text("WHO = 'helper'\n")
    (mine / "my_reward.py").write_text("import mlxrl_own_helper, mlxrl_shared_name\n"
                                       "def score(completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(installed))
    for name in ("mlxrl_shared_name", "mlxrl_own_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    before = list(sys.path)
    module = import_file(mine / "my_reward.py", "my_reward.py:score", {})
    assert module.mlxrl_shared_name.WHO == "installed" and module.mlxrl_own_helper.WHO == "helper"
    assert sys.path == before
    for name in ("mlxrl_shared_name", "mlxrl_own_helper"):
        sys.modules.pop(name, None)
