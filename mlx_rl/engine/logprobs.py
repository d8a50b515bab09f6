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
(`session.Reference`), and `reference_logprobs` stops gradients at its output,
so a loss that mixes policy and reference log-probs trains only the policy.

`sampled_distribution` is the one place where "the distribution we sample from"
(temperature, top-p) is written; the sampler and every training pass use it.
"""


import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_rl.engine import lora


def completion_batch(prompt_ids, completion_ids, completion_mask, pad_id=0, values=None, present=None):
    """Build (tokens (B, T), mask (B, T-1)) from prompt ids and a rollout's completions.

    prompt_ids: (B,) lists; completion_ids, completion_mask: (B, N) arrays.
    mask[b, t] = 1 where tokens[b, t + 1] is a completion token of row b that is trained.
    present: (B, N) 1 on every completion token that is laid out (default: completion_mask).
    An episode's completion holds the environment's tokens too: present, so the model reads
    them, but with mask 0, so no loss, KL or entropy ever does (episodes.py).
    values: (B, N) per-completion-token numbers (the sampler's log-probs), also
    returned laid out like mask, (B, T-1), 0 elsewhere.
    """
    completion_ids = np.array(completion_ids)
    completion_mask = np.array(completion_mask).astype(np.float32)
    present = completion_mask if present is None else np.array(present).astype(np.float32)
    B, N = completion_ids.shape
    prompt_len = np.array([len(p) for p in prompt_ids])  # (B,)
    P = int(prompt_len.max())
    tokens = np.full((B, P + N), pad_id, dtype=np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, : len(p)] = p
    cols = prompt_len[:, None] + np.arange(N)[None, :]  # (B, N) where each completion token goes
    np.put_along_axis(tokens, cols, np.where(present > 0, completion_ids, pad_id), axis=1)
    mask = np.zeros((B, P + N), dtype=np.float32)
    np.put_along_axis(mask, cols, completion_mask * (present > 0), axis=1)
    if values is None:
        return mx.array(tokens), mx.array(mask[:, 1:])
    placed = np.zeros((B, P + N), dtype=np.float32)
    np.put_along_axis(placed, cols, np.where(completion_mask > 0, np.array(values), 0.0), axis=1)
    return mx.array(tokens), mx.array(mask[:, 1:]), mx.array(placed[:, 1:])


def sampled_distribution(logits, temperature=1.0, top_p=1.0, with_probs=False):
    """Log-probs of the distribution tokens are sampled from: logits / temperature, then top-p.

    The one definition of "the policy" for every chapter: the sampler draws from it,
    and the training pass and PPO score the sampled tokens under it, so the two can't
    disagree. temperature 0 (greedy decoding) scores under the temperature-1 distribution.
    (..., V) -> (..., V) float32; with_probs also returns the probabilities (for the entropy).
    """
    logits = logits.astype(mx.float32)
    if temperature > 0:
        logits = logits / temperature
    # log-softmax and probabilities from one exp (logsumexp, its gradient and exp(logp) would take
    # three: MLX's Linux CPU wheel computes exp one element at a time, see fastmath.py).
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))  # (..., 1) for a safe exp
    e = mx.exp(logits - top)  # (..., V)
    total = e.sum(axis=-1, keepdims=True)  # (..., 1)
    logprobs = logits - (top + mx.log(total))  # (..., V)
    probs = e / total if with_probs else None
    if top_p < 1.0 and temperature > 0:
        logprobs = top_p_filter(logprobs, top_p)
        probs = mx.exp(logprobs) if with_probs else None
    return (logprobs, probs) if with_probs else logprobs


def top_p_filter(logprobs, top_p):
    """Keep the smallest set of tokens whose probability reaches top_p; renormalise. (B, V) -> (B, V)"""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    cumulative = mx.cumsum(mx.exp(sorted_lp), axis=-1)
    keep_sorted = (cumulative - mx.exp(sorted_lp)) < top_p  # always keeps the most likely token
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    filtered = mx.where(keep, logprobs, -mx.inf)
    return filtered - mx.logsumexp(filtered, axis=-1, keepdims=True)


def entropy_of(logprobs, probs, top_p=1.0):
    """Entropy of each distribution, -sum p log p over the last axis. (..., V) -> (...)"""
    terms = probs * logprobs
    if top_p < 1.0:
        terms = mx.where(probs > 0, terms, 0.0)  # tokens top-p removed: 0 * -inf counts 0
    return -terms.sum(axis=-1)


# Logits scored at a time: at most this many (position, vocabulary entry) pairs, 64 MB in float32. A real
# model's vocabulary makes the (B, T, V) logits the largest array of a training step (Qwen3's 151,936 entries:
# 16 rows x 191 positions are 1.9 GB, and the softmax, its gradient and the reference pass each hold another
# copy); in chunks, only one chunk's logits exist at a time, in the forward pass and in the backward.
# 0 scores the whole batch at once (the plain pass: `model(inputs)`).
LOGITS_CHUNK = 2**24

# Architectures whose logits are exactly `head(model.model(inputs))`, with the head an lm_head or the tied
# embeddings (`output_layer`): their log-probs can be scored in chunks from the hidden states. Any other
# model (one with a logit soft-cap or scale, or a user's own module) takes the plain pass.
PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "smollm3", "phi3", "olmo2", "gemma"}


def token_logprobs(model, tokens, temperature=1.0, group_size=1, shared_len=0, top_p=1.0, return_hidden=False,
                   skip=0, chunk=None):
    """Per-token log-probs and entropies of tokens[:, 1:] given their prefixes, under the sampled distribution.

    Returns (B, T-1) x 2 (and the final hidden states (B, T-1, H) with return_hidden,
    for PPO's value head). group_size G > 1 with shared_len S > 0 says that rows come
    in groups of G adjacent rows whose first S tokens are the same (a GRPO batch:
    each prompt G times). The model then runs those S tokens once per group and only
    the rest once per row (`shared_prefix_pass`): the same numbers, less work.
    skip: leave the first `skip` positions unscored (0 there; the model still reads their
    tokens). A GRPO batch passes S - 1, the positions whose targets are prompt tokens,
    which no loss reads: a real model's vocabulary (49k-150k) makes the softmax, the
    entropy and their backward over the prompt positions most of a short completion's cost.
    chunk: logits elements scored at a time (`chunked_scores`; default LOGITS_CHUNK, 0: all at once).
    """
    if isinstance(model, lora.AdaptersOff):  # the reference of a LoRA run: the same model, adapters off
        with lora.adapters_off(model.model):
            return token_logprobs(model.model, tokens, temperature, group_size, shared_len, top_p, return_hidden,
                                  skip, chunk)
    chunk = LOGITS_CHUNK if chunk is None else chunk
    inputs = tokens[:, :-1]
    targets = tokens[:, 1:]
    skip = 0 if return_hidden else max(0, min(skip, inputs.shape[1] - 1))  # the value head reads every position
    shared = group_size > 1 and shared_len > 0 and plain_kv_layers(model)
    if return_hidden or (chunk > 0 and plain_head(model)):
        # the transformer's final hidden states, then the head chunk by chunk
        if shared:
            hidden = shared_prefix_pass(model.model, len(model.layers), inputs, group_size, shared_len, skip)
        else:
            hidden = model.model(inputs)[:, skip:]  # (B, T-1-skip, H) final-normed hidden states
        logprobs, entropy = chunked_scores(model, hidden, targets[:, skip:], temperature, top_p, chunk)
    else:
        if shared:
            logits = shared_prefix_pass(model, len(model.layers), inputs, group_size, shared_len, skip)
        else:
            logits = model(inputs)[:, skip:]  # (B, T-1-skip, V)
        logprobs, entropy = score_logits(logits, targets[:, skip:], temperature, top_p)  # (B, T-1-skip) x 2
    if skip:
        pad = mx.zeros((logprobs.shape[0], skip), dtype=logprobs.dtype)
        logprobs, entropy = mx.concatenate([pad, logprobs], axis=1), mx.concatenate([pad, entropy], axis=1)  # (B, T-1)
    return (logprobs, entropy, hidden) if return_hidden else (logprobs, entropy)


def score_logits(logits, targets, temperature=1.0, top_p=1.0):
    """Log-prob of each target and the entropy, under the sampled distribution. (..., V), (...) -> (...) x 2"""
    logp_all, probs = sampled_distribution(logits, temperature, top_p, with_probs=True)  # (..., V) x 2
    logprobs = mx.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]  # (...)
    return logprobs, entropy_of(logp_all, probs, top_p)


def output_layer(model, hidden):
    """The model's own head: logits from final hidden states (an lm_head, or tied embeddings)."""
    if getattr(model, "lm_head", None) is not None:
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def plain_head(model):
    """Whether the model's logits are `output_layer(model, model.model(inputs))` (see PLAIN_HEAD_TYPES)."""
    return getattr(model, "model_type", None) in PLAIN_HEAD_TYPES and hasattr(getattr(model, "model", None),
                                                                                "embed_tokens")


def chunked_scores(model, hidden, targets, temperature=1.0, top_p=1.0, chunk=LOGITS_CHUNK):
    """score_logits(output_layer(model, hidden), targets), a chunk of positions at a time. (B, L, H) -> (B, L) x 2

    Each chunk's logits are made, reduced to one log-prob and one entropy per
    position, and dropped. The backward is written out (`mx.custom_function`): it
    makes each chunk's logits again, takes that chunk's vector-Jacobian product, and
    adds the head's gradient as it goes (a full fine-tune's lm_head or tied
    embeddings: a (V, H) array per chunk, which would otherwise pile up). The output
    projection runs twice: about one more matmul per position, for the head only.
    The chunks are independent, so MLX would be free to run them all at once, in the
    forward and in the backward (and did: twice the whole logits' size in
    tests/test_scale.py's 64-chunk pass); each chunk's input therefore adds 0 x the
    previous chunk's results (`after`), a data dependency that makes both passes
    visit the chunks in turn. Adding an exact zero changes no number.
    """
    B, L, H = hidden.shape
    vocab = model.args.vocab_size if hasattr(model, "args") else output_layer(model, hidden[:1, :1]).shape[-1]
    rows = max(1, chunk // vocab if chunk > 0 else B * L)  # positions per chunk
    flat_hidden, flat_targets = hidden.reshape(B * L, H), targets.reshape(B * L)  # (B*L, H), (B*L,)
    if rows >= B * L:  # one chunk: nothing to recompute
        logprobs, entropy = score_logits(output_layer(model, flat_hidden), flat_targets, temperature, top_p)
        return logprobs.reshape(B, L), entropy.reshape(B, L)
    head = model.lm_head if getattr(model, "lm_head", None) is not None else model.model.embed_tokens
    names = [name for name, _ in tree_flatten(head.trainable_parameters())]  # a full fine-tune's head; LoRA: none
    spans = [(begin, min(begin + rows, B * L)) for begin in range(0, B * L, rows)]

    def score(h, t, weights):  # one chunk: (rows, H) -> its (rows, V) logits -> (rows,) x 2
        saved = head.trainable_parameters()
        head.update(tree_unflatten(list(zip(names, weights))))  # these arrays, so their gradient is the head's
        out = score_logits(output_layer(model, h), t, temperature, top_p)
        head.update(saved)
        return out

    @mx.custom_function
    def scores(flat_hidden, weights):
        out = []
        for begin, end in spans:
            h = after(flat_hidden[begin:end], out[-1] if out else ())
            out.append(score(h, flat_targets[begin:end], weights))
        return mx.concatenate([lp for lp, _ in out]), mx.concatenate([ent for _, ent in out])

    @scores.vjp
    def scores_vjp(primals, cotangents, _):
        flat_hidden, weights = primals
        d_logprobs, d_entropy = cotangents
        d_hidden, d_weights = [], [mx.zeros_like(w) for w in weights]
        for begin, end in spans:
            h = after(flat_hidden[begin:end], [d_hidden[-1], *d_weights] if d_hidden else ())
            t = flat_targets[begin:end]
            _, (d_h, *d_w) = mx.vjp(lambda h, *w: score(h, t, w), [h, *weights],
                                    [d_logprobs[begin:end], d_entropy[begin:end]])
            d_hidden.append(d_h)
            d_weights = [total + d for total, d in zip(d_weights, d_w)]
        return mx.concatenate(d_hidden), d_weights

    logprobs, entropy = scores(flat_hidden, [w for _, w in tree_flatten(head.trainable_parameters())])
    return logprobs.reshape(B, L), entropy.reshape(B, L)


def after(x, previous):
    """x + 0 x (an element of each of `previous`): the same numbers, but computed only once `previous` is."""
    for p in previous:
        x = x + (0.0 * p.reshape(-1)[0]).astype(x.dtype)
    return x


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
        if not (return_array or window_size):  # "causal" aligns the N queries with the last N keys: the same mask
            return "causal" if N > 1 else None
        return create_causal_mask(N, offset=self.offset, window_size=window_size)  # (N, offset + N)

    def repeat_rows(self, repeats):
        self.keys = mx.repeat(self.keys, repeats, axis=0)
        self.values = mx.repeat(self.values, repeats, axis=0)


def plain_kv_layers(model):
    """Whether every layer of the model keeps a plain KV cache (no sliding window, no recurrent state)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


def shared_prefix_pass(net, n_layers, inputs, group_size, shared_len, skip=0):
    """net(inputs)[:, skip:] for rows in groups of `group_size` that share their first `shared_len` tokens.

    net: the model (logits) or its transformer `model.model` (final hidden states); n_layers its blocks.
    inputs (B, L) with B = P * G; rows g*G .. g*G + G-1 must agree on inputs[:, :S].
    The shared tokens run once per group (P rows), their keys and values are
    repeated G times, and the remaining L - S tokens run once per row. Causal
    attention makes this exact; gradients reaching the shared part are summed
    over the group, as they would be over its G copies. Returns (B, L - skip, V or H).
    """
    S = min(shared_len, inputs.shape[1] - 1)
    caches = [PrefixCache() for _ in range(n_layers)]
    prefix_out = net(inputs[::group_size, :S], cache=caches)[:, skip:]  # (P, S - skip, V or H)
    for c in caches:
        c.repeat_rows(group_size)
    rest_out = net(inputs[:, S:], cache=caches)  # (B, L - S, V or H)
    return mx.concatenate([mx.repeat(prefix_out, group_size, axis=0), rest_out[:, max(0, skip - S) :]], axis=1)


def sequence_logprobs(model, tokens, mask, temperature=1.0, chunk=None):
    """Sum of completion-token log-probs per row (DPO's), scored in chunks like every pass. (B,)"""
    logprobs, _ = token_logprobs(model, tokens, temperature, chunk=chunk)
    return masked(logprobs, mask).sum(axis=1)


def masked_mean(x, mask, axis=None):
    """Mean of x over positions where mask is 1 (x elsewhere is never looked at: no inf * 0)."""
    return mx.where(mask > 0, x, 0.0).sum(axis=axis) / mx.maximum(mask.sum(axis=axis), 1.0)


def masked(x, mask, fill=0.0):
    """x where mask is 1, `fill` elsewhere: padded positions replaced *before* anything can overflow.

    A padded position's log-prob can be anything (-1e4 after a long run): exp(logp - ref)
    would be inf there, and inf * 0 is NaN in the loss and its gradient. Every loss
    passes its per-token inputs through this first.
    """
    return mx.where(mask > 0, x, fill)


def reference_logprobs(ref_model, tokens, temperature=1.0, **layout):
    """Log-probs under a frozen reference: no gradient can flow into it. (B, T-1)

    layout: token_logprobs' group_size, shared_len and skip, for a GRPO batch."""
    logprobs, _ = token_logprobs(ref_model, tokens, temperature, **layout)
    return mx.stop_gradient(logprobs)
