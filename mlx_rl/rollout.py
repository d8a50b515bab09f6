"""Rollouts: sample many completions at once, keeping the exact token ids and their log-probs.

`generate(model, tokenizer, prompts, ...)` samples a completion for every prompt
in one batch with a KV cache. Prompts of different lengths are left-padded and
the cache masks the padding, so each row sees exactly its own prompt. Each row
stops at its own EOS or at `max_new_tokens`.

What it returns is what training needs, and training never re-tokenises text:
  completion_ids (B, N)  the sampled token ids (pad after a row's EOS)
  logprobs       (B, N)  log-prob of each sampled token under the distribution it was
                         sampled from: logits / temperature, then top-p
  mask           (B, N)  1 for the completion's tokens, EOS included; 0 after it
The decoded text is for rewards and display only.

temperature 0 means greedy decoding (log-probs are then of the temperature-1 distribution).
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache, make_prompt_cache


@dataclass
class Rollout:
    prompts: list  # (B,) prompt text
    prompt_ids: list  # (B,) lists of prompt token ids, BOS included
    completion_ids: mx.array  # (B, N) int32, pad after EOS
    logprobs: mx.array  # (B, N) float32, log-prob under the sampling distribution, 0 where mask is 0
    mask: mx.array  # (B, N) float32
    finish_reasons: list  # (B,) "stop" (EOS) or "length"
    texts: list  # (B,) decoded completions, for rewards and display only

    @property
    def lengths(self):
        return self.mask.sum(axis=1)  # (B,)


def encode_prompts(tokenizer, prompts, chat_template=False):
    """Token ids of each prompt, BOS included (as `mlx_lm generate` encodes them)."""
    if chat_template:
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
            for p in prompts
        ]
    return [tokenizer.encode(p) for p in prompts]


def batch_cache(model, left_padding):
    """One batched KV cache per layer, masking each row's left padding."""
    caches = []
    for c in make_prompt_cache(model):
        if type(c) is KVCache:
            caches.append(BatchKVCache(left_padding))
        elif type(c) is RotatingKVCache and c.keep == 0:
            caches.append(BatchRotatingKVCache(c.max_size, left_padding))
        else:
            raise ValueError(f"batched sampling does not support {type(c).__name__} layers")
    return caches


def top_p_filter(logprobs, top_p):
    """Keep the smallest set of tokens whose probability reaches top_p; renormalise. (B, V) -> (B, V)"""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    cumulative = mx.cumsum(mx.exp(sorted_lp), axis=-1)
    keep_sorted = (cumulative - mx.exp(sorted_lp)) < top_p  # always keeps the most likely token
    keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
    filtered = mx.where(keep, logprobs, -mx.inf)
    return filtered - mx.logsumexp(filtered, axis=-1, keepdims=True)


def sampling_logprobs(logits, temperature, top_p=1.0):
    """Log-probs of the distribution we sample from. (B, V) -> (B, V)"""
    logits = logits.astype(mx.float32)
    if temperature > 0:
        logits = logits / temperature
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if top_p < 1.0 and temperature > 0:
        logprobs = top_p_filter(logprobs, top_p)
    return logprobs


def left_pad(rows, pad_id):
    """Lists of ids -> (B, L) int32 array, left-padded, and the padding per row."""
    longest = max(len(r) for r in rows)
    padding = [longest - len(r) for r in rows]
    arr = np.full((len(rows), longest), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        arr[i, padding[i]:] = r
    return mx.array(arr), padding


def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, chat_template=False, prompt_ids=None):
    """Sample one completion per prompt (repeat prompts for groups). Returns a Rollout."""
    if prompt_ids is None:
        prompt_ids = encode_prompts(tokenizer, prompts, chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = mx.array(sorted(tokenizer.eos_token_ids), dtype=mx.int32)
    tokens, padding = left_pad(prompt_ids, pad_id)  # (B, P)
    B = tokens.shape[0]
    cache = batch_cache(model, padding)

    logits = model(tokens, cache=cache)[:, -1, :]  # prefill: (B, V)
    finished = mx.zeros((B,), dtype=mx.bool_)
    out_tokens, out_logprobs, out_mask = [], [], []
    for step in range(max_new_tokens):
        logprobs = sampling_logprobs(logits, temperature, top_p)  # (B, V)
        if temperature > 0:
            token = mx.random.categorical(logprobs, axis=-1)  # (B,)
        else:
            token = mx.argmax(logprobs, axis=-1)
        token = token.astype(mx.int32)
        token_logprob = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]  # (B,)
        alive = mx.logical_not(finished)
        out_tokens.append(mx.where(alive, token, pad_id))
        out_logprobs.append(mx.where(alive, token_logprob, 0.0))
        out_mask.append(alive)
        finished = mx.logical_or(finished, (token[:, None] == eos_ids[None, :]).any(axis=1))
        if step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache)[:, -1, :]
        mx.async_eval(logits, finished, out_tokens[-1], out_logprobs[-1])
        if finished.all().item():  # one sync per decoding step; stops as soon as every row is done
            break

    completion_ids = mx.stack(out_tokens, axis=1)  # (B, N)
    logprobs = mx.stack(out_logprobs, axis=1)  # (B, N)
    mask = mx.stack(out_mask, axis=1).astype(mx.float32)  # (B, N)
    mx.eval(completion_ids, logprobs, mask)
    ids = np.array(completion_ids)
    lengths = np.array(mask).sum(axis=1).astype(int)
    eos_set = set(tokenizer.eos_token_ids)
    finish_reasons, texts = [], []
    for row, n in zip(ids, lengths):
        stopped = n > 0 and int(row[n - 1]) in eos_set
        finish_reasons.append("stop" if stopped else "length")
        texts.append(tokenizer.decode(row[: n - 1 if stopped else n].tolist()))
    return Rollout(list(prompts), prompt_ids, completion_ids, logprobs, mask, finish_reasons, texts)
