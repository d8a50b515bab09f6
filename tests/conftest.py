from mlx_rl.engine import speed

speed.enable()  # OpenBLAS before anything imports mlx (conftest is imported before every test module)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_model():
    """A fresh micro model (137,920 parameters) and its tokenizer."""
    from mlx_rl.engine.models import new_tiny_model

    return new_tiny_model("micro", seed=0)


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory, micro_model):
    """The micro model saved as an mlx-lm checkpoint directory."""
    from mlx_rl.engine.checkpoint import save_checkpoint

    model, tokenizer, config = micro_model
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(path, model, tokenizer, config)
    return path


@pytest.fixture(scope="session")
def trained_micro(tmp_path_factory):
    """A micro model pretrained briefly on addition via the CLI: (run dir, checkpoint dir)."""
    from mlx_rl.cli import main

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    main(["pretrain", "--preset", "micro", "--steps", "150", "--batch-size", "32", "--eval-every", "0",
          "--eval-prompts", "50", "--out", str(out)])
    return out, out / "checkpoint"


@pytest.fixture(scope="session")
def addition_plateau(tmp_path_factory):
    """The pretraining chapter's default run on addition (the plateau every RL chapter starts from), made once
    for the slow suite's default-run tests of GRPO, PPO and DPO: its checkpoint directory."""
    from mlx_rl.cli import main

    out = tmp_path_factory.mktemp("plateau") / "pretrain"
    main(["pretrain", "--task", "addition", "--out", str(out)])
    return out / "checkpoint"
