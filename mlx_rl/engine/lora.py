"""LoRA: train small adapters instead of all weights, with mlx-lm's own LoRA layers.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained
weight W and learns a low-rank change to it: a linear layer computes

    y = W x + scale * B A x        A: (rank, in), B: (out, rank), B starts at 0

so training starts exactly at the base model, and only A and B (a few percent
of the weights, or far less on a real model) get gradients and optimizer state.
mlx-lm's `linear_to_lora_layers` swaps the chosen linear layers of the last
`num_layers` blocks for `LoRALinear` layers that hold the frozen original as
`.linear`; quantised layers work the same way, so a 4-bit base trains too.

Two things follow that the RL chapters use:
  - the reference policy is the base model, which is the policy with its
    adapters switched off (`adapters_off`): no second copy of the weights;
  - what a run saves is small: the adapters, in mlx-lm's format
    (`mlx_lm generate --model BASE --adapter-path RUN/checkpoint/adapters`),
    plus, if asked, the adapters fused into the base (`fused`), a plain
    mlx-lm checkpoint later chapters can start from.
"""

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rl.config import MlxRlError

ADAPTER_LEAVES = ("lora_a", "lora_b")


def lora_modules(model):
    """The (name, module) pairs of every LoRA layer in the model."""
    return [(name, m) for name, m in model.named_modules() if "lora_a" in m and "lora_b" in m]


def has_lora(model):
    return len(lora_modules(model)) > 0


def base_module(lora_layer):
    """The frozen layer a LoRA layer wraps (LoRALinear.linear, LoRAEmbedding.embedding)."""
    return lora_layer["linear"] if "linear" in lora_layer else lora_layer["embedding"]


def is_quantized(model):
    import mlx.nn as nn

    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def apply_lora(model, rank, num_layers=-1, scale=20.0, keys=None, base=None):
    """Freeze the model and put LoRA adapters on the last num_layers blocks (-1: all).

    keys: module paths inside a block to adapt (e.g. ["self_attn.q_proj"]);
    None adapts every linear layer. Returns the adapter config, in the format
    of mlx-lm's adapter_config.json.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_blocks = len(model.layers)
    if num_layers == -1:
        num_layers = n_blocks
    if not 1 <= num_layers <= n_blocks:
        raise MlxRlError(f"--lora-layers {num_layers}: the model has {n_blocks} blocks (use 1..{n_blocks}, or -1 for all)")
    lora_parameters = {"rank": rank, "scale": scale, "dropout": 0.0}  # dropout would make the first PPO ratio != 1
    if keys:
        lora_parameters["keys"] = list(keys)
    model.freeze()
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters)
    except ValueError as e:
        raise MlxRlError(f"cannot put LoRA on this model: {e}") from None
    if not has_lora(model):
        raise MlxRlError(f"--lora-keys {','.join(keys or [])}: no such layers in the model's blocks")
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters, "model": base}


def adapter_weights(model):
    """The adapters' arrays, {name: array}, named as in the model (and in adapters.safetensors)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}


def load_adapter_weights(model, directory):
    """Load saved adapter arrays into a model that already has the same LoRA layers."""
    weights = mx.load(str(Path(directory) / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


@contextmanager
def _swapped(model, replacement):
    """Swap every LoRA layer for replacement(layer) inside the block, then put them back."""
    layers = lora_modules(model)
    model.update_modules(tree_unflatten([(name, replacement(m)) for name, m in layers]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(layers))


def adapters_off(model):
    """Inside `with adapters_off(model):` the model is exactly its base: every LoRA layer is
    replaced by the frozen layer it wraps, so the forward pass runs the base's own modules and
    arrays (bitwise the base's outputs, and no adapter compute)."""
    return _swapped(model, base_module)


def fused(model, dequantize=False):
    """Inside `with fused(model):` every LoRA layer is replaced by one plain layer with
    W + scale * B A (re-quantised if the base was), as `mlx_lm fuse` does it."""
    return _swapped(model, lambda m: m.fuse(dequantize=dequantize))


class AdaptersOff:
    """The base model, seen through a LoRA model: calling it runs the model with its adapters off.

    Attribute access goes to the LoRA model (layers, make_cache, args...), so code that
    takes a model (log-probs, sampling) takes this too.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def describe(model, adapter_config):
    """One line: where the adapters are and how many parameters they train."""
    from mlx_lm.utils import get_total_parameters  # counts a quantised weight as its unpacked size

    trainable = sum(v.size for v in adapter_weights(model).values())
    base = get_total_parameters(model)  # leaf modules only: the LoRA layers' own A, B are not leaves
    p = adapter_config["lora_parameters"]
    return (f"LoRA rank {p['rank']}, scale {p['scale']:g}, on {len(lora_modules(model))} layers in the last "
            f"{adapter_config['num_layers']} blocks: {trainable:,} trainable parameters "
            f"({trainable / max(base, 1):.2%} of the {base:,} frozen ones)")
