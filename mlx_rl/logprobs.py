"""Teacher-forced log-probs and entropy of completion tokens, for a padded batch.

Training scores the exact token ids a rollout sampled. Each row is laid out as
prompt ids then completion ids, right-padded:

    tokens  [BOS 0 7 + 4 5 = 2 5 0 EOS PAD PAD]
    targets tokens[:, 1:]; mask marks the completion's targets (2 5 0 EOS)

Right padding keeps every real token at the same position it had when sampled,
and causal attention never looks at the padding on its right, so a sequence
gives the same numbers alone or padded in a batch. Prompt and padding positions
have mask 0 and so never reach a loss.

Works with any mlx-lm model: it is one plain forward pass, `model(tokens)`.
The reference policy of PPO / GRPO / DPO holds the starting weights, frozen
(`train.Reference`), and `reference_logprobs` stops gradients at its output,
so a loss that mixes policy and reference log-probs trains only the policy.
"""


import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache


def completion_batch(prompt_ids, completion_ids, completion_mask, pad_id=0):
    """Build (tokens (B, T), mask (B, T-1)) from prompt ids and a rollout's completions.

    prompt_ids: (B,) lists; completion_ids, completion_mask: (B, N) arrays.
    mask[b, t] = 1 where tokens[b, t + 1] is a completion token of row b.
    """
    completion_ids = np.array(completion_ids)
    completion_mask = np.array(completion_mask).astype(np.float32)
    B, N = completion_ids.shape
    prompt_len = np.array([len(p) for p in prompt_ids])  # (B,)
    P = int(prompt_len.max())
    tokens = np.full((B, P + N), pad_id, dtype=np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, : len(p)] = p
    cols = prompt_len[:, None] + np.arange(N)[None, :]  # (B, N) where each completion token goes
    np.put_along_axis(tokens, cols, np.where(completion_mask > 0, completion_ids, pad_id), axis=1)
    mask = np.zeros((B, P + N), dtype=np.float32)
    np.put_along_axis(mask, cols, completion_mask, axis=1)
    return mx.array(tokens), mx.array(mask[:, 1:])


def token_logprobs(model, tokens, temperature=1.0, group_size=1, shared_len=0):
    """Per-token log-probs and entropies of tokens[:, 1:] given their prefixes.

    The logits are divided by the sampling temperature first, so these are the
    log-probs of the distribution the rollout sampled from. Returns (B, T-1) x 2.

    group_size G > 1 with shared_len S > 0 says that rows come in groups of G
    adjacent rows whose first S tokens are the same (a GRPO batch: each prompt
    G times). The model then runs those S tokens once per group and only the
    rest once per row (`shared_prefix_logits`): the same numbers, less work.
    """
    if group_size > 1 and shared_len > 0 and plain_kv_layers(model):
        logits = shared_prefix_logits(model, tokens[:, :-1], group_size, shared_len)
    else:
        logits = model(tokens[:, :-1])  # (B, T-1, V)
    logits = logits.astype(mx.float32)
    if temperature > 0:
        logits = logits / temperature
    # log-softmax and entropy from one exp, where logsumexp, its gradient and exp(logp) take three:
    # MLX's Linux CPU wheel computes exp one element at a time (see fastmath.py). (fastmath's exp
    # would save another ~0.5 ms, but its last bit changed with the batch a row is scored in: PPO's
    # first-epoch policy-vs-reference k3 became 1e-14 instead of exactly 0.)
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))  # (B, T-1, 1) for a safe exp
    e = mx.exp(logits - top)  # (B, T-1, V)
    total = e.sum(axis=-1, keepdims=True)  # (B, T-1, 1)
    logp_all = logits - (top + mx.log(total))  # (B, T-1, V)
    targets = tokens[:, 1:]
    logprobs = mx.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]  # (B, T-1)
    entropy = -((e / total) * logp_all).sum(axis=-1)  # (B, T-1)
    return logprobs, entropy


class PrefixCache:
    """A differentiable KV cache for one layer: keys and values are concatenated, never written in place.

    It speaks the mlx-lm cache protocol (`offset`, `update_and_fetch`, `make_mask`)
    for `shared_prefix_logits`, which runs a model twice: on the prefixes, then
    on the rest of each row with the prefixes' keys and values repeated per row.
    """

    def __init__(self):
        self.keys = self.values = None  # (B, H, L, D)
        self.offset = 0  # RoPE position of the next token

    def update_and_fetch(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]
        return keys, values

    def make_mask(self, N, return_array=False, window_size=None):
        if self.offset == 0 and not (return_array or window_size):
            return "causal" if N > 1 else None
        return create_causal_mask(N, offset=self.offset, window_size=window_size)  # (N, offset + N)

    def repeat_rows(self, repeats):
        self.keys = mx.repeat(self.keys, repeats, axis=0)
        self.values = mx.repeat(self.values, repeats, axis=0)


def plain_kv_layers(model):
    """Whether every layer of the model keeps a plain KV cache (no sliding window, no recurrent state)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


def shared_prefix_logits(model, inputs, group_size, shared_len):
    """model(inputs) for rows in groups of `group_size` that share their first `shared_len` tokens.

    inputs (B, L) with B = P * G; rows g*G .. g*G + G-1 must agree on inputs[:, :S].
    The shared tokens run once per group (P rows), their keys and values are
    repeated G times, and the remaining L - S tokens run once per row. Causal
    attention makes this exact; gradients reaching the shared part are summed
    over the group, as they would be over its G copies. Returns (B, L, V).
    """
    S = min(shared_len, inputs.shape[1] - 1)
    caches = [PrefixCache() for _ in model.layers]
    prefix_logits = model(inputs[::group_size, :S], cache=caches)  # (P, S, V)
    for c in caches:
        c.repeat_rows(group_size)
    rest_logits = model(inputs[:, S:], cache=caches)  # (B, L - S, V)
    return mx.concatenate([mx.repeat(prefix_logits, group_size, axis=0), rest_logits], axis=1)


def sequence_logprobs(model, tokens, mask, temperature=1.0):
    """Sum of completion-token log-probs per row. (B,)"""
    logprobs, _ = token_logprobs(model, tokens, temperature)
    return (logprobs * mask).sum(axis=1)


def masked_mean(x, mask, axis=None):
    """Mean of x over positions where mask is 1."""
    return (x * mask).sum(axis=axis) / mx.maximum(mask.sum(axis=axis), 1.0)


def reference_logprobs(ref_model, tokens, temperature=1.0):
    """Log-probs under a frozen reference: no gradient can flow into it. (B, T-1)"""
    logprobs, _ = token_logprobs(ref_model, tokens, temperature)
    return mx.stop_gradient(logprobs)
