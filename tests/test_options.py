"""One meaning per name: every command's options walked and checked against the table in mlx_rl/options.py."""

import collections
import re

import click
import pytest

from mlx_rl.cli import COMMANDS, group, main
from mlx_rl.options import ALIASES, MEANINGS

SCOPE = re.compile(r"^[\w@-]+: ")  # "icemaze: the board", "LoRA: adapt the last N ..."


def all_options():
    """[(command, canonical name, [older names], help, kind)] for every option of every command."""
    ctx = click.Context(group)
    out = []
    for name in COMMANDS:
        cmd = group.get_command(ctx, name)
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            longs = [o[2:] for o in p.opts if o.startswith("--")]
            canonical = p.name.replace("_", "-") if p.name.replace("_", "-") in longs else longs[0]
            kind = "flag" if p.is_flag else getattr(p.type, "name", str(p.type))
            out.append((name, canonical, [o for o in longs if o != canonical], p.help or "", kind))
    return out


OPTIONS = all_options()


def test_every_shared_name_has_one_meaning_in_the_table():
    commands = collections.defaultdict(set)
    for command, name, *_ in OPTIONS:
        commands[name].add(command)
    missing = sorted(n for n, cmds in commands.items() if len(cmds) > 1 and n not in MEANINGS)
    assert not missing, f"options used by several commands with no meaning in mlx_rl/options.py: {missing}"
    unused = sorted(set(MEANINGS) - set(commands))
    assert not unused, f"mlx_rl/options.py lists options no command has: {unused}"


def test_each_help_starts_with_the_names_meaning():
    wrong = []
    for command, name, _, help_text, _ in OPTIONS:
        meaning = MEANINGS.get(name)
        if meaning is None:
            continue
        if not (help_text.startswith(meaning) or SCOPE.sub("", help_text).startswith(meaning)):
            wrong.append(f"{command} --{name}: {help_text!r} does not start with {meaning!r}")
    assert not wrong, "\n".join(wrong)


def test_a_shared_name_takes_the_same_kind_of_value_everywhere():
    kinds = collections.defaultdict(set)
    for command, name, _, _, kind in OPTIONS:
        if name in MEANINGS and name != "out":  # --out: a run directory, a file or a folder (click.Path or text)
            kinds[name].add("flag" if kind == "flag" else "number" if kind in ("integer", "float") else "value")
    mixed = {n: k for n, k in kinds.items() if len(k) > 1}
    assert not mixed, f"a name that is a flag in one command and takes a value in another: {mixed}"


def test_older_names_are_listed_and_never_a_name_of_their_own():
    canonical = {name for _, name, *_ in OPTIONS}
    seen = collections.defaultdict(dict)
    for command, name, older, *_ in OPTIONS:
        for old in older:
            if old.startswith("no-") or old.startswith("keep-"):  # the off switch of a flag
                continue
            seen[old][command] = name
    assert dict(seen) == ALIASES
    assert not canonical & set(ALIASES), "an older name is also the current name of some option"


def test_the_issue_names_mean_one_thing():
    by = {(c, n): h for c, n, _, h, _ in OPTIONS}
    assert ("grpo", "kl-coef") in by and ("dpo", "dpo-beta") in by
    assert ("eval", "eval-prompts") in by and ("eval", "prompts") not in by
    assert "in steps" in by[("ppo", "warmup")] or by[("ppo", "warmup")].startswith("linear learning-rate warm-up steps")
    assert ("grpo", "weight-decay") in by and ("grpo", "lr-schedule") in by


@pytest.mark.parametrize("argv, note", [
    (["grpo", "--beta", "0.1", "--help"], "note: --beta is now --kl-coef"),
    (["dpo", "--beta=0.2", "--help"], "note: --beta is now --dpo-beta"),
    (["eval", "--prompts", "3", "--help"], "note: --prompts is now --eval-prompts"),
    (["kl", "--prompts", "3", "--help"], "note: --prompts is now --sample-prompts"),
])
def test_an_older_name_says_in_one_line_what_it_became(capsys, argv, note):
    main(argv)  # --help: parsed (so the note is printed), then help and exit 0
    err = capsys.readouterr().err
    assert note in err and len([line for line in err.splitlines() if line.startswith("note:")]) == 1


def test_an_older_config_key_says_what_it_became(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("beta: 0.2\nsteps: 0\n")
    with pytest.raises(SystemExit):
        main(["dpo", "-c", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert "note: config key 'beta' is now 'dpo_beta'" in err
    assert "error: setting 'steps'" not in err or "dpo_beta" in err


def test_eval_model_is_required_and_shows_no_empty_default(capsys):
    main(["eval", "--help"])
    out = capsys.readouterr().out
    assert 'default: ""' not in out
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == 2 and "--model is required" in capsys.readouterr().err


def test_icemaze_episodes_help_shows_the_defaults(capsys):
    main(["icemaze", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "DEFAULT_EPISODES" not in out and "q_learning 4x4 2000" in out

