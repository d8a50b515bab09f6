"""KL maths against numpy, the estimators' bias and sign, and a smoke run of `mlx-rl kl`."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_rl.chapters.kl import exact_kl, k1, k2, k3

# Two categoricals far enough apart that KL(p||q) and KL(q||p) differ clearly.
P = np.array([0.6, 0.25, 0.1, 0.04, 0.01])
Q = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
KL_PQ = float((P * np.log(P / Q)).sum())  # forward
KL_QP = float((Q * np.log(Q / P)).sum())  # reverse: 0.307 vs forward 0.241


def test_exact_kl_matches_numpy_in_each_direction():
    logp, logq = mx.array(np.log(P)), mx.array(np.log(Q))
    assert abs(KL_PQ - KL_QP) > 0.05  # the test can tell the directions apart
    assert exact_kl(logp, logq, "forward").item() == pytest.approx(KL_PQ, abs=1e-5)
    assert exact_kl(logp, logq, "reverse").item() == pytest.approx(KL_QP, abs=1e-5)
    assert exact_kl(logp, logq, "jeffreys").item() == pytest.approx(KL_PQ + KL_QP, abs=1e-5)
    assert exact_kl(logq, logp, "forward").item() == pytest.approx(KL_QP, abs=1e-5)  # swapping arguments swaps
    with pytest.raises(ValueError):
        exact_kl(logp, logq, "backward")


def test_exact_kl_takes_logits_batches_and_zeros():
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.normal(size=(3, 4, 7)) * 2, rng.normal(size=(3, 4, 7)) + 5.0  # unnormalised
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    expected = (np.exp(lp) * (lp - lq)).sum(-1)  # (3, 4)
    got = exact_kl(mx.array(p_logits), mx.array(q_logits), "forward")
    assert got.shape == (3, 4)
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)
    assert np.array(exact_kl(mx.array(q_logits), mx.array(q_logits))).max() < 1e-6  # KL(p||p) = 0
    # A token p rules out (log p = -inf, as after top-p) adds 0 to KL(p||q), not nan.
    logp = mx.array([0.0, -np.inf]) - 0.0
    logq = mx.log(mx.array([0.5, 0.5]))
    assert exact_kl(logp, logq, "forward").item() == pytest.approx(np.log(2), abs=1e-6)


def estimator_samples(n=200_000, seed=0):
    """log r = log p(x) - log q(x) for n samples x ~ q (fixed seed)."""
    x = np.random.default_rng(seed).choice(len(Q), size=n, p=Q)
    return mx.array(np.log(P[x]) - np.log(Q[x]), dtype=mx.float32)


def test_k1_and_k3_are_unbiased_for_kl_q_p_and_k2_is_not():
    logr = estimator_samples()
    n = logr.size
    for name, fn in (("k1", k1), ("k3", k3)):
        values = np.array(fn(logr), dtype=np.float64)
        stderr = values.std() / np.sqrt(n)
        assert abs(values.mean() - KL_QP) < 4 * stderr, name  # within 4 standard errors of KL(q||p)
        assert abs(values.mean() - KL_PQ) > 20 * stderr, name  # and clearly not the other direction
    values = np.array(k2(logr), dtype=np.float64)
    assert values.mean() - KL_QP > 20 * values.std() / np.sqrt(n)  # k2 overestimates here: biased
    # The exact expectations say the same without sampling noise.
    logr_all = np.log(P) - np.log(Q)
    assert (Q * np.array(k1(mx.array(logr_all)))).sum() == pytest.approx(KL_QP, abs=1e-5)
    assert (Q * np.array(k3(mx.array(logr_all)))).sum() == pytest.approx(KL_QP, abs=1e-5)
    assert abs((Q * np.array(k2(mx.array(logr_all)))).sum() - KL_QP) > 0.1


def test_k3_is_never_negative_and_k1_often_is():
    grid = np.concatenate([np.linspace(-30, 30, 200_001), np.logspace(-12, 1, 50_000), -np.logspace(-12, 1, 50_000)])
    logr = mx.array(grid.astype(np.float32))
    assert mx.min(k3(logr)).item() >= 0.0
    assert mx.min(k2(logr)).item() >= 0.0
    assert (np.array(k1(estimator_samples(1000))) < 0).mean() > 0.1
    assert k3(mx.array(0.0)).item() == 0.0


def test_estimator_formulas():
    logr = mx.array([-2.0, -0.1, 0.0, 0.3, 1.5])
    r = np.exp(np.array(logr, dtype=np.float64))
    np.testing.assert_allclose(np.array(k1(logr)), -np.log(r), atol=1e-6)
    np.testing.assert_allclose(np.array(k2(logr)), np.log(r) ** 2 / 2, atol=1e-6)
    np.testing.assert_allclose(np.array(k3(logr)), (r - 1) - np.log(r), atol=1e-6)


def test_grpo_convention_estimates_kl_policy_to_reference():
    """k3(ref_logprobs - policy_logprobs) on the policy's samples -> KL(policy || reference)."""
    policy, reference = Q, P
    x = np.random.default_rng(1).choice(len(policy), size=200_000, p=policy)  # the policy samples
    policy_logprobs, ref_logprobs = mx.array(np.log(policy[x])), mx.array(np.log(reference[x]))
    estimate = k3(ref_logprobs - policy_logprobs).mean().item()
    exact = exact_kl(mx.array(np.log(reference)), mx.array(np.log(policy)), "reverse").item()
    assert exact == pytest.approx(float((policy * np.log(policy / reference)).sum()), abs=1e-5)
    assert estimate == pytest.approx(exact, rel=0.02)


def test_identical_checkpoints_have_zero_kl(micro_model):
    from mlx_rl.chapters.kl import KLConfig, checkpoint_experiment

    model, tokenizer, _ = micro_model
    result = checkpoint_experiment(KLConfig(sample_prompts=8, max_new_tokens=4, max_samples=16, trials=10), model, model, tokenizer)
    assert result["tokens"] > 0
    assert result["kl_policy_reference"] == result["kl_reference_policy"] == 0.0
    assert all(max(map(abs, e["mean"])) == 0.0 for e in result["estimators"].values())


def test_cli_smoke_run(tmp_path, micro_checkpoint):
    from mlx_rl.cli import main

    out = tmp_path / "kl"
    main(["kl", "--model", str(micro_checkpoint), "--sample-prompts", "16", "--max-new-tokens", "4", "--max-samples", "64",
          "--trials", "50", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chapter"] == "kl" and summary["final"]["kl/k3"] >= 0
    summary = summary["details"]  # the chapter's own figures
    for name in ("kl-categorical-close", "kl-categorical-far", "kl-bias-and-spread", "kl-checkpoints"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["trials"] == 50
    far = summary["categorical"]["far"]
    assert far["estimators"]["k1"]["n"][-1] == 64
    assert far["estimators"]["k2"]["mean"][-1] > far["kl_q_p"]  # k2's bias shows
    models = summary["checkpoints"]
    assert models["kl_policy_reference"] > 0 and min(models["estimators"]["k3"]["mean"]) >= 0
    assert "k3" in summary["rl_chapters_use"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kl/k1", "kl/k2", "kl/k3", "kl/exact"} <= set(rows[0])
