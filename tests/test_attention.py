"""attention.py's blocked causal attention against MLX's own scaled_dot_product_attention: values and gradients."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_causal_mask

from mlx_rl.engine import attention, fastmath
from mlx_rl.engine.logprobs import token_logprobs
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.engine.sampling import generate


def mlx_sdpa(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def inputs(B, H, Hk, T, S, D=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32) * 2)
               for shape in [(B, H, T, D), (B, Hk, S, D), (B, Hk, S, D)])
    return q, k, v


def left_padding_mask(T, S, padding):
    return create_causal_mask(T, offset=S - T, left_padding=mx.array(padding))  # (B, 1, T, S) bool


CASES = {  # name: (B, H, Hk, T, S, mask)
    "causal": (2, 6, 2, 37, 37, "causal"),
    "causal, no grouping": (2, 4, 4, 20, 20, "causal"),
    "causal after a prefix (S > T)": (3, 6, 3, 11, 29, "causal"),
    "one query, no mask (decoding)": (5, 9, 3, 1, 40, None),
    "(T, S) boolean mask": (2, 6, 2, 9, 21, create_causal_mask(9, offset=12)),
    "left padding, (B, 1, T, S) mask": (3, 4, 2, 10, 10, left_padding_mask(10, 10, [0, 3, 9])),
    "additive mask": (2, 4, 2, 8, 8, mx.where(create_causal_mask(8), 0.0, -1e9)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_elements", [attention.BLOCK_ELEMENTS, 300])  # one block, and many (300 scores each)
def test_values_and_gradients_equal_mlx(name, block_elements, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", block_elements)
    B, H, Hk, T, S, mask = CASES[name]
    q, k, v = inputs(B, H, Hk, T, S)
    scale = q.shape[-1] ** -0.5
    weights = mx.array(np.random.default_rng(1).standard_normal((B, H, T, q.shape[-1])).astype(np.float32))
    ours = attention.attention(q, k, v, scale, mask)
    theirs = mlx_sdpa(q, k, v, scale, mask)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5, rtol=1e-5)

    def loss(f):
        return lambda q, k, v: (f(q, k, v, scale, mask) * weights).sum()

    grads_ours = mx.grad(loss(attention.attention), argnums=(0, 1, 2))(q, k, v)
    grads_theirs = mx.grad(loss(mlx_sdpa), argnums=(0, 1, 2))(q, k, v)
    for name_, a, b in zip("qkv", grads_ours, grads_theirs):
        assert np.abs(np.array(b)).max() > 0, name_
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-4, err_msg=name_)


def test_fully_masked_rows_are_uniform_like_mlx():
    """A left-padded row's padded queries see no key at all: MLX then averages every value; so does ours."""
    q, k, v = inputs(2, 4, 2, 6, 6)
    mask = left_padding_mask(6, 6, [0, 4])
    ours, theirs = attention.attention(q, k, v, 0.25, mask), mlx_sdpa(q, k, v, 0.25, mask)
    assert np.isfinite(np.array(ours)).all()
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)


def test_unusual_calls_go_to_mlx_lm():
    q, k, v = inputs(1, 4, 2, 3, 3)
    assert attention.handles(q, k, None, "causal", None)
    assert not attention.handles(q.astype(mx.bfloat16), k.astype(mx.bfloat16), None, "causal", None)
    assert not attention.handles(q, k, None, "causal", mx.zeros((4,)))  # attention sinks
    assert not attention.handles(q, k, None, mx.ones((1, 4, 3, 3), dtype=mx.bool_), None)  # a mask per head
    assert not attention.handles(*inputs(1, 5, 2, 3, 3)[:2], None, None, None)  # 5 heads over 2: not grouped evenly


@pytest.mark.skipif(not fastmath.wanted(), reason="installed only on Linux CPU")
def test_patched_model_logprobs_gradients_and_rollouts_match_mlx_lm():
    """A tiny model's log-probs, gradients and sampled ids, with mlx-lm's attention and with ours."""
    model, tokenizer, _ = new_tiny_model("micro", seed=0)
    qwen3 = sys.modules["mlx_lm.models.qwen3"]
    assert attention.installed and qwen3.scaled_dot_product_attention is attention.scaled_dot_product_attention

    tokens = mx.array(np.random.default_rng(0).integers(4, 90, (6, 40)), dtype=mx.int32)
    prompts = ["12+34=", "5+6=", "123+4="]  # different lengths: left padding in the prefill's mask

    def loss(tokens):
        logprobs, _ = token_logprobs(model, tokens)
        return logprobs.mean()

    def measure():
        lp, _ = token_logprobs(model, tokens)
        value, grads = nn.value_and_grad(model, loss)(tokens)
        rollout = generate(model, tokenizer, prompts * 2, 12, temperature=1.0, keys=mx.random.split(mx.random.key(3), 6))
        return lp, value, grads, rollout

    ours = measure()
    attention.uninstall()
    try:
        assert qwen3.scaled_dot_product_attention is not attention.scaled_dot_product_attention
        theirs = measure()
    finally:
        attention.install()
    np.testing.assert_allclose(np.array(ours[0]), np.array(theirs[0]), atol=1e-5)
    assert abs(ours[1].item() - theirs[1].item()) < 1e-5
    for (name, a), (_, b) in zip(tree_flatten(ours[2]), tree_flatten(theirs[2])):
        assert np.abs(np.array(a)).max() > 0, name
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.array(ours[3].completion_ids), np.array(theirs[3].completion_ids))
    np.testing.assert_allclose(np.array(ours[3].logprobs), np.array(theirs[3].logprobs), atol=1e-4)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("MLX_RL_FAST_ATTENTION", "0")
    assert not attention.wanted()
    monkeypatch.setenv("MLX_RL_FAST_ATTENTION", "auto")
    monkeypatch.setenv("MLX_RL_FAST_EXP", "0")
    assert not attention.wanted()
