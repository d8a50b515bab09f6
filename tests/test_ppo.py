"""PPO chapter: the maths against slow references, the model wrapper, one real step, and the CLI."""

import json
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.chapters import ppo
from mlx_rl.chapters.icemaze import discounted_returns
from mlx_rl.data.rewards import load_rewards
from mlx_rl.data.tasks import get_task
from mlx_rl.engine.distributed import World
from mlx_rl.engine.logprobs import completion_batch, token_logprobs
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.engine.sampling import generate
from mlx_rl.engine.session import Reference
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.runs import PhaseTimer


# --- the maths ----------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
    """A plain loop per row over its completion tokens only (the positions where mask is 1)."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t] > 0]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[b, steps[i + 1]] if i + 1 < len(steps) else 0.0  # V = 0 after the end
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages


def random_batch(seed=0, B=5, T=9):
    """Rows laid out like training batches: leading prompt zeros, completion ones, trailing padding."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), dtype=np.float32)
    for b in range(B):
        start = rng.integers(0, 3)
        length = rng.integers(1, T - start + 1)
        mask[b, start : start + length] = 1
    rewards = (rng.normal(size=(B, T)) * mask).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)  # garbage at masked positions: must not leak
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.97, 1.0), (1.0, 1.0)])
def test_gae_matches_plain_loop(gamma, lam):
    rewards, values, mask = random_batch(seed=int(gamma * 100 + lam * 10))
    adv, returns = ppo.gae(mx.array(rewards), mx.array(values), mx.array(mask), gamma, lam)
    expected = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.array(adv), expected, atol=1e-5)
    np.testing.assert_allclose(np.array(returns), (expected + values) * mask, atol=1e-5)
    assert np.all(np.array(adv)[mask == 0] == 0)  # prompt and padding positions contribute nothing


def test_gae_lambda_0_is_td_error_and_lambda_1_is_ice_maze_return_minus_value():
    rewards, values, mask = random_batch(seed=3)
    gamma = 0.9
    adv0, _ = ppo.gae(mx.array(rewards), mx.array(values), mx.array(mask), gamma, 0.0)
    next_values = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((values.shape[0], 1))], axis=1)
    td = (rewards + gamma * next_values - values) * mask
    np.testing.assert_allclose(np.array(adv0), td, atol=1e-5)
    adv1, returns1 = ppo.gae(mx.array(rewards), mx.array(values), mx.array(mask), gamma, 1.0)
    mc = discounted_returns(rewards, mask, gamma)  # the Ice Maze chapter's return
    np.testing.assert_allclose(np.array(adv1), (mc - values) * mask, atol=1e-5)
    np.testing.assert_allclose(np.array(returns1), mc, atol=1e-5)


def test_token_rewards_put_the_score_on_the_last_token():
    mask = mx.array([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=mx.float32)
    kl = mx.array(np.full((2, 5), 0.5, dtype=np.float32))
    r = np.array(ppo.token_rewards(ppo.last_token_rewards(mx.array([2.0, 3.0]), mask), kl, mask, kl_coef=0.1))
    np.testing.assert_allclose(r, [[0, -0.05, -0.05, 1.95, 0], [0, -0.05, -0.05, -0.05, 2.95]], atol=1e-6)


def test_gae_skips_the_environments_tokens():
    """In an episode the environment's tokens (mask 0) sit between the model's turns: GAE runs over the model's
    tokens as if those were adjacent, so a reward at the end reaches the first turn, undiminished by the gap."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 9)).astype(np.float32)
    rewards = rng.normal(size=(2, 9)).astype(np.float32)
    mask = np.array([[0, 1, 1, 0, 0, 1, 0, 1, 0], [1, 0, 1, 1, 0, 0, 0, 1, 1]], dtype=np.float32)
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(mx.array(rewards * mask), mx.array(values), mx.array(mask), gamma, lam)
    for b in range(2):  # the same rows with the masked positions cut out, through the plain recursion
        keep = mask[b] > 0
        r, v = rewards[b][keep], values[b][keep]
        a, running = np.zeros_like(r), 0.0
        for t in reversed(range(len(r))):
            next_v = v[t + 1] if t + 1 < len(r) else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            a[t] = running
        np.testing.assert_allclose(np.array(adv)[b][keep], a, atol=1e-5)
        np.testing.assert_allclose(np.array(adv)[b][~keep], 0.0)
        np.testing.assert_allclose(np.array(ret)[b][keep], a + v, atol=1e-5)


@pytest.mark.parametrize("value_clip", [0.0, 0.2])
def test_value_loss_and_clipping_match_numpy(value_clip):
    rng = np.random.default_rng(1)
    values, old_values, returns = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3))
    mask = (rng.random((4, 6)) < 0.7).astype(np.float32)
    loss, metrics = ppo.value_loss(*(mx.array(x) for x in (values, old_values, returns, mask)), value_clip)
    err = (values - returns) ** 2
    if value_clip > 0:
        clipped = old_values + np.clip(values - old_values, -value_clip, value_clip)
        err_clipped = (clipped - returns) ** 2
        expected_frac = ((err_clipped > err) * mask).sum() / mask.sum()
        err = np.maximum(err, err_clipped)
        assert metrics["value/clipfrac"].item() == pytest.approx(expected_frac, abs=1e-6)
        assert expected_frac > 0  # the case is exercised
    assert loss.item() == pytest.approx(0.5 * (err * mask).sum() / mask.sum(), rel=1e-5)


def test_value_clipping_stops_the_gradient_beyond_the_clip():
    old, ret, mask = mx.array([[0.0]]), mx.array([[1.0]]), mx.array([[1.0]])
    grad = mx.grad(lambda v: ppo.value_loss(v, old, ret, mask, 0.2)[0])
    assert grad(mx.array([[0.5]])).item() == 0.0  # beyond the clip toward the return: no pull further
    assert grad(mx.array([[0.1]])).item() == pytest.approx(-0.9)  # inside the clip: plain squared error


def test_policy_loss_matches_numpy_clipped_surrogate():
    rng = np.random.default_rng(2)
    logprobs, old, adv = (rng.normal(size=(3, 5)).astype(np.float32) * 0.3 for _ in range(3))
    mask = (rng.random((3, 5)) < 0.8).astype(np.float32)
    loss, metrics = ppo.policy_loss(*(mx.array(x) for x in (logprobs, old, adv, mask)), clip_eps=0.2)
    ratio = np.exp(logprobs - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    assert loss.item() == pytest.approx((per_token * mask).sum() / mask.sum(), rel=1e-5)
    assert metrics["policy/ratio_max"].item() == pytest.approx(ratio[mask > 0].max(), rel=1e-5)


def test_explained_variance():
    rng = np.random.default_rng(0)
    returns = mx.array(rng.normal(size=(8, 6)).astype(np.float32))
    mask = mx.array((rng.random((8, 6)) < 0.8).astype(np.float32))
    assert ppo.explained_variance(returns, returns, mask).item() == pytest.approx(1.0, abs=1e-6)
    constant = mx.full(returns.shape, 0.3)
    assert ppo.explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    noisy = returns + 0.1 * mx.array(rng.normal(size=(8, 6)).astype(np.float32))
    assert 0.9 < ppo.explained_variance(noisy, returns, mask).item() < 1.0


def test_whiten_and_adaptive_kl():
    x, mask = mx.array([[1.0, 2.0, 3.0, 99.0]]), mx.array([[1.0, 1.0, 1.0, 0.0]])
    w = np.array(ppo.whiten(x, mask))
    np.testing.assert_allclose(w[0, :3], [-1.2247, 0.0, 1.2247], atol=1e-3)
    assert w[0, 3] == 0
    assert ppo.adapt_kl_coef(0.1, 10.0, 1.0, 100, 1000) == pytest.approx(0.1 * 1.02)  # capped at +20% per horizon
    assert ppo.adapt_kl_coef(0.1, 0.5, 1.0, 100, 1000) == pytest.approx(0.1 * 0.98)


# --- the model wrapper and one real step ------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, config = new_tiny_model("micro", seed=0)
    return model, tokenizer, config


def small_cfg(**kw):
    defaults = dict(rollout_batch=16, minibatch_size=8, epochs=2, value_epochs=2, kl_coef=0.05, value_warmup=0, compile=False)
    defaults.update(kw)
    return ppo.PPOConfig(**defaults)


def rollout_arrays(model, tokenizer, n=8, seed=0):
    task = get_task("addition")
    mx.random.seed(seed)
    rows = task.train_rows(np.random.default_rng(seed), n, distinct=True)
    r = generate(model, tokenizer, rows, task.max_new_tokens, 1.0)
    return completion_batch(r.prompt_ids, r.completion_ids, r.mask, tokenizer.pad_token_id)


def test_policy_forward_matches_the_models_own_forward(micro):
    """The value head's features come from the policy's own pass: token_logprobs(..., return_hidden=True)."""
    model, tokenizer, _ = micro
    tokens, _ = rollout_arrays(model, tokenizer)
    logprobs, entropy, hidden = token_logprobs(model, tokens, 0.7, return_hidden=True)
    ref_lp, ref_ent = token_logprobs(model, tokens, 0.7)
    np.testing.assert_allclose(np.array(logprobs), np.array(ref_lp), atol=1e-5)
    np.testing.assert_allclose(np.array(entropy), np.array(ref_ent), atol=1e-4)
    values = ppo.ValueHead(model.args.hidden_size)(hidden)
    assert values.shape == logprobs.shape and np.all(np.array(values) == 0)  # zero-initialised head


def test_gradients_reach_value_head_and_policy(micro):
    model, tokenizer, _ = micro
    tokens, mask = rollout_arrays(model, tokenizer)
    old_logprobs, _, features = token_logprobs(model, tokens, return_hidden=True)
    rng = np.random.default_rng(0)
    advantages = mx.array(rng.normal(size=mask.shape).astype(np.float32)) * mask
    norm = lambda tree: sum(mx.abs(v).sum().item() for _, v in tree_flatten(tree))  # noqa: E731

    policy_fn = ppo.make_policy_loss(clip_eps=0.2, temperature=1.0)
    (loss, _), grads = nn.value_and_grad(model, lambda *a: policy_fn(model, *a))(tokens, mask, old_logprobs, advantages,
                                                                                 mask.sum())
    assert norm(grads["model"]["layers"]) > 0 and norm(grads["model"]["embed_tokens"]) > 0

    head = ppo.ValueHead(model.args.hidden_size)
    value_fn = ppo.make_value_loss(value_clip=0.2)
    returns = mx.ones(mask.shape) * mask
    (loss, _), grads = nn.value_and_grad(head, lambda *a: value_fn(head, *a))(features, mask, head(features), returns,
                                                                             mask.sum())
    assert norm(grads["linear"]["weight"]) > 0 and norm(grads["linear"]["bias"]) > 0
    assert loss.item() == pytest.approx(0.5)  # V = 0, R = 1 on every completion token


def setup_step(micro, cfg, task=None):
    """What ppo_step reads from a Session: a copy of the micro model (with its frozen reference), the task, RNG, timer."""
    model, tokenizer, _ = micro
    policy = type(model)(model.args)
    policy.update(model.parameters())
    session = types.SimpleNamespace(model=policy, tokenizer=tokenizer, task=task or get_task("addition"),
                                    rng=np.random.default_rng(0), timer=PhaseTimer(), reference=Reference(policy),
                                    world=World())
    head = ppo.ValueHead(model.args.hidden_size)
    update_policy = make_update(policy, make_optimizer(cfg.lr, 10), ppo.make_policy_loss(cfg.clip_eps, 1.0), 1.0, cfg.compile)
    update_value = make_update(head, make_optimizer(cfg.value_lr, 10), ppo.make_value_loss(cfg.value_clip), 1.0, cfg.compile)
    return session, head, update_policy, update_value


def varied_reward(completions, **kwargs):
    return [(sum(map(ord, c)) % 7) / 6 for c in completions]  # deterministic, differs between samples


@pytest.mark.parametrize("compile", [False, True])
def test_first_epoch_ratio_is_exactly_one(micro, compile):
    cfg = small_cfg(epochs=1, compile=compile)  # the first epoch's first minibatch: old == new exactly
    task = get_task("addition")
    task.rewards = load_rewards([varied_reward])  # an untrained model scores 0 on the task: no advantage, no update
    session, head, update_policy, update_value = setup_step(micro, cfg, task)
    N = session.task.max_new_tokens
    first = {}

    def first_update(*arrays):
        out = update_policy(*arrays)
        first.setdefault("metrics", {k: v.item() for k, v in out[1].items()})
        return out

    mx.random.seed(0)
    row = ppo.ppo_step(cfg, session, head, first_update, update_value, 0.05, 0, N)
    assert row["reward/std"] > 0  # the rewards carry signal, so the first step moves the policy
    m = first["metrics"]
    assert m["policy/ratio_min"] == 1.0 and m["policy/ratio_max"] == 1.0 and m["policy/ratio_mean"] == 1.0
    assert m["policy/clipfrac"] == 0.0 and m["kl/approx"] == 0.0
    assert row["kl/k3"] == 0.0  # the policy still equals its reference
    first.clear()
    row = ppo.ppo_step(cfg, session, head, first_update, update_value, 0.05, 1, N)
    assert first["metrics"]["policy/ratio_min"] == 1.0 and first["metrics"]["policy/ratio_max"] == 1.0  # again, after a step
    assert row["kl/k3"] > 0 and row["value/mean"] != 0  # the policy and the value head moved


def test_value_warmup_leaves_the_policy_unchanged(micro):
    task = get_task("addition")

    def always_one(completions, **kwargs):  # an untrained model scores 0: give the critic something to learn
        return [1.0] * len(completions)

    task.rewards = load_rewards([always_one])
    cfg = small_cfg(value_warmup=1, value_clip=0.0, kl_coef=0.0)
    session, head, update_policy, update_value = setup_step(micro, cfg, task)
    session.reference = None  # kl_coef = 0: the reference is never asked for
    N = task.max_new_tokens
    before = {k: np.array(v) for k, v in tree_flatten(session.model.parameters())}
    row = ppo.ppo_step(cfg, session, head, update_policy, update_value, 0.0, 0, N)
    after = dict(tree_flatten(session.model.parameters()))
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    assert "loss/policy" not in row and row["loss/value"] > 0
    assert np.abs(np.array(head.linear.weight)).sum() > 0
    # the critic learns: on the same features its error falls
    row2 = ppo.ppo_step(cfg, session, head, update_policy, update_value, 0.0, 0, N)
    assert row2["value/mean"] > row["value/mean"]


# --- the command ----------------------------------------------------------------------


def test_cli_runs_saves_value_head_and_resumes(tmp_path, micro_checkpoint, monkeypatch):
    from mlx_rl.cli import main
    from mlx_rl.engine import session as session_module

    out = tmp_path / "run"
    common = ["--rollout-batch", "16", "--minibatch-size", "8", "--value-epochs", "2", "--eval-prompts", "16", "--eval-every", "1", "--value-warmup", "1"]
    main(["ppo", "--model", str(micro_checkpoint), "--out", str(out), "--steps", "2", *common])
    ckpt = out / "checkpoint"
    assert (ckpt / "model.safetensors").exists() and (ckpt / ppo.VALUE_HEAD_FILE).exists()
    assert not any("value_head" in k for k in mx.load(str(ckpt / "model.safetensors")))  # a plain mlx-lm checkpoint
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[0]
    for name in ["reward/mean", "reward/std", "train/accuracy", "kl/k3", "kl/approx", "policy/entropy", "policy/clipfrac",
                 "loss/policy", "loss/value", "value/explained_variance", "value/mean", "value/return_mean",
                 "value/advantage_mean", "value/advantage_std", "policy/completion_len", "optim/grad_norm",
                 "time/generate_s", "time/forward_backward_s", "eval/accuracy"]:
        assert name in rows[2], name
    saved_head = mx.load(str(ckpt / ppo.VALUE_HEAD_FILE))
    saved_state = mx.load(str(ckpt / "trainer_state.safetensors"))  # both optimizers' states
    assert saved_state["optimizer.value.step"].item() > 0 and "optimizer.policy.step" in saved_state

    # --resume restores the value head: compare it with the saved one before training continues
    seen = {}
    original_head, original_optimizer = ppo.load_value_head, session_module.restore_optimizer

    def spy_head(head, path):
        original_head(head, path)
        seen.update({k: np.array(v) for k, v in tree_flatten(head.parameters())})

    def spy_optimizer(path, name, optimizer):
        original_optimizer(path, name, optimizer)
        seen[f"{name}_step"] = optimizer.state["step"].item()

    monkeypatch.setattr(ppo, "load_value_head", spy_head)
    monkeypatch.setattr(session_module, "restore_optimizer", spy_optimizer)
    main(["ppo", "--resume", str(out), "--steps", "3"])
    monkeypatch.undo()
    np.testing.assert_array_equal(seen["linear.weight"], np.array(saved_head["linear.weight"]))
    np.testing.assert_array_equal(seen["linear.bias"], np.array(saved_head["linear.bias"]))
    assert seen["value_step"] == saved_state["optimizer.value.step"].item() > 0  # its optimizer state too
    assert seen["policy_step"] == saved_state["optimizer.policy.step"].item()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.acceptance
def test_default_run_lifts_accuracy(tmp_path, addition_plateau):
    """The chapter's claim: from the pretrain plateau to >= 90% and +25 points, in under 10 minutes."""
    from mlx_rl.cli import main

    out = tmp_path / "ppo"
    main(["ppo", "--model", str(addition_plateau), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["eval/accuracy"] >= 0.9
    assert summary["after"]["eval/accuracy"] - summary["before"]["eval/accuracy"] >= 0.25
    assert summary["wall_s"] < 600
