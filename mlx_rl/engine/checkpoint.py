"""Checkpoints: a standard mlx-lm checkpoint directory, plus what --resume needs, written atomically.

    RUN/checkpoint/config.json, model*.safetensors, tokenizer files   what `mlx_lm.load` reads
    RUN/checkpoint/trainer_state.json          step, wall time, numpy RNG state, chapter state
    RUN/checkpoint/trainer_state.safetensors   every optimizer's state ("optimizer.<name>.<key>")
    RUN/checkpoint/adapters/                   LoRA runs: adapters in mlx-lm's format
    RUN/checkpoint/<extra>.safetensors         chapter arrays (PPO's value head)

Everything is written to a temporary folder beside the checkpoint, flushed to
disk, and swapped in with renames (`runs.swap_in_checkpoint`), so a kill at any
moment leaves the previous checkpoint loadable. Only safetensors are written or
read: no pickles.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rl.config import MlxRlError
from mlx_rl.engine import faults
from mlx_rl.runs import dumps, fsync_tree, swap_in_checkpoint, temp_dir_beside


def save_checkpoint(path, model, tokenizer, config, trainer_state=None, optimizers=None, extra_arrays=None,
                    extra_files=None, save_weights=True):
    """Write an mlx-lm checkpoint atomically; optionally the state needed by --resume.

    trainer_state: a JSON-able dict (step, wall_s, numpy RNG state...).
    optimizers: {name: optimizer}, saved to trainer_state.safetensors. (MLX's global
    RNG key is reseeded every step from (seed, step) instead: see Session.seed_step.)
    extra_arrays: {file name: {name: array}}, more safetensors files in the same swap;
    a name may hold a folder (LoRA writes adapters/adapters.safetensors).
    extra_files: {file name: text}, more text files in the same swap.
    save_weights=False leaves the model's weights out (a LoRA run saved without fusing).
    """
    from mlx_lm.utils import save_config, save_model

    tmp = temp_dir_beside(path)
    if save_weights:
        save_model(tmp, model)
    save_config(dict(config), config_path=tmp / "config.json")
    tokenizer.save_pretrained(str(tmp))
    if trainer_state is not None:
        arrays = {}
        for name, optimizer in (optimizers or {}).items():
            arrays.update({f"optimizer.{name}.{k}": v for k, v in tree_flatten(optimizer.state)})
        mx.save_safetensors(str(tmp / "trainer_state.safetensors"), arrays)
        (tmp / "trainer_state.json").write_text(dumps(trainer_state))
    for name, arrays in (extra_arrays or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp / name), arrays)
    for name, text in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    fsync_tree(tmp)
    faults.reached("mid_save")
    swap_in_checkpoint(tmp, path)


def read_trainer_state(ckpt):
    """trainer_state.json of a checkpoint, or a one-line error if it is damaged."""
    path = Path(ckpt) / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise MlxRlError(f"cannot resume: {path} is damaged (not valid JSON)") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "numpy_rng" not in state:
        raise MlxRlError(f"cannot resume: {path} is damaged (no step or RNG state)")
    return state


def restore_optimizer(ckpt, name, optimizer):
    """Load one optimizer's state saved by save_checkpoint (the learning rate is not taken from it:
    the run's current schedule sets it, so --resume --lr X applies X)."""
    path = Path(ckpt) / "trainer_state.safetensors"
    try:
        arrays = mx.load(str(path))
    except Exception:
        raise MlxRlError(f"cannot resume: {path} is missing or damaged") from None
    prefix = f"optimizer.{name}."
    state = tree_unflatten([(k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix)])
    if not state:
        raise MlxRlError(f"cannot resume: {path} holds no state for the {name} optimizer")
    lr = optimizer.learning_rate  # this run's rate (a schedule recomputes it at every update anyway)
    optimizer.state = state
    optimizer.learning_rate = lr  # a constant rate lives in the state: the saved one must not win
