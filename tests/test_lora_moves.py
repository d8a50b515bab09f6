"""A LoRA run learns something: for every chapter that takes --lora-rank, one update on the micro model changes
some LoRA B matrix (mlx-lm starts B at zero) and moves the saved policy's log-probs on a fixed batch.

Not here: icemaze and kl (no language model to adapt), dpo-pairs and label-pairs (they make data, train nothing).
"""

import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_rl.cli import main
from mlx_rl.data import tasks
from mlx_rl.engine.logprobs import token_logprobs

ECHO = str(Path(__file__).resolve().parent / "envs" / "echo_env.py") + ":make"
ECHO_DATA = str(Path(__file__).resolve().parent / "envs" / "echo_data")
GROUP = ["--group-size", "4", "--prompts-per-step", "2", "--pass-k", ""]

# chapter -> (command, its smallest batch); "{teacher}" is filled in with a second micro model
CASES = {
    "pretrain": ["pretrain", "--batch-size", "4"],
    **{f"grpo-{v}": ["grpo", "--variant", v, *GROUP] for v in ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo")},
    # the echo environment pays for short turns, which a random model writes now and then: more rows
    "grpo-agent": ["grpo", "--env", ECHO, "--data", ECHO_DATA, "--group-size", "4", "--prompts-per-step", "8",
                   "--pass-k", ""],
    "ppo": ["ppo", "--rollout-batch", "4", "--minibatch-size", "4", "--value-warmup", "0"],
    "ppo-agent": ["ppo", "--env", ECHO, "--data", ECHO_DATA, "--rollout-batch", "32", "--minibatch-size", "32",
                  "--value-warmup", "0"],
    "dpo": ["dpo", "--batch-size", "2", "--pair-prompts", "6", "--samples-per-prompt", "2"],
    "distill": ["distill", "--teacher", "{teacher}", "--prompts-per-step", "4"],
    # two steps: the reward head starts at zero, so the first step's gradient reaches no adapter (by design)
    "reward-model": ["reward-model", "--batch-size", "4", "--pair-prompts", "20", "--steps", "2"],
}


def text_reward(completions, **kwargs):
    return [(sum(map(ord, c)) % 7) / 6.0 for c in completions]  # deterministic, and varies between samples


@pytest.fixture
def varied_reward(monkeypatch):
    """A random micro model never earns the addition reward (every group would carry zero signal and skip its
    update): the built-in tasks reward a checksum of the completion's text instead."""
    monkeypatch.setattr(tasks.BuiltinTask, "reward_specs", (text_reward,))
    monkeypatch.setattr(tasks.BuiltinTask, "reward_weights", (1.0,))
    import mlx_rl.plots

    monkeypatch.setattr(mlx_rl.plots, "plot_run", lambda *a, **k: None)  # drawing is tested elsewhere


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from mlx_rl.engine.checkpoint import save_checkpoint
    from mlx_rl.engine.models import new_tiny_model

    path = tmp_path_factory.mktemp("teacher") / "checkpoint"
    save_checkpoint(path, *new_tiny_model("micro", seed=1))
    return path


def logprobs_of(checkpoint, text="12+34=46"):
    from mlx_lm import load

    model, tokenizer = load(str(checkpoint))
    tokens = mx.array([tokenizer.encode(text, add_special_tokens=False)])
    return token_logprobs(model, tokens)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_one_lora_update_moves_the_adapters_and_the_policy(tmp_path, micro_checkpoint, teacher, varied_reward, case):
    args = [str(teacher) if a == "{teacher}" else a for a in CASES[case]]
    out = tmp_path / "run"
    steps = [] if "--steps" in args else ["--steps", "1"]
    main([*args, "--model", str(micro_checkpoint), "--lora-rank", "8", *steps, "--lr", "1e-3", "--warmup", "0",
          "--eval-every", "0", "--eval-prompts", "2", "--out", str(out)])
    adapters = mx.load(str(out / "checkpoint" / "adapters" / "adapters.safetensors"))
    config = json.loads((out / "checkpoint" / "adapters" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 8
    b_mats = {k: v for k, v in adapters.items() if k.endswith("lora_b")}
    assert b_mats and max(mx.abs(v).max().item() for v in b_mats.values()) > 0, "no LoRA B matrix moved from 0"
    moved = mx.abs(logprobs_of(out / "checkpoint") - logprobs_of(micro_checkpoint)).max().item()
    assert moved > 1e-6, f"the fused policy's log-probs did not move ({moved})"
