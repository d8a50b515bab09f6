"""examples/smollm2: the two chat tasks load as data + reward, the recipe's settings are valid, and the data can't rot.

No model is loaded (the real one is 538 MB and a download away): make_data.py writes the committed files
byte for byte; the held-out questions are never trained on and every answer is right; grpo.yaml builds a
GRPOConfig whose task (data + rewards, columns checked) make_task accepts; the reward pays 1 for the right
number, read leniently as a chat model writes it, and 0.1 more for the number alone.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_rl.chapters.grpo import GRPOConfig
from mlx_rl.config import build, read_config_file
from mlx_rl.data.tasks import make_task

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smollm2"


def rows(task, split):
    return [json.loads(line) for line in (EXAMPLE / task / f"{split}.jsonl").read_text().splitlines()]


def test_make_data_writes_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for task in ("addition", "larger"):
        for split in ("train", "valid"):
            name = f"{task}/{split}.jsonl"
            assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), f"{name} differs: rerun make_data.py"


@pytest.mark.parametrize("task", ["addition", "larger"])
def test_answers_are_right_and_held_out_questions_are_never_trained_on(task):
    train, valid = rows(task, "train"), rows(task, "valid")
    assert len(train) == 2000 and len(valid) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in valid}
    assert len({r["prompt"] for r in train}) == len(train)
    for r in train + valid:
        a, b = (int(x) for x in __import__("re").findall(r"\d+", r["prompt"]))
        if task == "addition":
            assert r["answer"] == a + b and r["kind"] == ("carry" if a % 10 + b % 10 >= 10 else "no_carry")
        else:
            assert a != b and r["answer"] == max(a, b) and r["kind"] == ("first" if a > b else "second")
    kinds = [r["kind"] for r in valid[:100]]
    assert 0.3 < kinds.count(kinds[0]) / 100 < 0.7  # both kinds in the held-out set evaluation reads


def test_recipe_builds_a_task_whose_reward_reads_chat_answers():
    cfg = build(GRPOConfig, read_config_file(EXAMPLE / "grpo.yaml"))
    assert cfg.lora_rank == 8 and cfg.chat_template and cfg.kl_coef > 0 and cfg.lr <= 5e-5
    task = make_task(cfg)
    assert len(task.heldout_rows(cfg.eval_prompts, cfg.seed)) == cfg.eval_prompts
    prompts = ["Which number is larger, 37 or 45? Answer with just the number."] * 5
    completions = ["45", "45.", "37 + 45 = 45", "The larger number is 45.", "37"]
    scores = task.rewards.score(prompts, completions, {"answer": [45] * 5, "kind": ["second"] * 5})
    assert scores.per_reward["lenient_numeric"].tolist() == [1, 1, 1, 1, 0]
    assert scores.per_reward["format"].tolist() == [1, 1, 0, 0, 1]
    assert scores.total.tolist() == pytest.approx([1.1, 1.1, 1.0, 1.0, 0.1])
    assert task.rewards.is_verifier()  # eval/accuracy is lenient_numeric's mean
