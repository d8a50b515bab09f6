"""Every chapter that takes --lora-rank learns something with it: after one update (two for the reward model, whose
head starts at zero) at least one LoRA B matrix (zero
when the adapters are made) has moved, and the saved model's log-probs on a fixed batch of tokens differ from the
base model's. A LoRA trainer that silently trains nothing (its adapters frozen, its gradients taken outside the
differentiated function, or the fused checkpoint saved without them) fails here.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_rl.cli import main

EVAL_OFF = ["--eval-every", "0", "--eval-prompts", "8"]


def pairs_file(tmp_path):
    from mlx_rl.data.tasks import get_task

    task = get_task("addition")
    rows = task.train_rows(np.random.default_rng(0), 8, distinct=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["answer"], "rejected": "000"}) + "\n"
                            for r in rows))
    return path


def chapter_args(name, tmp_path):
    return {
        "pretrain": ["pretrain", "--steps", "1", "--batch-size", "8"],
        "grpo": ["grpo", "--steps", "1", "--prompts-per-step", "4", "--group-size", "8"],
        "ppo": ["ppo", "--steps", "1", "--rollout-batch", "16", "--minibatch-size", "8", "--value-warmup", "0"],
        "dpo": ["dpo", "--steps", "1", "--pairs", str(pairs_file(tmp_path)), "--batch-size", "4"],
        "distill": ["distill", "--steps", "1", "--prompts-per-step", "8"],
        # the reward head starts at zero, so the first update moves the head alone (no gradient reaches the body
        # through a zero head): the second moves the adapters
        "reward-model": ["reward-model", "--steps", "2", "--batch-size", "8", "--pair-prompts", "40"],
    }[name]


def logprobs(model, ids):
    logits = model(ids).astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(lp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0])


@pytest.mark.parametrize("name", ["pretrain", "grpo", "ppo", "dpo", "distill", "reward-model"])
def test_one_lora_update_moves_the_adapters_and_the_policy(tmp_path, trained_micro, micro_checkpoint, name):
    import mlx_lm

    base = micro_checkpoint if name == "distill" else trained_micro[1]  # distill: a fresh student, a trained teacher
    out = tmp_path / name
    args = chapter_args(name, tmp_path) + ["--model", str(base), "--lora-rank", "8", "--out", str(out), *EVAL_OFF]
    if name == "distill":
        args += ["--teacher", str(trained_micro[1])]
    main(args)
    adapters = mx.load(str(out / "checkpoint" / "adapters" / "adapters.safetensors"))
    b = {k: np.array(v) for k, v in adapters.items() if k.endswith("lora_b")}
    assert b, sorted(adapters)
    assert max(float(np.abs(v).max()) for v in b.values()) > 0, "every LoRA B matrix is still zero after an update"

    ids = mx.array(np.random.default_rng(1).integers(3, 20, size=(4, 12)))
    base_model, _ = mlx_lm.load(str(base))
    trained, _ = mlx_lm.load(str(out / "checkpoint"))  # the fused checkpoint, as mlx_lm loads it
    moved = np.abs(logprobs(trained, ids) - logprobs(base_model, ids)).max()
    assert moved > 1e-6, moved
