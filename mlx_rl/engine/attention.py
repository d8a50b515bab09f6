"""A faster attention for MLX's Linux CPU wheel: causal blocks that skip the future, and a softmax of multiply-adds.

Why: on the CPU, `mx.fast.scaled_dot_product_attention` is MLX's reference
composition of ops: the whole (T, S) score matrix per head, a softmax over it,
then the values. Two things make that slow on this backend:
  - the softmax's exp runs one element at a time (about 9 ns per element, see
    fastmath.py): for 4 rows x 9 heads x 384 x 384 scores it was 51 of the 59 ms
    the attention took (SmolLM2's shape, 2-core x86 machine);
  - under a causal mask half of those scores are thrown away, but they are
    all computed, exponentiated and multiplied by the values first.

What: queries are taken in blocks; each block is scored only against the keys
it may see (keys 0 .. the block's last position), the scores of a block's own
diagonal are masked, and the softmax uses fastmath's exp. Grouped-query
attention is a reshape: the r query heads that share a key head are scored in
one matrix multiply against it, never against copies. A block holds at most
BLOCK_ELEMENTS scores: fastmath's exp is 8x faster than MLX's on 1M elements,
and no faster on 4M (the three loops it compiles into stop fitting in cache).

Measured by benchmarks/bench_attention.py (docs/runs/attention; SmolLM2-135M's
attention: 9 query heads, 3 key heads, head size 64; 256 queries after a
128-token prompt, causal): 4 rows, forward 65.6 -> 17.1 ms, forward + backward
88.4 -> 42.6 ms; 32 rows, 415.5 -> 136.1 and 718.3 -> 498.5 ms, with less
memory; one decoding step of 32 rows against 384 keys, 4.6 -> 4.1 ms. Same
numbers as MLX's to float32 rounding (tests/test_attention.py).

Blocks run one after another (`after`, as the chunked head in logprobs.py) so
that MLX does not make every block's scores at once, and are cut with
mx.split, whose gradient is one concatenation rather than a sum of padded
copies (that sum made the 32-row backward slower than MLX's).

How it is used: `install()` (with fastmath's, by `speed.enable()`) replaces
`scaled_dot_product_attention` in mlx-lm's models/base.py and in every
architecture module that imported it, so any mlx-lm model built afterwards uses
it. Only on Linux with the CPU backend (on macOS, MLX's Metal kernel is fused);
float32 only; quantized KV caches, attention sinks and unusual masks go to
mlx-lm's own. MLX_RL_FAST_ATTENTION=0 turns it off; MLX_RL_FAST_EXP=0 turns it off with the fast SwiGLU.
"""

import importlib
import os
import sys

import mlx.core as mx

from mlx_rl.engine import fastmath

BASE = "mlx_lm.models.base"
BLOCK_ELEMENTS = 1 << 19  # scores per block: 2 MB of float32, which fastmath's exp handles at full speed
QUERY_BLOCK = 64  # queries per block at most (then rows per block): fewer blocks are faster, smaller ones skip more
NEG = -1e30  # a masked score: exp(NEG - max) is 0 to float32 precision (fastmath's exp clamps at -87)
installed = False


@mx.compile  # not shapeless: fastmath's exp needs known shapes (retraced per new shape)
def _softmax(scores):
    e = fastmath.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@mx.custom_function
def softmax(scores):
    """Softmax over the last axis with fastmath's exp; float32; differentiable through its own vjp."""
    return _softmax(scores)


@softmax.vjp
def _softmax_vjp(scores, cotangent, probs):
    return probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))


def attention(queries, keys, values, scale, mask=None):
    """softmax(q k^T * scale + mask) v, as mx.fast.scaled_dot_product_attention computes it.

    queries (B, H, T, D); keys and values (B, Hk, S, D) with H a multiple of Hk (grouped-query);
    mask: None, "causal" (query i sees keys up to i + S - T), or a boolean or additive array of
    shape (T, S) or (B or 1, 1, T, S), as mlx-lm's create_causal_mask makes them. Returns (B, H, T, D).
    """
    from mlx_rl.engine.logprobs import after  # here, not above: install() runs while mlx-lm is being imported

    B, H, T, D = queries.shape
    Hk, S = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, Hk, H // Hk, T, D)  # the H // Hk query heads of each key head together
    k, v = keys[:, :, None], values[:, :, None]  # (B, Hk, 1, S, D)
    if isinstance(mask, mx.array) and mask.ndim == 4:
        mask = mask[:, :, None]  # (B or 1, 1, T, S) -> (B or 1, 1, 1, T, S), against the scores' (B, Hk, r, T, S)
    # Blocks of `rows` rows x `block` queries, each at most BLOCK_ELEMENTS scores.
    block = max(1, min(T, QUERY_BLOCK, BLOCK_ELEMENTS // (H * S)))
    rows = max(1, min(B, BLOCK_ELEMENTS // (H * block * S)))
    cuts = list(range(rows, B, rows))  # mx.split, not slices: a split's gradient is one concatenation, not a sum of padded copies
    split_mask = isinstance(mask, mx.array) and mask.ndim == 5 and mask.shape[0] == B
    masks = mx.split(mask, cuts, axis=0) if split_mask else [mask] * (len(cuts) + 1)
    outs = []
    for q_rows, k_rows, v_rows, row_mask in zip(mx.split(q, cuts), mx.split(k, cuts), mx.split(v, cuts), masks):
        outs.append(_attention_rows(after(q_rows, outs[-1:]), k_rows, v_rows, row_mask, block))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    return out.reshape(B, H, T, D)


def _attention_rows(q, k, v, mask, block):
    """Some rows' attention, `block` queries at a time. q (b, Hk, r, T, D), k and v (b, Hk, 1, S, D) -> like q."""
    from mlx_rl.engine.logprobs import after

    T, S = q.shape[3], k.shape[3]
    offset = S - T  # the queries are the last T positions of the S keys
    causal = isinstance(mask, str)
    outs = []
    for start, q_block in zip(range(0, T, block), mx.split(q, list(range(block, T, block)), axis=3)):
        end = min(start + block, T)
        n_keys = offset + end if causal else S  # causal: the keys after the block's last query are never seen
        queries = after(q_block, outs[-1:])  # one block at a time: MLX would otherwise make all at once
        scores = queries @ k[:, :, :, :n_keys].swapaxes(-1, -2)  # (b, Hk, r, block, n_keys)
        if causal:
            visible = mx.arange(n_keys)[None, :] <= mx.arange(offset + start, offset + end)[:, None]  # (block, n_keys)
            scores = mx.where(visible, scores, NEG)
        elif mask is not None:
            m = mask[..., start:end, :] if mask.shape[-2] == T else mask
            scores = mx.where(m, scores, NEG) if m.dtype == mx.bool_ else scores + m
        outs.append(softmax(scores) @ v[:, :, :, :n_keys])  # (b, Hk, r, block, D)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)


def handles(queries, keys, cache, mask, sinks):
    """Whether `attention` covers this call (else mlx-lm's own runs)."""
    if hasattr(cache, "bits") or sinks is not None or queries.dtype != mx.float32 or keys.dtype != mx.float32:
        return False
    if queries.shape[1] % keys.shape[1]:
        return False
    if mask is None or (isinstance(mask, str) and mask == "causal"):
        return True
    if not isinstance(mask, mx.array):
        return False
    return mask.ndim == 2 or (mask.ndim == 4 and mask.shape[1] == 1)


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx_lm.models.base.scaled_dot_product_attention with `attention` where it applies."""
    if handles(queries, keys, cache, mask, sinks):
        return attention(queries, keys, values, scale, mask)
    return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def original(*args, **kwargs):
    base = importlib.import_module(BASE)
    return base.__dict__.get("_mlx_rl_original_sdpa", base.scaled_dot_product_attention)(*args, **kwargs)


def wanted():
    """Where fastmath installs (Linux, CPU backend), unless MLX_RL_FAST_ATTENTION=0."""
    off = os.environ.get("MLX_RL_FAST_ATTENTION", "auto").strip().lower() in ("0", "off", "no", "false")
    return fastmath.wanted() and not off


def install():
    """Make mlx-lm's models use `attention` (see the module docstring). Returns True if installed."""
    global installed
    if not wanted():
        return False
    base = importlib.import_module(BASE)
    mlx_lms = base.__dict__.setdefault("_mlx_rl_original_sdpa", base.scaled_dot_product_attention)
    # base itself (architectures imported from now on pick ours up) and the architectures already imported
    fastmath.replace_in_mlx_lm("scaled_dot_product_attention", mlx_lms, scaled_dot_product_attention)
    installed = True
    return True


def uninstall():
    """Put mlx-lm's own attention back everywhere (tests compare the two)."""
    global installed
    base = sys.modules.get(BASE)
    mlx_lms = base and base.__dict__.get("_mlx_rl_original_sdpa")
    if mlx_lms is None:
        return
    fastmath.replace_in_mlx_lm("scaled_dot_product_attention", scaled_dot_product_attention, mlx_lms)
    installed = False
