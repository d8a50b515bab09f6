"""GRPO's family: every variant's loss against a float64 per-token loop and its gradient against finite
differences (ragged masks, with and without the KL term); the advantages (group, Dr. GRPO, leave-one-out);
the overlong penalty; the variants' defaults; DAPO's dynamic sampling on a micro model; pass@k against the
exact formula; and a two-step CLI run of each variant (and PPO's pass@k in its summary)."""

import json
import math
import types

import mlx.core as mx
import numpy as np
import pytest

from mlx_rl.chapters import grpo
from mlx_rl.chapters import grpo_family as family
from mlx_rl.cli import main
from mlx_rl.config import MlxRlError
from mlx_rl.data.rewards import load_rewards
from mlx_rl.data.tasks import get_task
from mlx_rl.engine.distributed import World
from mlx_rl.engine.evaluate import pass_at_k, score_rows
from mlx_rl.engine.logprobs import masked
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.runs import PhaseTimer

# What each paper prescribes, written out here rather than read from VARIANTS:
# (aggregation, eps_low, eps_high, divide by std, dynamic sampling)
PAPERS = {
    "grpo": ("sequence", 0.2, 0.2, True, False),  # Shao et al. 2024
    "dr_grpo": ("constant", 0.2, 0.2, False, False),  # Liu et al. 2025
    "dapo": ("token", 0.2, 0.28, True, True),  # Yu et al. 2025
    "gspo": ("sequence", 3e-4, 4e-4, True, False),  # Zheng et al. 2025, section 5.1
    "cispo": ("token", 1.0, 0.28, True, False),  # MiniMax 2025: no lower bound on the weight
    "rloo": ("sequence", 0.2, 0.2, False, False),  # Ahmadian et al. 2024
}
LENGTHS = [7, 3, 1, 5, 2, 7, 4, 6]  # ragged rows, one of a single token
T = 7
L = 9  # Dr. GRPO's constant: the generation budget, longer than any row here


def variant_named(name, max_new_tokens=L, answer_len=0, **settings):
    cfg = grpo.GRPOConfig(variant=name, **settings)
    return family.make_variant(cfg, max_new_tokens, answer_len=answer_len)


# --- the loss, the slow way ------------------------------------------------------------------


def slow_loss(name, lp, old, ref, adv, lengths, kl_coef, weight_lp=None):
    """-J and the clip fraction in float64, one token at a time, from the papers' equations.

    weight_lp: the log-probs CISPO's stopped weight is computed from (default lp): held fixed,
    the finite differences of this function are CISPO's gradient.
    """
    agg, eps_low, eps_high = PAPERS[name][:3]
    weight_lp = lp if weight_lp is None else weight_lp
    rows, rows_kl, clipped = [], [], 0
    for i, n in enumerate(lengths):
        a = float(adv[i])
        if name == "gspo":  # one ratio for the sequence: the geometric mean of its tokens' ratios
            seq_ratio = math.exp(sum(lp[i][t] - old[i][t] for t in range(n)) / n)
        terms, kls = [], []
        for t in range(n):
            if name == "cispo":
                rho = math.exp(weight_lp[i][t] - old[i][t])
                lower = 1 - eps_low if eps_low < 1 else 0.0
                weight = min(max(rho, lower), 1 + eps_high)
                terms.append(weight * a * lp[i][t])
                clipped += rho > 1 + eps_high or rho < lower
            else:
                rho = seq_ratio if name == "gspo" else math.exp(lp[i][t] - old[i][t])
                terms.append(min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a))
                clipped += (rho > 1 + eps_high and a > 0) or (rho < 1 - eps_low and a < 0)
            x = ref[i][t] - lp[i][t]
            kls.append(math.exp(x) - x - 1)
        rows.append(terms)
        rows_kl.append(kls)

    def aggregate(per_row):
        if agg == "sequence":
            return sum(sum(r) / len(r) for r in per_row) / len(per_row)
        if agg == "token":
            return sum(sum(r) for r in per_row) / sum(lengths)
        return sum(sum(r) for r in per_row) / (len(per_row) * L)

    return -aggregate(rows) + kl_coef * aggregate(rows_kl), clipped / sum(lengths)


def random_batch(name, seed=0):
    """float32 inputs as the chapter passes them: logprobs and old_logprobs masked, ref_logprobs not."""
    rng = np.random.default_rng(seed)
    B = len(LENGTHS)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
    spread = 2e-3 if name == "gspo" else 0.3  # GSPO's clip range is 1e3 times narrower
    logprobs = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    old = (logprobs + rng.normal(0, spread, (B, T))).astype(np.float32)
    ref = (logprobs + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    advantages = rng.normal(0, 1, B).astype(np.float32)
    return logprobs * mask, old * mask, ref, advantages, mask


def mlx_loss(variant, logprobs, old, ref, advantages, mask, kl_coef):
    mask = mx.array(mask)
    return variant.loss(masked(mx.array(logprobs), mask), mx.array(old), mx.array(ref), mx.array(advantages), mask,
                        kl_coef, n_rows=mx.array(float(mask.shape[0])), n_tokens=mask.sum())


@pytest.mark.parametrize("name", list(PAPERS))
def test_defaults_are_the_papers(name):
    v = variant_named(name)
    agg, eps_low, eps_high, scale_std, dynamic = PAPERS[name]
    assert (v.loss_agg, v.eps_low, v.eps_high, v.scale_std, v.dynamic_sampling) == (agg, eps_low, eps_high, scale_std,
                                                                                    dynamic)
    assert v.advantage_fn is (family.rloo_advantages if name == "rloo" else family.group_advantages)
    assert v.ratio_fn is (family.sequence_ratio if name == "gspo" else family.token_ratio)
    assert v.objective_fn is (family.cispo_objective if name == "cispo" else family.clipped_objective)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("name", list(PAPERS))
def test_loss_matches_slow_reference(name, kl_coef):
    logprobs, old, ref, advantages, mask = random_batch(name)
    variant = variant_named(name)
    loss, metrics = mlx_loss(variant, logprobs, old, ref, advantages, mask, kl_coef)
    args = [np.float64(x).tolist() for x in (logprobs, old, ref)]
    want, want_clipfrac = slow_loss(name, *args, advantages, LENGTHS, kl_coef)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert 0 < want_clipfrac < 1  # both sides of the clip are exercised
    assert metrics["policy/clipfrac"].item() == pytest.approx(want_clipfrac, abs=1e-6)
    assert ("kl/k3" in metrics) == (kl_coef > 0)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("name", list(PAPERS))
def test_gradient_matches_finite_differences(name, kl_coef):
    logprobs, old, ref, advantages, mask = random_batch(name, seed=1)
    variant = variant_named(name)
    grad = mx.grad(lambda x: mlx_loss(variant, x, old, ref, advantages, mask, kl_coef)[0])(mx.array(logprobs))
    grad = np.array(grad)
    base = np.float64(logprobs)
    args = [np.float64(x).tolist() for x in (old, ref)]
    fd = np.zeros_like(base)
    h = 1e-6
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            up, down = base.copy(), base.copy()
            up[i, t] += h
            down[i, t] -= h
            frozen = base.tolist()  # CISPO: the weight is a constant (stop-gradient), the rest moves
            f = lambda x: slow_loss(name, x.tolist(), *args, advantages, LENGTHS, kl_coef, weight_lp=frozen)[0]  # noqa: E731
            fd[i, t] = (f(up) - f(down)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)
    assert np.all(grad[mask == 0] == 0)  # padding gets no gradient
    assert np.abs(fd).max() > 1e-3


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    """PPO's clip zeroes a token's gradient past the edge; CISPO's stopped weight keeps it (scaled)."""
    lp = mx.array([[-1.0, -1.0]])
    old = mx.array([[-2.0, -1.0]])  # first token: ratio e = 2.72, far past 1.28
    mask, adv = mx.ones((1, 2)), mx.array([1.0])
    for name, zero_first in (("dapo", True), ("cispo", False)):
        v = variant_named(name)
        g = mx.grad(lambda x: v.loss(x, old, old, adv, mask, 0.0, mx.array(1.0), mask.sum())[0])(lp)
        assert (g[0, 0].item() == 0.0) == zero_first and g[0, 1].item() != 0.0
    g = mx.grad(lambda x: variant_named("cispo").loss(x, old, old, adv, mask, 0.0, mx.array(1.0), mask.sum())[0])(lp)
    assert g[0, 0].item() == pytest.approx(-1.28 / 2) and g[0, 1].item() == pytest.approx(-1.0 / 2)


# --- advantages, the overlong penalty, the options -------------------------------------------------


def test_group_advantages_zero_signal_exactly_zero():
    rewards = np.array([[1.1, 0.1, 0.2, 0.1, 0.0, 0.4], [0.3] * 6, [0.7] * 6, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    same = np.float32(rewards[1])
    assert np.all(same - same.mean() != 0)  # 0.3 - mean(0.3 x 6) in float32: why it is masked, not trusted to cancel
    for scale_std in (True, False):
        advantages, zero_signal = family.group_advantages(rewards, scale_std)
        assert zero_signal.tolist() == [False, True, True, False]
        assert np.all(advantages[1:3] == 0.0)
        for g in (0, 3):
            r = rewards[g]
            want = (r - r.mean()) / (r.std() + 1e-4) if scale_std else r - r.mean()
            np.testing.assert_allclose(advantages[g], want, rtol=1e-5, atol=1e-6)
            assert np.all(advantages[g] != 0)


def test_rloo_advantages_are_leave_one_out():
    rng = np.random.default_rng(0)
    rewards = rng.random((5, 6)).round(1)
    rewards[2] = 0.4  # one zero-signal group
    advantages, zero_signal = family.rloo_advantages(rewards)
    for p in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            others = [rewards[p, j] for j in range(rewards.shape[1]) if j != i]
            want = 0.0 if p == 2 else rewards[p, i] - sum(others) / len(others)
            assert advantages[p, i] == pytest.approx(want, abs=1e-6)
    assert zero_signal.tolist() == [False, False, True, False, False] and np.all(advantages[2] == 0.0)
    G = rewards.shape[1]
    grpo_unscaled, _ = family.group_advantages(rewards, scale_std=False)
    np.testing.assert_allclose(advantages, G / (G - 1) * grpo_unscaled, rtol=1e-5, atol=1e-7)
    scaled = variant_named("rloo", scale_std=True).advantages(rewards)[0]  # --scale-std is honoured in RLOO too
    np.testing.assert_allclose(scaled[0], advantages[0] / (rewards[0].std() + 1e-4), rtol=1e-5)


def test_overlong_penalty_values():
    lengths = [1, 5, 6, 7, 8, 9]
    np.testing.assert_allclose(family.overlong_penalty(lengths, 8, 4), [0, -0.25, -0.5, -0.75, -1.0, -1.0])
    np.testing.assert_allclose(family.overlong_penalty(lengths, 8, 1), [0, 0, 0, 0, -1.0, -1.0])
    assert np.all(family.overlong_penalty(lengths, 8, 0) == 0)


def test_dapo_overlong_buffer_never_punishes_a_right_answer():
    task = get_task("addition")  # answers: three digits and EOS, exactly task.max_new_tokens
    n = task.max_new_tokens
    tight = variant_named("dapo", max_new_tokens=n, answer_len=n)
    assert tight.overlong_buffer == 0 and np.all(tight.overlong_penalty([n, n - 1], n) == 0)
    roomy = variant_named("dapo", max_new_tokens=16, answer_len=n)  # --max-new-tokens 16: room beyond the answer
    assert roomy.overlong_buffer == 4 and roomy.overlong_penalty([n], 16)[0] == 0.0
    assert roomy.overlong_penalty([14, 16], 16).tolist() == [-0.5, -1.0]
    assert variant_named("dapo", max_new_tokens=64).overlong_buffer == 16  # your own data: a quarter
    assert variant_named("dapo", max_new_tokens=64, overlong_buffer=3).overlong_buffer == 3  # an explicit value wins
    assert variant_named("grpo", max_new_tokens=64).overlong_buffer == 0


def test_clip_options_follow_their_help():
    assert (variant_named("grpo", clip_eps=0.1).eps_low, variant_named("grpo", clip_eps=0.1).eps_high) == (0.1, 0.1)
    assert (variant_named("rloo", clip_eps=0.1).eps_high, variant_named("dr_grpo", clip_eps=0.1).eps_high) == (0.1, 0.1)
    dapo = variant_named("dapo", clip_eps=0.1)
    assert (dapo.eps_low, dapo.eps_high) == (0.1, 0.28)  # the low side only; clip-higher stays
    both = variant_named("grpo", clip_eps=0.1, clip_eps_high=0.3)
    assert (both.eps_low, both.eps_high) == (0.1, 0.3)
    cispo = variant_named("cispo", clip_eps_high=2.0)
    assert (cispo.eps_low, cispo.eps_high) == (1.0, 2.0)
    mixed = variant_named("grpo", loss_agg="token", scale_std=False, dynamic_sampling=True)
    assert (mixed.loss_agg, mixed.scale_std, mixed.dynamic_sampling) == ("token", False, True)


# --- DAPO's dynamic sampling on a micro model --------------------------------------------------------


G, P = 4, 4


def odd_first_operand(prompt):
    return int(prompt.split("+")[0]) % 2 == 1


def signal_if(keep):
    """A reward with signal (0, 0.1, 0.2, ... within each group) for the prompts keep() accepts, 0 for the rest."""

    def reward(prompts, completions, **columns):
        return [0.1 * (i % G) if keep(p) else 0.0 for i, p in enumerate(prompts)]

    return reward


@pytest.fixture(scope="module")
def micro():
    return new_tiny_model("micro", seed=0)


def harness(micro, reward, variant="dapo", seed=0):
    """What grpo_step and refill read from a Session, without a run directory."""
    model, tokenizer, _ = micro
    task = get_task("addition")
    task.rewards = load_rewards([reward])
    cfg = grpo.GRPOConfig(variant=variant, group_size=G, prompts_per_step=P, kl_coef=0.0, epochs=1, seed=seed)
    session = types.SimpleNamespace(model=model, tokenizer=tokenizer, task=task, rng=np.random.default_rng(seed),
                                    timer=PhaseTimer(), world=World(), step=0, cfg=cfg)
    return session, cfg, family.make_variant(cfg, task.max_new_tokens, answer_len=task.max_new_tokens)


def mixed_rows(task):
    """Two prompts with signal and two without, interleaved."""
    rows = task.train_rows(np.random.default_rng(3), 40)
    odd = [r for r in rows if odd_first_operand(r["prompt"])][:2]
    even = [r for r in rows if not odd_first_operand(r["prompt"])][:2]
    return [odd[0], even[0], odd[1], even[1]]


def check_batch(session, rollout, group_rows, scores):
    """P groups of G rows, each group one prompt, every group with signal, arrays consistent with the rows."""
    assert len(group_rows) == P * G and rollout.completion_ids.shape[0] == P * G and len(rollout.texts) == P * G
    for g in range(P):
        assert len({r["prompt"] for r in group_rows[g * G:(g + 1) * G]}) == 1
    assert rollout.prompts == group_rows  # the rollout's rows are the rows scored
    rewards = scores.total.reshape(P, G)
    assert np.all(rewards.max(axis=1) > rewards.min(axis=1))  # no zero-signal group
    np.testing.assert_array_equal(score_rows(session.task, group_rows, rollout.texts).total, scores.total)
    ids, mask = np.array(rollout.completion_ids), np.array(rollout.mask)
    for b in range(P * G):
        n = int(mask[b].sum())
        assert np.all(mask[b, :n] == 1) and np.all(mask[b, n:] == 0)
        assert np.all(np.array(rollout.logprobs)[b, n:] == 0) and np.all(np.array(rollout.logprobs)[b, :n] <= 0)
        stop = rollout.finish_reasons[b] == "stop"
        assert session.tokenizer.decode(ids[b, : n - 1 if stop else n].tolist()) == rollout.texts[b]


def test_refill_replaces_zero_signal_groups(micro):
    session, cfg, variant = harness(micro, signal_if(odd_first_operand))
    rows = mixed_rows(session.task)
    mx.random.seed(0)
    rollout, group_rows, scores = grpo.rollout_batch(session, rows, cfg, session.task.max_new_tokens)
    assert family.signal_groups(scores, G, rollout, variant, session.task.max_new_tokens) == [0, 2]
    out = family.refill(session, cfg, variant, rollout, group_rows, scores, session.task.max_new_tokens)
    rollout2, group_rows2, scores2, stats = out
    check_batch(session, rollout2, group_rows2, scores2)
    assert stats["dapo/filtered_frac"] == 0.5 and stats["dapo/refill_rounds"] >= 1 and stats["dapo/repeated_groups"] == 0
    assert [r["prompt"] for r in group_rows2[:2 * G:G]] == [rows[0]["prompt"], rows[2]["prompt"]]  # the first ones kept
    first = np.array(rollout.completion_ids)
    np.testing.assert_array_equal(np.array(rollout2.completion_ids)[:G, : first.shape[1]], first[:G])
    assert all(odd_first_operand(r["prompt"]) for r in group_rows2)
    assert session.rng.bit_generator.state == np.random.default_rng(0).bit_generator.state  # main stream untouched


def test_refill_repeats_signal_groups_when_fresh_ones_have_none(micro):
    task = get_task("addition")
    rows = mixed_rows(task)
    chosen = {rows[0]["prompt"], rows[2]["prompt"]}  # only these two prompts ever carry signal
    session, cfg, variant = harness(micro, signal_if(lambda p: p in chosen))
    rollout, group_rows, scores = grpo.rollout_batch(session, rows, cfg, task.max_new_tokens)
    rollout2, group_rows2, scores2, stats = family.refill(session, cfg, variant, rollout, group_rows, scores,
                                                          task.max_new_tokens, max_rounds=2)
    check_batch(session, rollout2, group_rows2, scores2)
    assert (stats["dapo/refill_rounds"], stats["dapo/repeated_groups"]) == (2, 2)


def test_refill_leaves_a_batch_without_signal_to_be_skipped(micro):
    session, cfg, variant = harness(micro, signal_if(lambda p: False))
    rows = mixed_rows(session.task)
    rollout, group_rows, scores = grpo.rollout_batch(session, rows, cfg, session.task.max_new_tokens)
    _, group_rows2, scores2, stats = family.refill(session, cfg, variant, rollout, group_rows, scores,
                                                   session.task.max_new_tokens, max_rounds=1)
    assert len(group_rows2) == P * G and np.all(scores2.total == 0) and stats["dapo/refill_rounds"] == 1
    assert family.refill(session, cfg, variant_named("grpo"), rollout, group_rows, scores, 4)[3] == {}  # off: untouched


def test_overlong_penalty_counts_as_signal():
    v = variant_named("dapo", max_new_tokens=8, answer_len=4)  # buffer 2: 7 tokens -0.5, 8 tokens -1
    scores = types.SimpleNamespace(total=np.full(8, 0.5, dtype=np.float32))
    rollout = types.SimpleNamespace(lengths=np.array([4, 4, 4, 4, 4, 8, 4, 4]))
    assert family.signal_groups(scores, 4, rollout, v, 8) == [1]


def test_dapo_step_trains_only_on_groups_with_signal(micro):
    session, cfg, variant = harness(micro, signal_if(odd_first_operand), seed=1)
    base = micro[0]
    model = type(base)(base.args)
    model.update(base.parameters())
    session.model = model
    inner = make_update(model, make_optimizer(1e-3, 10), grpo.make_loss_fn(cfg, variant), compile=False)
    seen = []

    def update(tokens, mask, advantages, *rest):
        seen.append((tokens.shape, np.array(advantages)))
        return inner(tokens, mask, advantages, *rest)

    mx.random.seed(0)
    row, _ = grpo.grpo_step(session, cfg, variant, update, session.task.max_new_tokens)
    assert row["dapo/filtered_frac"] > 0  # the draw had zero-signal groups to replace
    assert row["grpo/zero_signal_frac"] == 0.0 and row["grpo/skipped"] == 0.0
    (shape, advantages), = seen
    assert shape[0] == P * G
    assert np.all(np.abs(advantages.reshape(P, G)).max(axis=1) > 0)


# --- pass@k -------------------------------------------------------------------------------------------


def test_pass_at_k_is_the_exact_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    assert pass_at_k(64, 0, 1) == 0.0 and pass_at_k(64, 0, 64) == 0.0  # never right: 0 at every k
    assert pass_at_k(64, 1, 64) == 1.0 and pass_at_k(8, 5, 4) == 1.0  # n - c < k: every draw of k holds a right one
    assert pass_at_k(64, 1, 1) == pytest.approx(1 / 64) and pass_at_k(64, 64, 1) == 1.0
    assert family.parse_ks(["1,8", "64", "8"]) == [1, 8, 64] and family.parse_ks([""]) == []
    for bad in (["0"], ["x"]):
        with pytest.raises(MlxRlError):
            family.parse_ks(bad)


# --- the commands --------------------------------------------------------------------------------------


@pytest.fixture
def no_plots(monkeypatch):
    """Drawing the PNGs takes most of a two-step run here; test_grpo.py checks that they are drawn."""
    monkeypatch.setattr("mlx_rl.plots.plot_run", lambda run_path: [])


def finite_rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (r["step"], k, v)
    return rows


@pytest.mark.parametrize("name", list(PAPERS))
def test_cli_two_steps_of_each_variant(tmp_path, trained_micro, no_plots, name):
    _, ckpt = trained_micro
    out = tmp_path / name
    main(["grpo", "--model", str(ckpt), "--variant", name, "--steps", "2", "--prompts-per-step", "4", "--group-size", "4",
          "--eval-every", "0", "--eval-prompts", "16", "--pass-k", "", "--out", str(out)])
    rows = finite_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    trained = [r for r in rows[1:] if not r["grpo/skipped"]]
    assert trained, "both steps were skipped (no signal): nothing was checked"
    for r in trained:
        assert {"loss/total", "loss/policy", "policy/entropy", "policy/clipfrac", "policy/completion_len"} <= set(r)
    assert ("dapo/refill_rounds" in rows[1]) == (name == "dapo")
    assert json.loads((out / "config.json").read_text())["variant"] == name


def test_ppo_and_eval_report_pass_at_k(tmp_path, trained_micro, no_plots, capsys):
    _, ckpt = trained_micro
    out = tmp_path / "ppo"
    main(["ppo", "--model", str(ckpt), "--steps", "1", "--rollout-batch", "8", "--minibatch-size", "4", "--value-warmup",
          "0", "--eval-every", "0", "--eval-prompts", "8", "--pass-k", "1,4", "--pass-k-prompts", "6", "--out", str(out)])
    finite_rows(out)
    details = json.loads((out / "summary.json").read_text())["details"]["pass_at_k"]
    assert details["prompts"] == 6
    for when in ("start", "end"):
        assert set(details[when]) == {"pass@1", "pass@4"} and 0 <= details[when]["pass@1"] <= details[when]["pass@4"] <= 1
    capsys.readouterr()
    main(["eval", "--model", str(ckpt), "--eval-prompts", "6", "--show-samples", "0", "--pass-k", "1,2,4", "--json"])
    figures = json.loads(capsys.readouterr().out)
    assert 0 <= figures["pass@1"] <= figures["pass@2"] <= figures["pass@4"] <= 1


# --- the benchmarks runner's family figures, on two made-up runs -----------------------------------------


def test_benchmark_family_figures_table_and_overlay(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import run as runner

    dirs = []
    for name, accuracies in (("grpo", [0.3, 0.6, 0.95, 1.0]), ("dapo", [0.3, 0.4, 0.5, 0.6])):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": 10 * i, "wall_s": 5.0 + 10 * i, "eval/accuracy": a, "policy/entropy": 1 - 0.1 * i,
                 "policy/completion_len": 4.0, "policy/clipfrac": 0.01 * i, "kl/k3": 0.1 * i}
                for i, a in enumerate(accuracies)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(d)
    grpo_figures, dapo_figures = (runner.family_figures(d) for d in dirs)
    assert grpo_figures == pytest.approx({  # seconds from the first evaluation; entropy over the rows up to step 10
        "final_accuracy": 1.0, "time_to_90_s": 20.0, "train_s": 30.0, "accuracy_step_10": 0.6, "accuracy_step_20": 0.95,
        "first_step_at_90": 20, "entropy_first_10": 0.95, "clipfrac_mean": 0.015, "k3_kl_end": 0.3})
    assert dapo_figures["time_to_90_s"] is None and dapo_figures["first_step_at_90"] is None
    rows = [{"variant": "grpo", "status": "ok", "wall_s": 41.0, **grpo_figures},
            {"variant": "dapo", "status": "ok", "wall_s": 40.0, **dapo_figures}]
    lines = runner.family_table(rows, "addition", 0.3)
    assert lines[-2] == "| grpo | ok | 60.0% | 95.0% | 100.0% | 20 | 20 s | 0.950 | 1.50% | 0.30 | 30 s | 41 s |"
    assert lines[-1].startswith("| dapo | ok | 40.0% | 50.0% | 60.0% | - | - |")
    assert runner.plot_family(dirs, ["grpo", "dapo"], tmp_path / "overlay.png", "t").stat().st_size > 0
    table = runner.pass_at_k_table({"pretrain": {"eval/accuracy": 0.3, "pass@1": 0.25, "pass@8": 0.7, "pass@64": 0.99},
                                    "grpo": None})
    assert "| pretrain | 30.0% | 25.0% | 70.0% | 99.0% |" in table and "| grpo | - | - | - | - |" in table
