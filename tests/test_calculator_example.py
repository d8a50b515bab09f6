"""examples/calculator: the recipe's files can't rot, and its settings run end to end on a small local chat model.

The real model (SmolLM2-135M-Instruct) is a download away, so the recipe's two commands run here on a random
checkpoint of a real architecture with a chat template (mlx_rl.testing), one step each: the fine-tune reads
the transcripts with their tool messages, and GRPO plays episodes with examples/calculator/env.py.
"""

import json
import subprocess
import sys
from pathlib import Path


from mlx_rl.chapters.grpo import GRPOConfig
from mlx_rl.chapters.pretrain import PretrainConfig
from mlx_rl.config import build, read_config_file
from mlx_rl.data.tasks import make_task
from mlx_rl.runs import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "calculator"
FILES = ["sft.jsonl", "prompts/train.jsonl", "prompts/valid.jsonl"]


def test_make_data_writes_the_committed_files(tmp_path):
    before = {name: (EXAMPLE / name).read_bytes() for name in FILES}
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py")], check=True, capture_output=True)
    for name in FILES:
        assert (EXAMPLE / name).read_bytes() == before[name], f"{name} differs: rerun make_data.py"


def test_transcripts_are_right_and_held_out_questions_are_never_seen():
    sft = [json.loads(line)["messages"] for line in (EXAMPLE / "sft.jsonl").read_text().splitlines()]
    train, valid = (read_jsonl(EXAMPLE / "prompts" / f"{s}.jsonl") for s in ("train", "valid"))
    assert len(sft) == 400 and len(train) == 2000 and len(valid) == 100
    seen = {m[1]["content"] for m in sft} | {r["prompt"] for r in train}
    assert not seen & {r["prompt"] for r in valid}
    tool = [m for m in sft if len(m) == 5]
    assert 0.2 < len(tool) / len(sft) < 0.4  # the writer calls the calculator three times in ten
    for m in tool:
        a, b = (int(x) for x in m[2]["content"][6:-7].split("*"))
        assert m[3] == {"role": "tool", "content": f"[{a * b}]"} and m[4]["content"] == str(a * b)


def test_the_recipe_runs_on_a_small_chat_model(tmp_path):
    from mlx_rl.testing import build_checkpoint

    base = build_checkpoint(tmp_path / "base", "llama")
    run = lambda *args: subprocess.run([sys.executable, "-m", "mlx_rl", *args], capture_output=True, text=True,  # noqa: E731
                                       timeout=600, cwd=ROOT)
    sft, rl = tmp_path / "sft", tmp_path / "grpo"
    p = run("pretrain", "-c", str(EXAMPLE / "sft.yaml"), "--model", str(base), "--steps", "2", "--out", str(sft))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    p = run("grpo", "-c", str(EXAMPLE / "grpo.yaml"), "--model", str(sft / "checkpoint"), "--steps", "1",
            "--prompts-per-step", "2", "--eval-prompts", "4", "--out", str(rl))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    metrics = read_jsonl(rl / "metrics.jsonl")
    assert "env/tool_calls" in metrics[-1] and "eval/accuracy" in metrics[0]
    cfg = build(GRPOConfig, read_config_file(EXAMPLE / "grpo.yaml"))
    assert cfg.lora_rank == 8 and cfg.chat_template and cfg.env.endswith("env.py:make")
    task = make_task(cfg)
    assert task.env.max_turns == 3 and len(task.heldout_rows(cfg.eval_prompts, 0)) == 100
    assert build(PretrainConfig, read_config_file(EXAMPLE / "sft.yaml")).lora_rank == 8


def test_the_environment_reads_calls_and_answers():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import env as calculator
    finally:
        sys.path.remove(str(EXAMPLE))
    e = calculator.make({"answer": "1665"})
    assert e.reset() == "" and e.stop == ["</calc>"] and e.role == "tool"
    assert e.step("<calc>37*45</calc>") == ("[1665]", 0.0, False)
    assert e.step("<calc>import os</calc>") == ("[error]", 0.0, False)
    assert e.step("About 1600.") == (None, 0.0, True) and not e.solved
    assert e.info == {"tool_calls": 2, "tool_errors": 1}
    e = calculator.make({"answer": "1665"})
    assert e.step("It is 1,665") == (None, 1.0, True) and e.solved
