"""GRPO: the loss against a per-token Python loop, the exact first-iteration ratio, gradients,
the reference left alone at kl_coef = 0, zero-signal groups, and a CLI smoke run with --resume."""

import json
import math
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.chapters import grpo
from mlx_rl.chapters import grpo_family as family
from mlx_rl.cli import main
from mlx_rl.data.rewards import load_rewards
from mlx_rl.data.tasks import get_task
from mlx_rl.engine.checkpoint import save_checkpoint
from mlx_rl.engine.distributed import World
from mlx_rl.engine.logprobs import completion_batch, token_logprobs
from mlx_rl.engine.models import new_tiny_model, param_diff
from mlx_rl.engine.sampling import generate
from mlx_rl.engine.session import Reference
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.runs import PhaseTimer


def grpo_variant(clip_eps=None, loss_agg=None, max_new_tokens=4, **kw):
    """GRPO's loss as the chapter builds it (--variant grpo, with these settings)."""
    cfg = grpo.GRPOConfig(clip_eps=clip_eps, loss_agg=loss_agg, **kw)
    return cfg, family.make_variant(cfg, max_new_tokens)


# --- the maths against slow references ----------------------------------------------


def loop_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, beta, loss_agg):
    """GRPO's -J written the slow way: one token at a time, plain Python floats."""
    B, T = logprobs.shape
    per_seq, all_terms, kls, all_kls, clipped, n_tokens = [], [], [], [], 0, 0
    for b in range(B):
        terms, seq_kls = [], []
        for t in range(T):
            if mask[b, t] == 0:
                continue
            ratio = math.exp(logprobs[b, t] - old_logprobs[b, t])
            a = advantages[b]
            objective = min(ratio * a, max(1 - clip_eps, min(ratio, 1 + clip_eps)) * a)
            logr = ref_logprobs[b, t] - logprobs[b, t]
            kl = math.exp(logr) - logr - 1
            terms.append(-objective + beta * kl)
            seq_kls.append(kl)
            clipped += (ratio > 1 + clip_eps and a > 0) or (ratio < 1 - clip_eps and a < 0)
            n_tokens += 1
        per_seq.append(sum(terms) / len(terms) if terms else 0.0)
        all_terms += terms
        kls.append(sum(seq_kls) / len(seq_kls))
        all_kls += seq_kls
    if loss_agg == "sequence":
        return sum(per_seq) / B, clipped / n_tokens, sum(kls) / B
    return sum(all_terms) / n_tokens, clipped / n_tokens, sum(all_kls) / n_tokens


@pytest.mark.parametrize("loss_agg", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_matches_per_token_loop(loss_agg, beta):
    rng = np.random.default_rng(0)
    B, T = 6, 9
    logprobs = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    old_logprobs = (logprobs + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios well past the clip
    ref_logprobs = (logprobs + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    advantages = rng.normal(0, 1, B).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[:, 0] = 1  # every row has a token
    mask[-1, 1:] = 0  # and one row has just one
    _, variant = grpo_variant(clip_eps=0.2, loss_agg=loss_agg)
    assert (variant.eps_low, variant.eps_high) == (0.2, 0.2)  # --clip-eps sets both edges in GRPO
    loss, metrics = variant.loss(*map(mx.array, (logprobs, old_logprobs, ref_logprobs, advantages, mask)),
                                 kl_coef=beta, n_rows=mx.array(float(B)), n_tokens=mx.array(mask.sum()))
    want_loss, want_clipfrac, want_kl = loop_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, 0.2, beta, loss_agg)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert metrics["policy/clipfrac"].item() == pytest.approx(want_clipfrac, abs=1e-6)
    assert 0 < want_clipfrac < 1
    ratios = np.exp(logprobs - old_logprobs)[mask > 0]
    assert metrics["policy/ratio_min"].item() == pytest.approx(ratios.min(), rel=1e-5)
    assert metrics["policy/ratio_max"].item() == pytest.approx(ratios.max(), rel=1e-5)
    assert ("kl/k3" in metrics) == (beta > 0)
    if beta > 0:
        assert metrics["kl/k3"].item() == pytest.approx(want_kl, rel=1e-5)
        assert metrics["loss/kl"].item() == pytest.approx(beta * want_kl, rel=1e-5)


def test_aggregations_differ_only_in_weighting():
    per_token = mx.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    n_rows, n_tokens, length = mx.array(2.0), mask.sum(), 4
    assert family.sequence_mean(per_token, mask, n_rows, n_tokens, length).item() == pytest.approx((1.0 + 4.0) / 2)
    assert family.token_mean(per_token, mask, n_rows, n_tokens, length).item() == pytest.approx((4 * 1.0 + 4.0) / 5)
    assert family.constant_mean(per_token, mask, n_rows, n_tokens, length).item() == pytest.approx((4 * 1.0 + 4.0) / (2 * 4))


def test_group_advantages():
    rewards = np.array([[1.1, 0.1, 0.2, 0.1], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]])
    advantages, zero_signal = family.group_advantages(rewards)
    assert zero_signal.tolist() == [False, True, True]
    assert np.all(advantages[1:] == 0.0)  # exactly 0, though 0.3 - mean(0.3 x 4) is not in floating point
    r = rewards[0]
    np.testing.assert_allclose(advantages[0], (r - r.mean()) / (r.std() + 1e-4), rtol=1e-5)
    unscaled, _ = family.group_advantages(rewards, scale_std=False)
    np.testing.assert_allclose(unscaled[0], r - r.mean(), rtol=1e-5)
    assert np.all(unscaled[1:] == 0.0)
    loo, loo_zero = family.rloo_advantages(rewards)  # RLOO: r_i minus the mean of the others, a loop here
    others = [np.mean([r[j] for j in range(len(r)) if j != i]) for i in range(len(r))]
    np.testing.assert_allclose(loo[0], r - np.array(others), rtol=1e-5)
    assert loo_zero.tolist() == [False, True, True] and np.all(loo[1:] == 0.0)


# --- on a tiny random model -----------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, config = new_tiny_model("micro", seed=0)
    return model, tokenizer, config


def batch_for(model, tokenizer, task, n_prompts=3, group=4):
    """A GRPO batch as grpo_step lays it out, and the loss's trailing arguments (n_rows, n_tokens, shared_len)."""
    rows = task.train_rows(np.random.default_rng(0), n_prompts, distinct=True)
    cfg = grpo.GRPOConfig(group_size=group)
    group_rows = [r for r in rows for _ in range(group)]
    rollout = generate(model, tokenizer, group_rows, task.max_new_tokens, 1.0)
    N = task.max_new_tokens
    tokens, mask = completion_batch(rollout.prompt_ids, grpo.pad_columns(rollout.completion_ids, N),
                                    grpo.pad_columns(rollout.mask, N), 0)
    advantages = mx.array(np.random.default_rng(1).normal(size=len(group_rows)).astype(np.float32))
    counts = (mx.array(float(mask.shape[0])), mask.sum(), min(len(p) for p in rollout.prompt_ids))
    return cfg, tokens, mask, advantages, counts


@pytest.mark.parametrize("loss_agg,beta", [("sequence", 0.0), ("token", 0.05)])
def test_first_inner_iteration_has_ratio_exactly_one(micro, loss_agg, beta):
    model, tokenizer, config = micro
    model = type(model)(model.args)
    model.update(micro[0].parameters())  # a copy: this test takes optimizer steps
    task = get_task("addition")
    cfg, tokens, mask, advantages, counts = batch_for(model, tokenizer, task)
    cfg.loss_agg, cfg.kl_coef = loss_agg, beta
    optimizer = make_optimizer(1e-2, 10)
    # compiled, with the group's shared prompt run once per group, as the runs use it
    update = make_update(model, optimizer, grpo.make_loss_fn(cfg, family.make_variant(cfg, task.max_new_tokens)),
                         compile=True)
    before, _ = token_logprobs(model, tokens, cfg.temperature)  # a separate teacher-forced pass
    zeros = mx.zeros(mask.shape)
    ref_logprobs = before - 0.5
    _, m1, _ = update(tokens, mask, advantages, zeros, ref_logprobs, mx.array(True), *counts)
    assert m1["policy/ratio_min"].item() == 1.0 and m1["policy/ratio_max"].item() == 1.0
    assert m1["policy/ratio_mean"].item() == 1.0
    assert m1["policy/clipfrac"].item() == 0.0 and m1["kl/approx"].item() == 0.0
    old = m1["logprobs"]  # the old policy's log-probs, out of the first pass
    keep = np.array(mask) > 0  # the loss masks them: the completion's tokens, 0 elsewhere
    np.testing.assert_allclose(np.array(old)[keep], np.array(before)[keep], atol=1e-5)
    assert np.all(np.array(old)[~keep] == 0)
    _, m2, _ = update(tokens, mask, advantages, old, ref_logprobs, mx.array(False), *counts)
    assert m2["policy/ratio_min"].item() < 1.0 < m2["policy/ratio_max"].item()  # the policy moved
    assert m2["kl/approx"].item() > 0


def test_gradients_reach_every_trainable_parameter(micro):
    model, tokenizer, _ = micro
    task = get_task("addition")
    cfg, tokens, mask, advantages, counts = batch_for(model, tokenizer, task)
    cfg.kl_coef = 0.1
    ref_logprobs = Reference(model).logprobs(tokens) - 0.1  # a reference that differs
    loss_fn = grpo.make_loss_fn(cfg, family.make_variant(cfg, task.max_new_tokens))
    value_and_grad = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))
    old = mx.zeros(mask.shape)
    (loss, _), grads = value_and_grad(tokens, mask, advantages, old, ref_logprobs, mx.array(True), *counts)
    flat = tree_flatten(grads)
    assert len(flat) == len(tree_flatten(model.trainable_parameters()))
    for name, g in flat:
        assert mx.abs(g).max().item() > 0, f"no gradient reaches {name}"


class CountingReference:
    def __init__(self, model):
        self.inner = Reference(model)
        self.calls = 0

    def logprobs(self, tokens, temperature=1.0, **layout):
        self.calls += 1
        return self.inner.logprobs(tokens, temperature, **layout)


def step_once(micro, beta, reward_fn, inner_iters=1):
    """One grpo_step on a copy of the micro model, with the task's reward replaced by reward_fn."""
    base, tokenizer, _ = micro
    model = type(base)(base.args)
    model.update(base.parameters())
    task = get_task("addition")
    task.rewards = load_rewards([reward_fn])
    cfg = grpo.GRPOConfig(group_size=4, prompts_per_step=3, kl_coef=beta, epochs=inner_iters)
    variant = family.make_variant(cfg, task.max_new_tokens)
    timer = PhaseTimer()
    update = make_update(model, make_optimizer(1e-3, 10), grpo.make_loss_fn(cfg, variant), compile=False, timer=timer)
    reference = CountingReference(model)
    session = types.SimpleNamespace(model=model, tokenizer=tokenizer, task=task, rng=np.random.default_rng(0),
                                    timer=timer, world=World(), reference=reference, step=0, cfg=cfg)
    row, samples = grpo.grpo_step(session, cfg, variant, update, task.max_new_tokens)
    return model, reference, row, timer.pop()


def varied_reward(completions, **kwargs):
    return [float(len(c) + sum(map(ord, c)) % 7) for c in completions]  # differs between samples


def constant_reward(completions, **kwargs):
    return [0.5] * len(completions)


def test_beta_zero_never_evaluates_the_reference(micro):
    model, reference, row, times = step_once(micro, 0.0, varied_reward)
    assert row["grpo/skipped"] == 0.0 and param_diff(model.parameters(), micro[0].parameters()) > 0
    assert reference.calls == 0 and reference.inner.calls == 0
    assert "kl/k3" not in row and "time/reference_s" not in times
    model, reference, row, times = step_once(micro, 0.05, varied_reward, inner_iters=2)
    assert reference.calls == 1  # once per batch, not per inner iteration
    assert row["kl/k3"] >= 0 and "time/reference_s" in times


def test_all_zero_signal_batch_takes_no_step(micro):
    model, reference, row, times = step_once(micro, 0.05, constant_reward)
    assert row["grpo/zero_signal_frac"] == 1.0 and row["grpo/skipped"] == 1.0
    assert param_diff(model.parameters(), micro[0].parameters()) == 0.0
    assert "time/forward_backward_s" not in times and reference.calls == 0


def test_sample_batch_samples_in_chunks_with_the_same_result(micro, monkeypatch):
    """--sample-batch N samples N rows per sampler call; every row keeps its own key, so the ids are the same
    exactly, and the sampler's log-probs, the rewards, the step's metrics and the updated weights to 1e-5,
    for N = all rows at once (0, today's run), a group, and two groups (the last chunk one group)."""
    base, tokenizer, _ = micro
    calls, captured = [], {}
    real_generate, real_rollout_batch = grpo.generate, grpo.rollout_batch

    def generate(model, tokenizer, rows, *args, **kw):
        calls[-1].append(len(rows))
        return real_generate(model, tokenizer, rows, *args, **kw)

    def rollout_batch(*args, **kw):
        out = real_rollout_batch(*args, **kw)
        captured[n] = out
        return out

    monkeypatch.setattr(grpo, "generate", generate)
    monkeypatch.setattr(grpo, "rollout_batch", rollout_batch)
    results = {}
    for n in (0, 4, 8):
        calls.append([])
        model = type(base)(base.args)
        model.update(base.parameters())
        task = get_task("addition")
        task.rewards = load_rewards([varied_reward])
        cfg = grpo.GRPOConfig(group_size=4, prompts_per_step=3, kl_coef=0.05, epochs=2, sample_batch=n)
        variant = family.make_variant(cfg, task.max_new_tokens)
        timer = PhaseTimer()
        update = make_update(model, make_optimizer(1e-3, 10), grpo.make_loss_fn(cfg, variant), compile=False, timer=timer)
        session = types.SimpleNamespace(model=model, tokenizer=tokenizer, task=task, rng=np.random.default_rng(0),
                                        timer=timer, world=World(), reference=Reference(model), step=0, cfg=cfg)
        mx.random.seed(0)
        row, _ = grpo.grpo_step(session, cfg, variant, update, task.max_new_tokens)
        results[n] = model, row
    assert calls == [[12], [4, 4, 4], [8, 4]]
    rollout0, rows0, scores0 = captured[0]
    model0, row0 = results[0]
    assert row0["grpo/skipped"] == 0.0 and param_diff(model0.parameters(), base.parameters()) > 0  # a real update
    for n in (4, 8):
        rollout, rows, scores = captured[n]
        assert np.array(rollout.completion_ids).tolist() == np.array(rollout0.completion_ids).tolist() and rows == rows0
        np.testing.assert_array_equal(np.array(rollout.mask), np.array(rollout0.mask))
        np.testing.assert_allclose(np.array(rollout.logprobs), np.array(rollout0.logprobs), atol=1e-5)
        np.testing.assert_allclose(scores.total, scores0.total, atol=1e-5)
        model, row = results[n]
        assert param_diff(model.parameters(), model0.parameters()) < 1e-5
        assert row.keys() == row0.keys()
        for k in row0:
            assert row[k] == pytest.approx(row0[k], abs=1e-5), k


# --- the command ------------------------------------------------------------------------


def test_cli_smoke_and_resume(tmp_path, micro, capsys):
    model, tokenizer, config = micro
    ckpt = tmp_path / "start"
    save_checkpoint(ckpt, model, tokenizer, config)
    out = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), "--out", str(out), "--prompts-per-step", "2", "--group-size", "4",
            "--eval-prompts", "4", "--eval-every", "1", "--beta", "0.05", "--inner-iters", "2",
            "--pass-k", "1,2", "--pass-k-prompts", "4", "--sample-batch", "4"]  # two sampler calls per step
    main(args + ["--steps", "2"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "grpo/zero_signal_frac" in rows[2] and "time/generate_s" in rows[2]
    assert (out / "checkpoint" / "model.safetensors").exists() and (out / "plots" / "reward.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["kl_coef"], config["epochs"]) == (0.05, 2)  # the older names --beta, --inner-iters still work
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval/accuracy" in summary["before"] and "eval/accuracy" in summary["after"]
    start_pass = summary["details"]["pass_at_k"]["start"]
    assert set(start_pass) == {"pass@1", "pass@2"} and start_pass["pass@1"] <= start_pass["pass@2"]
    main(["grpo", "--resume", str(out), "--steps", "3"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["details"]["pass_at_k"]["start"] == start_pass  # the run's own start
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a finished run with nothing left to do
        main(["grpo", "--resume", str(out), "--steps", "3"])
    assert e.value.code == 0 and "already finished" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a run keeps its settings
        main(["grpo", "--resume", str(out), "--steps", "4", "--group-size", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--group-size" in err and len(err.strip().splitlines()) == 1, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # neither touched the run


def test_cli_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--model", str(tmp_path), "--clip-eps", "0"])
    assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a group is sampled in one call
        main(["grpo", "--model", str(tmp_path), "--group-size", "4", "--sample-batch", "6"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--sample-batch (6) must be a multiple of --group-size (4)" in err, err


@pytest.mark.acceptance
def test_default_run_lifts_addition_past_the_plateau(tmp_path, addition_plateau):
    """The acceptance figure: pretrain's default checkpoint, then the default GRPO run."""
    main(["grpo", "--task", "addition", "--model", str(addition_plateau), "--out", str(tmp_path / "grpo")])
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["after"]["eval/accuracy"] >= 0.90
    assert summary["after"]["eval/accuracy"] - summary["before"]["eval/accuracy"] >= 0.25
    assert summary["wall_s"] < 600
