"""Off-policy GRPO and PPO: the sampler correction (--is-correction) against a numpy transcription of TRL's and
veRL's definitions, masks respected; --rollout-staleness samples with the policy of K steps ago, reproducibly."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.chapters import grpo
from mlx_rl.chapters import grpo_family as family
from mlx_rl.chapters import ppo
from mlx_rl.cli import main

MODES = ["token-tis", "token-mask", "seq-tis", "seq-mask"]


def numpy_is_weights(old, sampler, mask, mode, cap):
    """TRL's GRPOTrainer (vllm_importance_sampling_mode), transcribed in float64 numpy:
    diff = (old - sampling) * mask; sequence modes sum it over the completion, keepdim; ratio = exp(diff);
    *_truncate: clamp(ratio, max=cap); *_mask: ratio with 0 where ratio > cap."""
    old, sampler, mask = (np.asarray(x, dtype=np.float64) for x in (old, sampler, mask))
    diff = (old - sampler) * mask
    if mode.startswith("seq"):
        diff = diff.sum(axis=-1, keepdims=True)
    ratio = np.exp(diff)
    if mode.endswith("tis"):
        ratio = np.minimum(ratio, cap)
    else:
        ratio = np.where(ratio > cap, 0.0, ratio)
    return np.broadcast_to(ratio, mask.shape)


def random_logprobs(seed=0, B=6, T=7, spread=0.4):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.05, 3.0, size=(B, T)).astype(np.float32)
    sampler = (old + rng.normal(0, spread, size=(B, T))).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) < 0.75).astype(np.float32)
    mask[:, 0] = 1.0  # every row has a token
    return old, sampler, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", [3.0, 1.2])
def test_is_weights_match_trl_definition(mode, cap):
    old, sampler, mask = random_logprobs(seed=int(cap * 10) + MODES.index(mode), B=10, T=12, spread=1.0)
    weights, cut = family.is_weights(mx.array(old), mx.array(sampler), mx.array(mask), mode, cap)
    expected = numpy_is_weights(old, sampler, mask, mode, cap)
    keep = mask > 0
    np.testing.assert_allclose(np.array(weights)[keep], expected[keep], rtol=1e-6, atol=1e-6)
    # the cap did something in this batch, and `cut` marks exactly where
    raw = numpy_is_weights(old, sampler, mask, mode.split("-")[0] + "-tis", np.inf)
    assert np.array_equal(np.array(cut)[keep], (raw > cap)[keep]) and (raw[keep] > cap).any()
    if mode.endswith("mask"):
        assert np.all(np.array(weights)[np.array(cut)] == 0.0)
    else:
        assert np.array(weights)[keep].max() <= cap + 1e-6


def test_verl_truncated_weights_are_the_same():
    """veRL's rollout correction (rollout_is token / sequence): exp(clamp(log_ratio, -20, 20)), the sequence's
    from the masked sum, then clamp(max=threshold): the same weights as TRL's truncate modes."""
    old, sampler, mask = random_logprobs(seed=3)
    for level, mode in [("token", "token-tis"), ("sequence", "seq-tis")]:
        log_ratio = old.astype(np.float64) - sampler
        if level == "sequence":
            log_ratio = (log_ratio * mask).sum(axis=-1, keepdims=True)
        expected = np.broadcast_to(np.minimum(np.exp(np.clip(log_ratio, -20, 20)), 2.0), mask.shape)
        weights, _ = family.is_weights(mx.array(old), mx.array(sampler), mx.array(mask), mode, 2.0)
        np.testing.assert_allclose(np.array(weights)[mask > 0], expected[mask > 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["seq-tis", "seq-mask", "token-mask"])
def test_padding_and_environment_tokens_never_enter_the_weight(mode):
    old, sampler, mask = random_logprobs(seed=5, spread=0.05)
    far = np.where(mask > 0, sampler, -60.0).astype(np.float32)  # what a padded or environment position holds
    a, _ = family.is_weights(mx.array(old), mx.array(sampler), mx.array(mask), mode, 3.0)
    b, _ = family.is_weights(mx.array(old), mx.array(far), mx.array(mask), mode, 3.0)
    assert np.array_equal(np.array(a)[mask > 0], np.array(b)[mask > 0])
    metrics = family.is_metrics(b, b > 3.0, mx.array(mask), mx.array(mask.sum()))
    assert np.isfinite(metrics["policy/is_weight_max"].item())


def test_is_metrics():
    old, sampler, mask = random_logprobs(seed=7)
    weights, cut = family.is_weights(mx.array(old), mx.array(sampler), mx.array(mask), "token-mask", 1.3)
    m = family.is_metrics(weights, cut, mx.array(mask), mx.array(mask.sum()))
    w, keep = np.array(weights), mask > 0
    assert m["policy/is_weight_mean"].item() == pytest.approx(w[keep].mean(), rel=1e-6)
    assert m["policy/is_weight_max"].item() == pytest.approx(w[keep].max(), rel=1e-6)
    assert m["policy/is_masked_frac"].item() == pytest.approx(np.array(cut)[keep].mean(), rel=1e-6)
    assert 0 < m["policy/is_masked_frac"].item() < 1


@pytest.mark.parametrize("mode", MODES)
def test_grpo_loss_weights_the_policy_term_not_the_kl(mode):
    """TRL: per_token_loss = -min(rho A, clip(rho) A) * is_ratio + beta * kl, then the per-sequence mean."""
    old, sampler, mask = random_logprobs(seed=11)
    rng = np.random.default_rng(12)
    logprobs = (old + rng.normal(0, 0.1, size=old.shape)).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, size=old.shape)).astype(np.float32)
    adv = rng.normal(size=old.shape[0]).astype(np.float32)
    beta, eps, cap = 0.05, 0.2, 1.5
    variant = family.make_variant(grpo.GRPOConfig(), old.shape[1])
    weights, _ = family.is_weights(mx.array(old), mx.array(sampler), mx.array(mask), mode, cap)
    B = old.shape[0]
    ms = lambda x: mx.array(np.where(mask > 0, x, 0.0).astype(np.float32))  # noqa: E731
    loss, _ = variant.loss(ms(logprobs), ms(old), ms(ref), mx.array(adv), mx.array(mask), beta, mx.array(float(B)),
                           mx.array(mask.sum()), weights)
    lp, o, r = (x.astype(np.float64) for x in (logprobs, old, ref))
    ratio = np.exp(lp - o)
    a = adv[:, None].astype(np.float64)
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    per_token = per_token * numpy_is_weights(old, sampler, mask, mode, cap)
    per_token = per_token + beta * (np.exp(r - lp) - (r - lp) - 1)
    expected = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ppo_loss_weights_each_token():
    old, sampler, mask = random_logprobs(seed=13)
    rng = np.random.default_rng(14)
    logprobs = (old + rng.normal(0, 0.1, size=old.shape)).astype(np.float32)
    adv = rng.normal(size=old.shape).astype(np.float32)
    weights, _ = family.is_weights(mx.array(old), mx.array(sampler), mx.array(mask), "token-tis", 2.0)
    loss, _ = ppo.policy_loss(mx.array(logprobs), mx.array(old), mx.array(adv), mx.array(mask), 0.2, None, weights)
    ratio = np.exp(logprobs.astype(np.float64) - old)
    surrogate = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    expected = (surrogate * numpy_is_weights(old, sampler, mask, "token-tis", 2.0) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_ckpt(trained_micro):
    return trained_micro[1]  # briefly pretrained on addition: its groups' rewards differ


def grpo_run(start_ckpt, out, *extra, steps=3):
    main(["grpo", "--model", str(start_ckpt), "--out", str(out), "--prompts-per-step", "2", "--group-size", "4",
          "--eval-prompts", "4", "--eval-every", "0", "--pass-k", "", "--kl-coef", "0", "--lr", "3e-3",
          "--steps", str(steps), *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ppo_run(start_ckpt, out, *extra, steps=3):
    main(["ppo", "--model", str(start_ckpt), "--out", str(out), "--rollout-batch", "8", "--minibatch-size", "4",
          "--value-warmup", "0", "--eval-prompts", "4", "--eval-every", "0", "--pass-k", "", "--kl-coef", "0",
          "--lr", "3e-3", "--lr-schedule", "constant", "--steps", str(steps), *extra])  # a 2-step run = a 4-step one's start
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


RUNS = {"grpo": grpo_run, "ppo": ppo_run}  # the chapters with --rollout-staleness


def strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/")) and k != "wall_s"} for r in rows]


def test_grpo_with_correction_logs_the_weights(tmp_path, start_ckpt):
    rows = grpo_run(start_ckpt, tmp_path / "tis", "--is-correction", "seq-tis", steps=2)
    last = rows[-1]
    # no staleness: the sampler is the trainer, so every weight is 1 up to float noise
    assert last["policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert last["policy/is_masked_frac"] == 0.0
    plain = grpo_run(start_ckpt, tmp_path / "none", steps=2)
    assert "policy/is_weight_mean" not in plain[-1]


@pytest.mark.parametrize("chapter", list(RUNS))
def test_staleness_zero_is_todays_run_and_k_samples_with_old_weights(tmp_path, start_ckpt, chapter):
    run = RUNS[chapter]
    today = strip_times(run(start_ckpt, tmp_path / "today"))
    zero = strip_times(run(start_ckpt, tmp_path / "zero", "--rollout-staleness", "0"))
    assert zero == today  # bit for bit
    stale = strip_times(run(start_ckpt, tmp_path / "k2", "--rollout-staleness", "2", "--is-correction", "token-tis"))
    assert stale[1]["reward/mean"] == today[1]["reward/mean"]  # step 1: both sample with the start's weights
    # step 2 (and 3) are sampled by the start's weights, trained from moved ones: the sampler disagrees with pi_old
    assert today[3]["policy/sampler_mismatch"] < 1e-4
    assert stale[3]["policy/sampler_mismatch"] > 10 * max(today[3]["policy/sampler_mismatch"], 1e-6)
    assert stale[3]["policy/is_weight_mean"] != pytest.approx(1.0, abs=1e-4)


def test_stale_policy_samples_with_the_weights_of_k_steps_ago(start_ckpt):
    from mlx_rl.engine.models import get_model

    model = get_model(str(start_ckpt))[0]
    stale = grpo.StalePolicy(model, 2)
    seen = []
    for i in range(4):
        stale.start_step()
        with stale.sampling():
            seen.append(float(tree_flatten(model.trainable_parameters())[0][1].sum().item()))
        first = tree_flatten(model.trainable_parameters())[0]
        model.update({**{}, **_shifted(model, float(i + 1))})  # "an update": every weight + (i + 1)
    base = seen[0]
    # step i samples with the weights step i - 2 started from: steps 0, 1, 2 the start's, step 3 after update 1
    n = tree_flatten(model.trainable_parameters())[0][1].size
    np.testing.assert_allclose(seen, [base, base, base, base + n * 1.0], rtol=1e-5)
    assert first[1].sum().item() == pytest.approx(base + n * 6.0, rel=1e-5)  # outside the block: the current weights


def _shifted(model, delta):
    from mlx.utils import tree_map

    return tree_map(lambda p: p + delta, model.trainable_parameters())


@pytest.mark.parametrize("chapter", list(RUNS))
def test_stale_run_resumes_bit_for_bit(tmp_path, start_ckpt, chapter):
    run = RUNS[chapter]
    whole = strip_times(run(start_ckpt, tmp_path / "whole", "--rollout-staleness", "2", steps=4))
    run(start_ckpt, tmp_path / "split", "--rollout-staleness", "2", steps=2)
    assert (tmp_path / "split" / "checkpoint" / grpo.StalePolicy.FILE).exists()
    main([chapter, "--resume", str(tmp_path / "split"), "--steps", "4"])
    split = strip_times([json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()])
    no_eval = lambda rows: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows]  # noqa: E731
    assert no_eval(split) == no_eval(whole)  # (the first part evaluated at its end, step 2)
    assert whole[3]["policy/sampler_mismatch"] > 1e-3  # the resumed part sampled with the saved old weights


def test_stale_policy_keeps_only_the_adapters_with_lora(start_ckpt):
    from mlx_rl.engine import lora
    from mlx_rl.engine.models import get_model

    model = get_model(str(start_ckpt))[0]
    lora.apply_lora(model, 4, -1, 20.0, None, base=str(start_ckpt))
    stale = grpo.StalePolicy(model, 1)
    stale.start_step()
    (name, saved), = stale.arrays().items()
    assert name == grpo.StalePolicy.FILE and saved and all("lora" in k for k in saved)
    assert len(saved) == len(tree_flatten(model.trainable_parameters()))


def test_ppo_stale_rollout_is_the_old_policys_and_the_critic_is_current(tmp_path, start_ckpt, monkeypatch):
    """With K = 1, step i's generate call sees the weights step i - 1 started from, and the value head
    scores with the current policy's hidden states (score_rollout runs outside the swap)."""
    seen = {"generate": [], "score": []}
    weight = lambda model: float(tree_flatten(model.trainable_parameters())[0][1].sum().item())  # noqa: E731
    real_generate, real_score = ppo.generate, ppo.score_rollout

    def spy_generate(model, *args, **kwargs):
        seen["generate"].append(weight(model))
        return real_generate(model, *args, **kwargs)

    def spy_score(policy, *args, **kwargs):
        seen["score"].append(weight(policy))
        return real_score(policy, *args, **kwargs)

    monkeypatch.setattr(ppo, "generate", spy_generate)
    monkeypatch.setattr(ppo, "score_rollout", spy_score)
    ppo_run(start_ckpt, tmp_path / "k1", "--rollout-staleness", "1")
    gen, score = seen["generate"], seen["score"]
    assert len(gen) == len(score) == 3
    # step 0 and 1 sample with the start's weights; step i (i >= 1) with those step i - 1 was scored with
    assert gen[0] == gen[1] == score[0]
    assert gen[2] == score[1] and gen[2] != score[2]
    assert score[1] != score[0]  # the policy moved, so staleness had something to show
