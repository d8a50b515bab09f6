"""Bad input, as a new user or a fault injector gives it: each case exits non-zero with one line naming the
problem, no traceback, and an existing run directory is left exactly as it was."""

import hashlib
import json
import shutil

import pytest

from mlx_rl.cli import main


def snapshot(path):
    """{relative path: sha256} of every file under path."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_micro):
    """A finished run, a checkpoint, and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    main(["pretrain", "--preset", "micro", "--steps", "2", "--batch-size", "8", "--eval-every", "0", "--eval-prompts", "10",
          "--out", str(run)])
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(trained_micro[1], no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    (no_tokenizer / "chat_template.jinja").unlink(missing_ok=True)
    big_vocab = root / "big-vocab"
    shutil.copytree(trained_micro[1], big_vocab)
    tok = json.loads((big_vocab / "tokenizer.json").read_text())
    tok["model"]["vocab"]["\u00e9\u00e9"] = 5000  # an id far past the 100-odd embeddings
    (big_vocab / "tokenizer.json").write_text(json.dumps(tok))
    (root / "pairs-latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    (root / "data.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 20 + '{"prompt": 3}\n')
    (root / "cyrillic.jsonl").write_text("".join(json.dumps({"prompt": f"жё{i}", "answer": "ж"}) + "\n" for i in range(40)))
    (root / "noanswer.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(40)))
    (root / "broken_reward.py").write_text("def score(prompts, completions, **kw):\n    return [1.0 for c in completions\n")
    (root / "raises.py").write_text("def score(prompts, completions, **kw):\n    raise ValueError('cannot parse')\n")
    (root / "empty").mkdir()
    (root / "empty" / "metrics.jsonl").write_text("")
    (root / "a-file").write_text("not a directory")
    return root, run, trained_micro[1]


CASES = {  # name: (args with {root}, {run}, {ckpt} filled in, a phrase the one line must hold)
    "out is a file": (["pretrain", "--preset", "micro", "--steps", "2", "--out", "{root}/a-file"], "is a file"),
    "out exists": (["pretrain", "--preset", "micro", "--steps", "2", "--out", "{run}"], "already exists"),
    "out unwritable": (["pretrain", "--preset", "micro", "--steps", "2", "--out", "/proc/mlx-rl-run"], "cannot"),
    "no tokenizer": (["grpo", "--model", "{root}/no-tokenizer", "--steps", "1"], "no tokenizer files"),
    "tokenizer past vocabulary": (["grpo", "--model", "{root}/big-vocab", "--steps", "1"], "token embeddings"),
    "no such model": (["grpo", "--model", "{root}/nowhere", "--steps", "1"], "no such checkpoint"),
    "pairs not UTF-8": (["dpo", "--model", "{ckpt}", "--pairs", "{root}/pairs-latin1.jsonl"], "UTF-8"),
    "huge group size": (["grpo", "--model", "{ckpt}", "--group-size", "10000000"], "GB"),
    "lr nan": (["pretrain", "--lr", "nan"], "finite"),
    "lr inf": (["pretrain", "--lr", "inf"], "finite"),
    "max grad norm nan": (["grpo", "--max-grad-norm", "nan"], "finite"),
    "temperature nan": (["ppo", "--temperature", "nan"], "finite"),
    "unknown task": (["grpo", "--model", "{ckpt}", "--task", "mult"], "built-in tasks are addition, sort"),
    "malformed data": (["grpo", "--model", "{ckpt}", "--data", "{root}/data.jsonl", "--reward", "exact"], "data.jsonl:21"),
    "characters the tokenizer lacks": (["grpo", "--model", "{ckpt}", "--data", "{root}/cyrillic.jsonl", "--reward", "exact"],
                                       "has no token for"),
    "reward needs a column": (["grpo", "--model", "{ckpt}", "--data", "{root}/noanswer.jsonl", "--reward", "exact"],
                              "needs column 'answer'"),
    "reward file fails to import": (["grpo", "--model", "{ckpt}", "--reward", "{root}/broken_reward.py:score"],
                                    "SyntaxError"),
    "reward raises": (["grpo", "--model", "{ckpt}", "--steps", "1", "--eval-prompts", "5", "--pass-k", "",
                       "--reward", "{root}/raises.py:score", "--out", "{root}/raises-run"], "cannot parse"),
    "resume the wrong command": (["grpo", "--resume", "{run}"], "that is a `pretrain` run"),
    "resume nowhere": (["grpo", "--resume", "{root}/nowhere"], "no such run directory"),
    "resume with a changed setting": (["pretrain", "--resume", "{run}", "--batch-size", "4", "--steps", "5"],
                                      "--batch-size was 8"),
    "plot an empty log": (["plot", "{root}/empty"], "metrics"),
    "profile an empty log": (["profile", "{root}/empty"], "no training steps"),
    "weights without reward": (["grpo", "--model", "{ckpt}", "--reward-weights", "1"], "needs --reward"),
    "data without reward": (["grpo", "--model", "{ckpt}", "--data", "{root}/noanswer.jsonl"], "--reward"),
    "unknown option value": (["grpo", "--variant", "ppo2"], "ppo2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_leaves_the_run_alone(world, case, capsys):
    root, run, ckpt = world
    args, phrase = CASES[case]
    args = [a.format(root=root, run=run, ckpt=ckpt) for a in args]
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and phrase in lines[-1], err
    assert lines[-1].startswith(("error:", "Error:", "Usage:")) or "error" in lines[-1].lower(), err
    assert snapshot(run) == before  # the existing run directory is untouched
    if case == "reward raises":
        assert "score" in lines[-1] and "row" in lines[-1]
