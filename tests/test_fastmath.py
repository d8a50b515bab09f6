"""The fast sigmoid / SiLU / SwiGLU of fastmath.py against MLX's own and float64 references."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.engine import fastmath
from mlx_rl.engine.logprobs import token_logprobs
from mlx_rl.engine.models import new_tiny_model

# Wide range, the clamp edges, huge values, zeros and tiny values.
EDGES = [-1e30, -1e4, -100.0, -88.5, -88.0, -87.5, -87.0, -20.0, -1e-30, -0.0, 0.0, 1e-30, 20.0, 87.0, 88.0, 88.5, 100.0, 1e4, 1e30]
X = mx.concatenate([mx.linspace(-120, 120, 200_001), mx.array(EDGES)])


def f64(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def reference_sigmoid(x):
    x = f64(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))


def test_exp_matches_float64():
    x = mx.linspace(-87, 88, 100_001)
    rel = np.abs(f64(fastmath.exp(x)) - np.exp(f64(x))) / np.exp(f64(x))
    assert rel.max() < 2e-7


def test_sigmoid_and_silu_match_float64_and_mlx():
    s, ref = f64(fastmath.sigmoid(X)), reference_sigmoid(X)
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    normal = ref > 1e-37  # below that float32 is denormal or 0: compare absolutely
    assert (np.abs(s - ref)[normal] / ref[normal]).max() < 1e-6
    assert np.abs(s - ref).max() < 1e-7
    silu, silu_ref = f64(fastmath.silu(X)), f64(X) * ref
    assert np.isfinite(silu).all()
    assert (np.abs(silu - silu_ref)[normal] / np.maximum(np.abs(silu_ref[normal]), 1e-30)).max() < 1e-6
    np.testing.assert_allclose(silu, f64(nn.silu(X)), rtol=1e-5, atol=1e-6)  # MLX's own is off by up to ~4e-6


def test_gradients_match_mlx():
    for fast, slow in [(fastmath.silu, nn.silu), (fastmath.sigmoid, mx.sigmoid)]:
        g_fast = mx.grad(lambda x: (fast(x) * mx.cos(x)).sum())(X)
        g_slow = mx.grad(lambda x: (slow(x) * mx.cos(x)).sum())(X)
        assert np.isfinite(f64(g_fast)).all()
        np.testing.assert_allclose(f64(g_fast), f64(g_slow), rtol=1e-5, atol=1e-6)
    gate, up = mx.random.normal((4, 7, 32)) * 4, mx.random.normal((4, 7, 32))
    grads_fast = mx.grad(lambda g, u: fastmath.swiglu(g, u).square().sum(), argnums=(0, 1))(gate, up)
    grads_slow = mx.grad(lambda g, u: (nn.silu(g) * u).square().sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(grads_fast, grads_slow):
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-5, atol=1e-5)


def test_other_dtypes_use_mlx_lm_swiglu():
    gate, up = mx.random.normal((3, 8)).astype(mx.bfloat16), mx.random.normal((3, 8)).astype(mx.bfloat16)
    out = fastmath.swiglu(gate, up)
    assert out.dtype == mx.bfloat16
    np.testing.assert_array_equal(f64(out), f64(fastmath.original_swiglu(gate, up)))


@pytest.mark.skipif(not fastmath.wanted(), reason="fastmath installs only on Linux CPU")
def test_patched_model_logprobs_and_gradients_match_mlx_lm():
    """A tiny model's log-probs and gradients, with mlx-lm's swiglu and with the fast one."""
    model, tokenizer, _ = new_tiny_model("micro", seed=0)
    qwen3 = sys.modules["mlx_lm.models.qwen3"]
    assert fastmath.installed and qwen3.swiglu is fastmath.swiglu  # speed.enable() (conftest) installed it when mlx-lm was imported

    tokens = mx.array(np.random.default_rng(0).integers(4, 90, (6, 12)), dtype=mx.int32)

    def loss(tokens):
        logprobs, _ = token_logprobs(model, tokens)
        return logprobs.mean()

    value_and_grad = nn.value_and_grad(model, loss)
    fast_lp, _ = token_logprobs(model, tokens)
    fast_loss, fast_grads = mx.compile(value_and_grad, inputs=model.state, outputs=model.state)(tokens)  # as update.make_update compiles it
    fastmath.uninstall()
    try:
        assert qwen3.swiglu is not fastmath.swiglu
        slow_lp, _ = token_logprobs(model, tokens)
        slow_loss, slow_grads = value_and_grad(tokens)
    finally:
        fastmath.install()
    np.testing.assert_allclose(f64(fast_lp), f64(slow_lp), atol=1e-5)
    assert abs(fast_loss.item() - slow_loss.item()) < 1e-5
    for (name, a), (_, b) in zip(tree_flatten(fast_grads), tree_flatten(slow_grads)):
        assert np.abs(f64(a)).max() > 0, name
        np.testing.assert_allclose(f64(a), f64(b), rtol=1e-3, atol=1e-6, err_msg=name)


def test_switch_off(monkeypatch):
    monkeypatch.setenv("MLX_RL_FAST_EXP", "0")
    assert not fastmath.wanted()
