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
The reference policy of PPO / GRPO / DPO is a frozen copy of the starting
model (`frozen_copy`), and `reference_logprobs` stops gradients at its output,
so a loss that mixes policy and reference log-probs trains only the policy.
"""

import copy

import mlx.core as mx
import numpy as np


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


def token_logprobs(model, tokens, temperature=1.0):
    """Per-token log-probs and entropies of tokens[:, 1:] given their prefixes.

    The logits are divided by the sampling temperature first, so these are the
    log-probs of the distribution the rollout sampled from. Returns (B, T-1) x 2.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)  # (B, T-1, V)
    if temperature > 0:
        logits = logits / temperature
    logz = mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, T-1, 1)
    logp_all = logits - logz  # (B, T-1, V)
    targets = tokens[:, 1:]
    logprobs = mx.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]  # (B, T-1)
    entropy = -(mx.exp(logp_all) * logp_all).sum(axis=-1)  # (B, T-1)
    return logprobs, entropy


def sequence_logprobs(model, tokens, mask, temperature=1.0):
    """Sum of completion-token log-probs per row. (B,)"""
    logprobs, _ = token_logprobs(model, tokens, temperature)
    return (logprobs * mask).sum(axis=1)


def masked_mean(x, mask, axis=None):
    """Mean of x over positions where mask is 1."""
    return (x * mask).sum(axis=axis) / mx.maximum(mask.sum(axis=axis), 1.0)


def frozen_copy(model):
    """The reference policy: a copy of `model` with its own weights, frozen, so training never moves it."""
    reference = copy.deepcopy(model)
    reference.freeze()
    return reference


def reference_logprobs(ref_model, tokens, temperature=1.0):
    """Log-probs under a frozen reference: no gradient can flow into it. (B, T-1)"""
    logprobs, _ = token_logprobs(ref_model, tokens, temperature)
    return mx.stop_gradient(logprobs)
