"""Memory of a training step, and the two ways to hold less: checkpointed blocks and micro-batches.

What a forward + backward pass holds, for B rows of T tokens (float32):

    logits             B T V x 4 bytes, and again for the softmax and its gradient: the largest
                       array of all with a real vocabulary (V = 151,936: 0.6 MB per token). Never
                       held whole: logprobs.py scores them a chunk of positions at a time.
    activations        what each block keeps for the backward: its input, the attention's queries,
                       keys, values and weights, the MLP's gate and up projections... about
                       `activation_bytes_per_token` per token per block.
    weights, Adam      fixed: the weights, and for what is trained its gradient and two moments.

Two options trade compute for the activations:

  --grad-checkpoint  each block keeps only its input (B T H floats) and runs its forward again
                     inside the backward (`checkpoint_blocks`): about a third more compute for
                     the blocks, and their activations shrink from ~20 H floats per token per
                     block to H.
  --micro-batch N    the forward + backward runs N rows at a time and the gradients add up
                     (update.make_update); the update is the full batch's, because every loss
                     is a sum over rows divided by the *full* batch's counts (n_rows, n_tokens),
                     the same reason data-parallel ranks can add their gradients. 0 chooses N
                     from the model's size and the memory the machine has (`auto_micro_batch`).
"""

import mlx.core as mx

from mlx_rl.engine.logprobs import LOGITS_CHUNK, PrefixCache

_checkpointed_classes = {}


def checkpoint_blocks(model):
    """Activation checkpointing for every transformer block of the model (in place; idempotent).

    Each block instance gets a subclass of its own class whose __call__ runs under
    mx.checkpoint, so parameter names, LoRA layers and saved checkpoints are unchanged,
    and other instances of the class (another model in the same process) are untouched.
    """
    for block in model.layers:
        cls = type(block)
        if not getattr(cls, "_mlx_rl_checkpointed", False):
            if cls not in _checkpointed_classes:
                _checkpointed_classes[cls] = type(cls.__name__, (cls,), {"__call__": _checkpointed_call(cls.__call__),
                                                                         "_mlx_rl_checkpointed": True})
            block.__class__ = _checkpointed_classes[cls]
    return model


def is_checkpointed(model):
    layers = getattr(model, "layers", None) or []
    return bool(layers) and all(getattr(type(b), "_mlx_rl_checkpointed", False) for b in layers)


def _checkpointed_call(call):
    def __call__(block, x, mask=None, cache=None):
        if cache is not None and not isinstance(cache, PrefixCache):
            return call(block, x, mask, cache)  # sampling's KV caches: no backward, nothing to save

        def run(params, x, *past):
            """The block on explicit inputs: its trainable weights (so their gradients flow through the
            checkpoint), x, and a shared prefix's keys and values (so do theirs)."""
            saved = block.trainable_parameters()
            block.update(params)
            layer_cache = None
            if cache is not None:
                layer_cache = PrefixCache()
                if past:
                    layer_cache.keys, layer_cache.values = past
                    layer_cache.offset = past[0].shape[2]
            y = call(block, x, mask, layer_cache)
            block.update(saved)  # the recomputation in the backward must not leave its copies in the model
            return y if cache is None else (y, layer_cache.keys, layer_cache.values)

        params = block.trainable_parameters()
        if cache is None:
            return mx.checkpoint(run)(params, x)
        past = () if cache.keys is None else (cache.keys, cache.values)
        y, cache.keys, cache.values = mx.checkpoint(run)(params, x, *past)
        cache.offset = cache.keys.shape[2]
        return y

    return __call__


def activation_bytes_per_token(args, grad_checkpoint=False):
    """About what one token's forward keeps for the backward, all blocks, float32 (an estimate from the shapes).

    Per block: the inputs of its matmuls and norms (~6 H), queries, keys and values (q + 2 kv),
    the attention's output (q), the MLP's gate, up and their product (3 I), plus the attention
    weights (heads x T per token, counted by the caller as 4 heads T bytes). Checkpointed: the
    block's input (H) only, plus one block's worth in the backward.
    """
    H = args.hidden_size
    layers = args.num_hidden_layers
    heads = getattr(args, "num_attention_heads", 1)
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or H // heads
    intermediate = getattr(args, "intermediate_size", 4 * H)
    per_block = 6 * H + 2 * heads * head_dim + 2 * kv_heads * head_dim + 3 * intermediate  # floats
    if grad_checkpoint:
        return 4 * (layers * H + per_block)
    return 4 * layers * per_block


def auto_micro_batch(model, rows, tokens_per_row, grad_checkpoint=False, available=None, multiple=1):
    """Rows per forward + backward so that the pass's activations fit in half the available memory.

    Returns (rows per micro-batch, the estimate in bytes of one micro-batch). `multiple`: a
    micro-batch holds whole groups (GRPO's prompts, DPO's pairs).
    """
    from mlx_rl.engine.session import available_memory_bytes

    args = getattr(model, "args", None)
    if args is None:  # not a transformer (PPO's value head): small, the whole batch at once
        return rows, 0
    available = available_memory_bytes() if available is None else available
    heads = getattr(args, "num_attention_heads", 1)
    per_token = activation_bytes_per_token(args, grad_checkpoint) + 4 * heads * tokens_per_row * (
        1 if grad_checkpoint else args.num_hidden_layers)  # the attention weights
    per_row = per_token * tokens_per_row
    logits = 5 * 4 * LOGITS_CHUNK  # one chunk's logits, exp, probabilities, log-probs and gradient
    if not available:
        return rows, per_row * rows + logits
    fit = int((available * 0.5 - logits) // max(per_row, 1))
    fit = max(multiple, min(rows, fit) // multiple * multiple)
    return min(fit, rows), per_row * min(fit, rows) + logits
