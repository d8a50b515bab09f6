"""Sampling (rollouts): many completions at once, keeping the exact token ids and their log-probs.

`generate(model, tokenizer, prompts, ...)` samples a completion for every prompt
in one batch with a KV cache. Prompts of different lengths are left-padded and
the cache masks the padding, so each row sees exactly its own prompt. Each row
stops at its own EOS or at `max_new_tokens`.

What it returns is what training needs, and training never re-tokenises text:
  completion_ids (B, N)  the sampled token ids (pad after a row's EOS)
  logprobs       (B, N)  log-prob of each sampled token under the distribution it was
                         sampled from (`logprobs.sampled_distribution`: logits /
                         temperature, then top-p); the chapters compare it with the
                         training pass's (`policy/sampler_mismatch`)
  mask           (B, N)  1 for the completion's tokens, EOS included; 0 after it
The decoded text is for rewards and display only.

temperature 0 means greedy decoding (log-probs are then of the temperature-1 distribution).

Where the time goes, and what makes it fast (1M-parameter model, 2-core CPU):
  - Group sampling repeats each prompt G times. The prompt pass (prefill) runs
    once per *distinct* prompt and the cache rows are then copied G times, so a
    GRPO batch of 8 prompts x 8 pays for 8 prompt passes, not 64.
  - Most models use plain KV caches; for them `PaddedKVCache` preallocates the
    whole prompt + completion length once and skips the attention mask entirely
    when no row is padded (fixed-length task prompts). Models with sliding-window
    layers use mlx-lm's own BatchKVCache / BatchRotatingKVCache.
  - One decoding step is one model call on (B, 1) tokens plus sampling, queued
    with `mx.async_eval`; the only sync is reading which rows have finished,
    which lets the loop stop as soon as the last row reaches EOS.
  - Finished rows leave the batch: once a quarter of the rows still decoding
    have reached EOS, the next calls run without them (their cache rows are
    dropped, the others copied once), so a batch whose lengths vary is not
    decoded at full width to its longest row.
  - Measured and left out because it did not pay on this CPU: `mx.compile` of
    the decode step over a fixed-size cache (same speed; a (64, 1) step of the
    tiny model was ~40% SwiGLU's sigmoid, which MLX's x86 wheel computes one
    element at a time, and most of the rest is matmuls). That sigmoid is now
    replaced on Linux CPU by fastmath.py's (about 4x faster).
  - Attention against a long cache: on Linux CPU, attention.py's (the r query
    heads of a key head in one product, a softmax of multiply-adds) replaces
    MLX's reference attention, which spends most of a decoding step's
    attention on exp.
"""

import typing
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache, make_prompt_cache

from mlx_rl.engine.logprobs import sampled_distribution


@dataclass
class Rollout:
    prompts: list  # (B,) the prompts as given: strings or dataset rows
    prompt_ids: list  # (B,) lists of prompt token ids, BOS included
    completion_ids: mx.array  # (B, N) int32, pad after EOS
    logprobs: mx.array  # (B, N) float32, log-prob under the sampling distribution, 0 where mask is 0
    mask: mx.array  # (B, N) float32
    finish_reasons: list  # (B,) "stop" (EOS) or "length"; episodes: "done" or "max_turns"
    texts: list  # (B,) decoded completions, for rewards and display only
    env_mask: typing.Optional[mx.array] = None  # (B, N) episodes (episodes.py): 1 on the environment's tokens
    episodes: typing.Any = None  # episodes.EpisodeStats: rewards, success, turns, transcripts

    @property
    def present(self):
        """(B, N) 1 on every token of the completion: the model's and, in an episode, the environment's."""
        return self.mask if self.env_mask is None else self.mask + self.env_mask

    def n_tokens(self):
        """Tokens of the batch, prompts and completions, padding excluded (perf/tokens_per_s counts these)."""
        return sum(map(len, self.prompt_ids)) + int(self.present.sum().item())

    @property
    def lengths(self):
        return self.mask.sum(axis=1)  # (B,)


def concat_rollouts(parts, pad_id):
    """Rollouts of consecutive rows as one, each completion right-padded to the longest (pad id, log-prob 0,
    mask 0: what a row that stopped early holds in a batch of its own)."""
    N = max(p.completion_ids.shape[1] for p in parts)

    def column(get, value=0):  # (B, N) from each part's (b, n)
        return mx.concatenate([mx.pad(get(p), [(0, 0), (0, N - get(p).shape[1])], constant_values=value) for p in parts])

    rollout = Rollout(
        [x for p in parts for x in p.prompts], [x for p in parts for x in p.prompt_ids],
        column(lambda p: p.completion_ids, pad_id), column(lambda p: p.logprobs), column(lambda p: p.mask),
        [x for p in parts for x in p.finish_reasons], [x for p in parts for x in p.texts])
    if parts[0].episodes is not None:  # episodes (episodes.py): their environment's tokens and outcomes
        rollout.env_mask = column(lambda p: p.env_mask)
        rollout.episodes = type(parts[0].episodes).concat([p.episodes for p in parts], N)
    return rollout


def encode_prompts(tokenizer, prompts, chat_template=False):
    """Token ids of each prompt, BOS included (as `mlx_lm generate` encodes them).

    A prompt is a string, or a dataset row {"prompt": str | messages, "system": ...}.
    With chat_template (or a row whose prompt is a list of messages) the tokenizer's
    chat template is applied, with the generation prompt. A prompt repeated for a
    group is encoded once.
    """

    def key(p):
        return p if isinstance(p, str) else repr((p.get("system"), p["prompt"]))

    def encode(p):
        row = {"prompt": p} if isinstance(p, str) else p
        if chat_template or not isinstance(row["prompt"], str):
            messages = row["prompt"] if not isinstance(row["prompt"], str) else [{"role": "user", "content": row["prompt"]}]
            if row.get("system"):
                messages = [{"role": "system", "content": row["system"]}] + list(messages)
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        text = row["prompt"] if not row.get("system") else row["system"] + "\n" + row["prompt"]
        return tokenizer.encode(text)

    ids = {}
    for p in prompts:
        k = key(p)
        if k not in ids:
            ids[k] = encode(p)
    return [list(ids[key(p)]) for p in prompts]


def prompt_text(p):
    """A prompt as text, for display and for rewards."""
    return p if isinstance(p, str) else p["prompt"]


class PaddedKVCache:
    """A KV cache for a left-padded batch, preallocated to its final length.

    It speaks the protocol mlx-lm attention layers use (`offset` for RoPE,
    `update_and_fetch`, `make_mask`), so it works with any model whose layers
    use plain KV caches (Llama, Qwen2/3, Mistral, Phi...). Row b's first real
    token sits at column left_padding[b]; its RoPE position is column - left_padding.
    """

    def __init__(self, max_len, left_padding):
        self.max_len = max_len
        self.padded = any(left_padding)
        self.left_padding = mx.array(left_padding)  # (B,)
        # RoPE positions of the next token: an int when no row is padded, else (B,)
        self.offset = -self.left_padding if self.padded else 0
        self.keys = self.values = None  # (B, H, max_len, D), allocated on first use
        self.length = 0  # columns filled so far

    def update_and_fetch(self, keys, values):
        B, H, N, _ = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, H, self.max_len, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((B, H, self.max_len, values.shape[3]), values.dtype)
        self.keys[:, :, self.length : self.length + N] = keys
        self.values[:, :, self.length : self.length + N] = values
        self.length += N
        self.offset = self.offset + N
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def make_mask(self, N, return_array=False, window_size=None):
        if not (self.padded or return_array or window_size):
            return "causal" if N > 1 else None  # the fast paths of scaled_dot_product_attention
        left_padding = self.left_padding if self.padded else None
        return create_causal_mask(N, offset=self.length, window_size=window_size, left_padding=left_padding)

    def repeat_rows(self, rows):
        """Keep rows `rows` (indices may repeat): copies each distinct prompt's cache to its group."""
        rows = mx.array(rows)
        self.keys, self.values = self.keys[rows], self.values[rows]
        self.left_padding = self.left_padding[rows]
        if self.padded:
            self.offset = self.offset[rows]


def batch_cache(model, max_len, left_padding):
    """One batched KV cache per layer, masking each row's left padding."""
    layer_caches = make_prompt_cache(model)
    if all(type(c) is KVCache for c in layer_caches):
        return [PaddedKVCache(max_len, left_padding) for _ in layer_caches]
    caches = []  # sliding-window models: mlx-lm's batched caches
    for c in layer_caches:
        if type(c) is KVCache:
            caches.append(BatchKVCache(left_padding))
        elif type(c) is RotatingKVCache and c.keep == 0:
            caches.append(BatchRotatingKVCache(c.max_size, left_padding))
        else:
            raise ValueError(f"batched sampling does not support {type(c).__name__} layers")
    return caches


def repeat_cache_rows(caches, rows):
    for c in caches:
        if isinstance(c, PaddedKVCache):
            c.repeat_rows(rows)
        else:
            c.filter(mx.array(rows))  # mlx-lm's batched caches: indexes every per-row array


def left_pad(rows, pad_id):
    """Lists of ids -> (B, L) int32 array, left-padded, and the padding per row."""
    longest = max(len(r) for r in rows)
    padding = [longest - len(r) for r in rows]
    arr = np.full((len(rows), longest), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        arr[i, padding[i]:] = r
    return mx.array(arr), padding


def distinct_rows(prompt_ids):
    """(distinct prompts, index of each row's prompt among them): [a, a, b, a] -> [a, b], [0, 0, 1, 0]."""
    index, distinct, rows = {}, [], []
    for ids in prompt_ids:
        key = tuple(ids)
        if key not in index:
            index[key] = len(distinct)
            distinct.append(list(ids))
        rows.append(index[key])
    return distinct, rows


def row_keys(n, world=None, rows_per_item=1):
    """One random key per row of a global batch of n rows, this rank's share of them. (n_local, 2)

    The base key is drawn from MLX's global RNG, which every rank seeds the same way at
    every step, so row b of the global batch gets the same key whatever the world size:
    a 2-process run samples the same completions as a 1-process run. rows_per_item:
    rows come in groups (GRPO: G per prompt) that must stay together on one rank.
    """
    base = mx.random.key(int(mx.random.randint(0, 2**31 - 1, ()).item()))
    keys = mx.random.split(base, n)  # (n, 2)
    if world is None or world.size == 1:
        return keys
    items = keys.reshape(n // rows_per_item, rows_per_item, 2)
    return world.shard(items).reshape(-1, 2)


_split_keys = mx.vmap(lambda k: mx.random.split(k, 2))  # (B, 2) -> (B, 2, 2): one key to use, one to keep
_categorical = mx.vmap(lambda k, logprobs: mx.random.categorical(logprobs, key=k))  # a row's own key per row


def widen(x, rows, B, fill):
    """(b,) values of rows `rows` of a batch of B -> (B,), `fill` in the other rows."""
    if len(rows) == B:
        return x
    out = mx.full((B,), fill, dtype=x.dtype)
    out[mx.array(rows)] = x
    return out


def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, chat_template=False, prompt_ids=None,
             keys=None, drop_finished=True):
    """Sample one completion per prompt (repeat prompts for groups). Returns a Rollout.

    prompts: strings or dataset rows (see encode_prompts). prompt_ids, if given, are
    used as they are (then `prompts` may be None and is decoded for display).
    keys: (B, 2) one random key per row (`row_keys`); each row samples from its own
    key stream, so its completion does not depend on which other rows share the batch.
    drop_finished: once a quarter of the rows still decoding have reached EOS, stop decoding them (their cache
    rows are dropped; the rest copied once); the completions are the same either way.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompts is None:
        prompts = [tokenizer.decode(ids) for ids in prompt_ids]
    if prompt_ids is None:
        prompt_ids = encode_prompts(tokenizer, prompts, chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = mx.array(sorted(tokenizer.eos_token_ids), dtype=mx.int32)

    # Prefill: one pass over each distinct prompt, then copy its cache to every row that repeats it.
    distinct, rows = distinct_rows(prompt_ids)
    tokens, padding = left_pad(distinct, pad_id)  # (U, P)
    cache = batch_cache(model, tokens.shape[1] + max_new_tokens, padding)
    logits = model(tokens, cache=cache)[:, -1, :]  # (U, V)
    if len(distinct) < len(prompt_ids):
        repeat_cache_rows(cache, rows)
        logits = logits[mx.array(rows)]  # (B, V)
    B = logits.shape[0]

    if temperature > 0 and keys is None:
        keys = row_keys(B)
    finished = mx.zeros((B,), dtype=mx.bool_)  # (b,) of the rows still decoding
    decoding = np.arange(B)  # (b,) which rows of the batch they are
    out_tokens, out_logprobs, out_mask = [], [], []
    for step in range(max_new_tokens):
        logprobs = sampled_distribution(logits, temperature, top_p)  # (b, V)
        if temperature > 0:
            split = _split_keys(keys)  # (b, 2, 2)
            token = _categorical(split[:, 0], logprobs)  # (b,)
            keys = split[:, 1]
        else:
            token = mx.argmax(logprobs, axis=-1)
        token = token.astype(mx.int32)
        token_logprob = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]  # (b,)
        alive = mx.logical_not(finished)
        out_tokens.append(widen(mx.where(alive, token, pad_id), decoding, B, pad_id))  # (B,)
        out_logprobs.append(widen(mx.where(alive, token_logprob, 0.0), decoding, B, 0.0))
        out_mask.append(widen(alive, decoding, B, False))
        finished = mx.logical_or(finished, (token[:, None] == eos_ids[None, :]).any(axis=1))
        if step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache)[:, -1, :]  # (b, V)
        mx.async_eval(logits, finished, out_tokens[-1], out_logprobs[-1], *([keys] if keys is not None else []))
        done = np.array(finished)  # the one sync per step; stops as soon as every row is done
        if done.all():
            break
        if drop_finished and 4 * done.sum() >= len(done):  # the next model call leaves the finished rows out
            keep = np.flatnonzero(~done)
            repeat_cache_rows(cache, keep)
            logits, finished, decoding = logits[mx.array(keep)], finished[mx.array(keep)], decoding[keep]
            keys = keys[mx.array(keep)] if keys is not None else None

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
