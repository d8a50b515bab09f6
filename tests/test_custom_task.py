"""A task the code base never saw, end to end: its own JSONL, its own reward file, its own characters.

The test writes a small Greek task into tmp_path (reverse a word: "λόγος⇄" -> "ςογόλ")
in TRL's conversational formats: a prompt-completion corpus, prompt-only prompt
files (train.jsonl / valid.jsonl) and a preference-pair file, and a reward file
whose first function is written the way TRL's docs write one
(`completion[0]["content"]`, a `solution` column). On the micro model, two steps
each: pretrain (a new model whose vocabulary comes from the corpus), GRPO, PPO,
DPO on-policy pairs, DPO on the pair file, and `mlx-rl eval --json`. The tiny
model's minimal chat template is what lets the conversational files run unchanged.

Then the example in examples/accents: its files load through make_task with its
own reward and config file, its reward scores its answers, and make_data.py
writes the committed files byte for byte, so the example can't rot.
About 30-60 s on a shared 2-core box.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_rl.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "accents"

WORDS = ["λόγος", "ψυχή", "θάλασσα", "ἥλιος", "φῶς", "νύξ", "ὕδωρ", "γῆ", "ἄνεμος", "δένδρον", "πέτρα", "ἀστήρ",
         "ποταμός", "ὄρος", "νῆσος", "χρόνος", "κόσμος", "μῦθος", "ἦθος", "πάθος", "λίθος", "ξένος", "ὀδούς", "ζῷον"]
NEW_CHARS = "".join(sorted(set("".join(WORDS)) | {"⇄"}))  # none of them ASCII

REWARD_PY = '''
import unicodedata


def accuracy_reward(completions, solution, **kwargs):
    """TRL's docs' shape: conversational completions, a `solution` column."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if c.strip() == s else 0.0 for c, s in zip(contents, solution)]


def greek(completions, **kwargs):
    """Partial credit: the share of the completion's characters that are Greek letters; None when it is empty."""
    out = []
    for completion in completions:
        text = completion[0]["content"].strip()
        out.append(sum("GREEK" in unicodedata.name(ch, "") for ch in text) / len(text) if text else None)
    return out
'''


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The Greek task's files: corpus, prompts/, pairs.jsonl, reward.py."""
    root = tmp_path_factory.mktemp("greek")
    corpus = [{"prompt": user(w + "⇄"), "completion": assistant(w[::-1]), "solution": w[::-1]} for w in WORDS * 2]
    write_jsonl(root / "corpus.jsonl", corpus)
    write_jsonl(root / "prompts" / "train.jsonl", [{"prompt": user(w + "⇄"), "solution": w[::-1]} for w in WORDS[:18]])
    write_jsonl(root / "prompts" / "valid.jsonl", [{"prompt": user(w + "⇄"), "solution": w[::-1]} for w in WORDS[18:]])
    write_jsonl(root / "pairs.jsonl", [{"prompt": user(w + "⇄"), "chosen": assistant(w[::-1]), "rejected": assistant(w)}
                                       for w in WORDS[:8]])
    (root / "reward.py").write_text(REWARD_PY, encoding="utf-8")
    return root


def reward_args(root):
    return ["--reward", f"{root}/reward.py:accuracy_reward", "--reward", f"{root}/reward.py:greek",
            "--reward-weights", "1,0.5"]


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Drawing PNGs is most of a two-step run's time and is tested elsewhere."""
    import mlx_rl.plots

    monkeypatch.setattr(mlx_rl.plots, "plot_run", lambda *a, **k: None)


@pytest.fixture(scope="module")
def pretrained(task, tmp_path_factory):
    """`mlx-rl pretrain --data corpus.jsonl --reward ...` on a new micro model: the run directory."""
    import mlx_rl.plots

    plot_run, mlx_rl.plots.plot_run = mlx_rl.plots.plot_run, lambda *a, **k: None  # module scope: no monkeypatch
    try:
        out = tmp_path_factory.mktemp("runs") / "pretrain"
        main(["pretrain", "--preset", "micro", "--data", str(task / "corpus.jsonl"), *reward_args(task), "--steps", "2",
              "--batch-size", "4", "--eval-every", "0", "--eval-prompts", "4", "--no-compile", "--out", str(out)])
    finally:
        mlx_rl.plots.plot_run = plot_run
    return out


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_builds_the_vocabulary_from_the_corpus(pretrained):
    from mlx_lm import load

    evals = [m for m in metrics(pretrained) if "eval/accuracy" in m]
    assert evals and {"eval/reward_accuracy_reward", "eval/reward_greek"} <= evals[-1].keys()
    _, tokenizer = load(str(pretrained / "checkpoint"))
    vocab = tokenizer.get_vocab()
    assert all(ch in vocab for ch in NEW_CHARS), [ch for ch in NEW_CHARS if ch not in vocab]
    for word in WORDS:
        ids = tokenizer.encode(word + "⇄", add_special_tokens=False)
        assert vocab["<unk>"] not in ids
        assert len(ids) == len(word) + 1  # one token per character
        assert tokenizer.decode(ids) == word + "⇄"
    # The chat template renders a conversational prompt as BOS + its text: the corpus's prompts fit the model.
    ids = tokenizer.apply_chat_template(user("λόγος⇄"), add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<bos>λόγος⇄"


@pytest.mark.parametrize("chapter,args", [
    ("grpo", ["--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8", "--pass-k", "1,2",
              "--pass-k-prompts", "2"]),
    ("ppo", ["--rollout-batch", "4", "--minibatch-size", "4", "--max-new-tokens", "8", "--value-warmup", "0",
             "--pass-k", ""]),
    ("dpo", ["--pair-prompts", "6", "--samples-per-prompt", "4", "--batch-size", "2", "--rounds", "1"]),
])
def test_rl_chapters_run_on_the_custom_task(task, pretrained, tmp_path, chapter, args):
    out = tmp_path / chapter
    main([chapter, "--model", str(pretrained / "checkpoint"), "--data", str(task / "prompts"), *reward_args(task),
          "--steps", "2", "--eval-every", "0", "--eval-prompts", "4", "--no-compile", "--out", str(out), *args])
    rows = metrics(out)
    assert max(m.get("step", 0) for m in rows) == 2
    assert any("eval/accuracy" in m for m in rows)
    assert json.loads((out / "config.json").read_text())["data"] == str(task / "prompts")
    if chapter == "grpo":  # a user's reward is a verifier once it has returned only 0s and 1s: pass@k is reported
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["details"]["pass_at_k"]["start"]) == {"pass@1", "pass@2"}
    if chapter == "dpo":  # the on-policy pairs were ranked by the user's reward and written as TRL-style JSONL
        pairs = [json.loads(line) for line in (out / "pairs-round0.jsonl").read_text().splitlines()]
        assert pairs and all({"prompt", "chosen", "rejected"} <= p.keys() for p in pairs)


def test_dpo_reads_a_trl_conversational_pair_file(task, pretrained, tmp_path):
    out = tmp_path / "dpo-pairs"
    main(["dpo", "--model", str(pretrained / "checkpoint"), "--pairs", str(task / "pairs.jsonl"), "--data",
          str(task / "prompts"), *reward_args(task), "--steps", "2", "--batch-size", "2", "--eval-prompts", "4",
          "--no-compile", "--out", str(out)])
    rows = metrics(out)
    assert [m["pairs/count"] for m in rows if "pairs/count" in m] == [8]
    assert max(m.get("step", 0) for m in rows) == 2


def test_a_bad_pair_file_stops_before_the_run_is_written(task, pretrained, tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "λόγος⇄"}], "chosen": "ςογόλ"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--model", str(pretrained / "checkpoint"), "--pairs", str(bad), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:1: missing key 'rejected'"
    assert not (tmp_path / "run").exists()


def test_eval_json_on_the_custom_task(task, pretrained, capsys):
    capsys.readouterr()
    main(["eval", "--model", str(pretrained / "checkpoint"), "--data", str(task / "prompts"), *reward_args(task),
          "--max-new-tokens", "8", "--show-samples", "2", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert "note:" not in captured.err  # a model pretrained on a corpus is meant to be evaluated on prompt files
    assert report["prompts"] == len(WORDS) - 18  # every row of valid.jsonl
    assert 0.0 <= report["eval/accuracy"] <= 1.0 and "eval/reward_greek" in report
    assert len(report["samples"]) == 2 and report["samples"][0]["prompt"] == user(WORDS[18] + "⇄")


def test_reward_none_and_the_trl_signature(task):
    from mlx_rl.data.rewards import load_rewards

    rewards = load_rewards([f"{task}/reward.py:accuracy_reward", f"{task}/reward.py:greek"], [1.0, 0.5])
    prompts = [user("λόγος⇄")] * 3
    scores = rewards.score(prompts, ["ςογόλ", "abc", ""], {"solution": ["ςογόλ"] * 3})
    assert scores.per_reward["accuracy_reward"].tolist() == [1.0, 0.0, 0.0]
    assert scores.total.tolist() == [1.5, 0.0, 0.0]  # greek: 1, 0 and None (left out of the sum)
    assert scores.metrics()["reward/greek"] == 0.5  # the mean over the two rows it applied to


# --- the example folder: its files load, its reward scores them, its generator writes them ---------------


def example_config(monkeypatch):
    """The example's GRPO config file, read the way `mlx-rl grpo -c` reads it (paths relative to the repo root)."""
    from mlx_rl.chapters.grpo import GRPOConfig
    from mlx_rl.config import build, read_config_file

    monkeypatch.chdir(ROOT)
    return build(GRPOConfig, read_config_file(EXAMPLE / "grpo.yaml"))


def test_example_files_load_with_its_reward_and_config(monkeypatch):
    import dataclasses

    from mlx_rl.data.tasks import make_task
    from mlx_rl.engine.models import new_tiny_model

    cfg = example_config(monkeypatch)
    task = make_task(cfg)  # prompts/ with its reward: columns checked, reward file imported
    assert len(task.data.train) == 2000 and len(task.data.valid) == 500 and not task.data.held_out
    valid = task.heldout_rows(500, seed=0)
    answers = [r["answer"] for r in valid]
    columns = {"answer": answers, "kind": [r["kind"] for r in valid]}
    right = task.rewards.score([r["prompt"] for r in valid], answers, columns)
    assert right.accuracy == 1.0 and task.rewards.is_verifier()
    sys.path.insert(0, str(EXAMPLE))
    try:
        from make_data import strip_accents
    finally:
        sys.path.remove(str(EXAMPLE))
    mistaken = task.rewards.score([r["prompt"] for r in valid], [strip_accents(a) for a in answers], columns)
    plain = sum(r["kind"] == "plain" for r in valid) / len(valid)
    assert mistaken.accuracy == pytest.approx(plain) and 0.2 < plain < 0.4  # the corpus's mistake: the plateau

    corpus = make_task(dataclasses.replace(cfg, data=str(EXAMPLE / "corpus.jsonl")), corpus=True)
    assert corpus.data.format == "completions" and {"prompt", "answer", "kind"} <= corpus.heldout_rows(5, 0)[0].keys()
    wrong = sum(r["completion"] != r["answer"] for r in corpus.data.train) / len(corpus.data.train)
    assert 0.4 < wrong < 0.6  # 0.75 of the ~70% of words with accents
    words = {r["prompt"] for r in corpus.data.train + corpus.data.valid}
    assert not words & {r["prompt"] for r in task.data.valid}  # held-out words are never in the corpus
    assert not {r["prompt"] for r in task.data.train} & {r["prompt"] for r in task.data.valid}

    _, tokenizer, _ = new_tiny_model("micro", 0, corpus.chars())
    text = "".join(sorted(set("".join(answers + [r["prompt"] for r in valid]))))
    assert "É" in text and "→" in text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.get_vocab()["<unk>"] not in tokenizer.encode(text, add_special_tokens=False)


def test_example_make_data_writes_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("corpus.jsonl", "prompts/train.jsonl", "prompts/valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name
