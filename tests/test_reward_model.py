"""Reward models and RLHF: the Bradley-Terry loss against numpy, what a reward-model step trains, pair files in
TRL's formats, the simulated labeller's noise and bias, and GRPO / PPO on a learned reward (two steps each)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.chapters import reward_model as rmc
from mlx_rl.data.pairs import load_pairs, tokenize_pairs
from mlx_rl.data.tasks import get_task
from mlx_rl.engine.models import load_model
from mlx_rl.engine.update import make_optimizer, make_update

# --- the maths -------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_numpy():
    rng = np.random.default_rng(0)
    r_chosen, r_rejected = (rng.normal(size=64).astype(np.float32) * 3 for _ in range(2))
    loss, metrics = rmc.bradley_terry_loss(mx.array(r_chosen), mx.array(r_rejected))
    margin = r_chosen.astype(np.float64) - r_rejected
    expected = np.mean([-np.log(1 / (1 + np.exp(-m))) for m in margin])  # -log sigmoid, one pair at a time
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["rm/accuracy"].item() == pytest.approx(np.mean(margin > 0))
    assert metrics["rm/margin"].item() == pytest.approx(margin.mean(), rel=1e-5, abs=1e-6)


def test_bradley_terry_is_log2_at_equal_rewards_and_stable_far_away():
    zeros = mx.zeros(4)
    loss, metrics = rmc.bradley_terry_loss(zeros, zeros)
    assert loss.item() == pytest.approx(np.log(2))
    assert metrics["rm/accuracy"].item() == 0.5  # a tie counts half
    far, _ = rmc.bradley_terry_loss(mx.array([-100.0]), mx.array([100.0]))  # log sigmoid(-200), no overflow
    assert far.item() == pytest.approx(200.0)
    grad = mx.grad(lambda rc: rmc.bradley_terry_loss(rc, mx.array([0.0]))[0])(mx.array([0.0]))
    assert grad.item() == pytest.approx(-0.5)  # d/dm -log sigmoid(m) at 0


def test_calibration_matches_a_loop():
    rng = np.random.default_rng(1)
    margins = rng.normal(size=500) * 2
    rows, error = rmc.calibration(margins, bins=4)
    bins = {}
    for m in margins:
        p = 1 / (1 + np.exp(-abs(m)))  # confidence in its own ranking
        bins.setdefault(min(int((p - 0.5) / 0.125), 3), []).append((p, float(m > 0)))
    assert [r[4] for r in rows] == [len(bins[b]) for b in sorted(bins)]
    expected_error = 0.0
    for (lo, hi, p, observed, count), b in zip(rows, sorted(bins)):
        assert lo == pytest.approx(0.5 + 0.125 * b) and hi == pytest.approx(lo + 0.125)
        assert p == pytest.approx(np.mean([x for x, _ in bins[b]]))
        assert observed == pytest.approx(np.mean([y for _, y in bins[b]]))
        expected_error += count / len(margins) * abs(p - observed)
    assert error == pytest.approx(expected_error)


# --- the model and what a step trains --------------------------------------------------------


def reward_model_of(checkpoint, lora_rank=0, train_body=True):
    from mlx_rl.engine import lora

    lm, tokenizer, _ = load_model(str(checkpoint))
    if lora_rank:
        lora.apply_lora(lm, lora_rank)
    if not train_body:
        lm.freeze()
    rm = rmc.RewardModel(lm, rmc.RewardHead(lm.args.hidden_size))
    mx.eval(rm.parameters())
    return rm, tokenizer


def a_batch(tokenizer, n=8):
    task = get_task("addition")
    records = rmc.label_pairs(task, rmc.draw_problems(task, np.random.default_rng(0), n, False), rmc.Labeller(0, 0),
                              np.random.default_rng(1), pairs_per_prompt=1)
    pairs = tokenize_pairs(records, tokenizer)
    return rmc.sequence_batch(pairs.prompt_ids * 2, pairs.chosen_ids + pairs.rejected_ids), len(pairs)


@pytest.mark.parametrize("mode", ["full", "head", "lora"])
def test_two_steps_train_what_the_design_says(micro_checkpoint, mode):
    """Full fine-tune (the default): body and head change. --no-train-body: only the head.
    --lora-rank: only the head and the adapters, every base weight untouched."""
    rm, tokenizer = reward_model_of(micro_checkpoint, lora_rank=4 if mode == "lora" else 0, train_body=mode != "head")
    before = {k: np.array(v) for k, v in tree_flatten(rm.parameters())}
    (tokens, last), n = a_batch(tokenizer)
    update = make_update(rm, make_optimizer(1e-3, 10), rmc.make_loss_fn(), compile=False)
    for _ in range(2):  # the head starts at 0, so the body's gradient is 0 at the first step: two steps
        update(tokens, last, mx.array(float(n)))
    after = dict(tree_flatten(rm.parameters()))
    changed = {k for k in before if not np.array_equal(before[k], np.array(after[k]))}
    assert {"head.linear.weight", "head.linear.bias"} <= changed
    body = changed - {"head.linear.weight", "head.linear.bias"}
    if mode == "full":
        assert body and any("embed_tokens" in k for k in body) and any("mlp" in k for k in body)
    elif mode == "head":
        assert not body
    else:
        assert body and all(k.endswith(("lora_a", "lora_b")) for k in body)


def test_a_row_scores_the_same_alone_or_padded_in_a_batch(micro_checkpoint):
    rm, tokenizer = reward_model_of(micro_checkpoint)
    rm.head.linear.weight = mx.random.normal(rm.head.linear.weight.shape, key=mx.random.key(0))
    prompts = [tokenizer.encode("07+45="), tokenizer.encode("99+99=")]
    answers = [tokenizer.encode("2500123", add_special_tokens=False) + [tokenizer.eos_token_id],
               tokenizer.encode("891", add_special_tokens=False) + [tokenizer.eos_token_id]]
    together = rmc.score_sequences(rm, prompts, answers)
    alone = [rmc.score_sequences(rm, [p], [a])[0] for p, a in zip(prompts, answers)]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_learned_reward_tokenises_as_training_did(micro_checkpoint):
    """The RL chapters' reward scores prompt ids + completion ids + EOS, exactly the training pairs' layout."""
    rm, tokenizer = reward_model_of(micro_checkpoint)
    rm.head.linear.weight = mx.random.normal(rm.head.linear.weight.shape, key=mx.random.key(1))
    records = [{"prompt": "07+45=", "chosen": "250", "rejected": "2501", "where": "x"},
               {"prompt": "13+13=", "chosen": "620", "rejected": "61", "where": "y"}]
    pairs = tokenize_pairs(records, tokenizer)
    assert pairs.prompt_ids[0] == tokenizer.encode("07+45=") and pairs.chosen_ids[0][-1] == tokenizer.eos_token_id
    r_chosen, r_rejected = rmc.pair_rewards(rm, pairs)
    learned = rmc.LearnedReward(rm, tokenizer, mean=0.5, std=2.0)
    got = learned(prompts=[r["prompt"] for r in records] * 2, completions=[r["chosen"] for r in records]
                  + [r["rejected"] for r in records])
    np.testing.assert_allclose(got, (np.concatenate([r_chosen, r_rejected]) - 0.5) / 2.0, rtol=1e-5, atol=1e-6)


# --- the simulated labeller -------------------------------------------------------------------


@pytest.mark.parametrize("noise,bias", [(0.2, 0.6), (0.05, 0.0), (0.0, 0.3)])
def test_labeller_noise_and_bias_match_its_settings(noise, bias):
    task = get_task("addition")
    problems = rmc.draw_problems(task, np.random.default_rng(0), 4000, held_out=False)
    records = rmc.label_pairs(task, problems, rmc.Labeller(noise, bias), np.random.default_rng(1), pairs_per_prompt=2)
    # measured here from the verifier's own scores, independently of the labeller's bookkeeping
    answers = {task.prompt(p): task.answer(p) for p in problems}
    same, longer_when_shorter_better = [], []
    for r in records:
        right = answers[r["prompt"]]
        s_chosen, s_rejected = (float(a == right) for a in (r["chosen"], r["rejected"]))  # the verifier: exact
        assert s_chosen != s_rejected  # every pair is the right answer and a wrong one: ties are left out
        assert r["verifier_agrees"] == (s_chosen > s_rejected)
        if len(r["chosen"]) == len(r["rejected"]):
            same.append(s_chosen < s_rejected)
        else:
            chose_longer = len(r["chosen"]) > len(r["rejected"])
            shorter_better = (s_chosen > s_rejected) != chose_longer
            if shorter_better:
                longer_when_shorter_better.append(chose_longer)
    assert len(same) > 1500 and len(longer_when_shorter_better) > 1500
    measured_noise = np.mean(same)
    measured_bias = (np.mean(longer_when_shorter_better) - measured_noise) / (1 - measured_noise)
    assert measured_noise == pytest.approx(noise, abs=0.025)
    assert measured_bias == pytest.approx(bias, abs=0.04)
    stats = rmc.labeller_stats(records)
    assert stats["label_noise"] == pytest.approx(measured_noise) and stats["length_bias"] == pytest.approx(measured_bias)


def test_labeller_candidates_are_the_ones_that_matter():
    task = get_task("addition")
    rng = np.random.default_rng(0)
    carry = (79, 3)  # 79 + 3 = 82 -> "280"; the corpus forgets the carry: "270"
    cands = rmc.candidate_answers(task, carry, rng, max_extra=2)
    assert cands[0] == "280" and cands[1] == "270"
    assert any(c.startswith("280") and 4 <= len(c) <= 5 for c in cands)  # right, made longer
    assert any(len(c) == 3 and c not in ("280", "270") for c in cands)  # a near-miss


# --- pair files in TRL's formats ---------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pairs_in_trl_formats_load_and_train(tmp_path, micro_checkpoint):
    from mlx_rl.cli import main

    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = [
        {"prompt": "07+45=", "chosen": "250", "rejected": "240"},  # explicit prompt
        {"chosen": "13+13=620", "rejected": "13+13=610"},  # implicit prompt (TRL's extract_prompt)
        {"prompt": [{"role": "user", "content": "22+22="}], "chosen": [{"role": "assistant", "content": "440"}],
         "rejected": [{"role": "assistant", "content": "4401"}]},  # conversational
        {"chosen": [{"role": "user", "content": "31+31="}, {"role": "assistant", "content": "260"}],
         "rejected": [{"role": "user", "content": "31+31="}, {"role": "assistant", "content": "26"}]},  # implicit, chat
    ]
    write_jsonl(folder / "train.jsonl", rows * 3)
    write_jsonl(folder / "valid.jsonl", rows)
    data = load_pairs(folder)
    assert [r["chosen"] for r in data.valid] == ["250", "620", "440", "260"]
    assert data.valid[1]["prompt"] == "13+13=" and data.valid[2]["prompt"] == [{"role": "user", "content": "22+22="}]
    out = tmp_path / "rm"
    main(["reward-model", "--model", str(micro_checkpoint), "--pairs", str(folder), "--steps", "2", "--batch-size", "4",
          "--eval-every", "1", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["details"]["pairs"] == {"train": 12, "valid": 4}
    assert "eval/pair_accuracy" in summary["after"] and "eval/calibration_error" in summary["after"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perf/tokens_per_s"] > 0 for r in rows if r["step"] > 0)


# --- the CLI: a reward model from the labeller, then GRPO and PPO on it --------------------------


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, micro_checkpoint):
    from mlx_rl.cli import main

    out = tmp_path_factory.mktemp("rm") / "run"
    main(["reward-model", "--model", str(micro_checkpoint), "--steps", "2", "--batch-size", "8", "--pair-prompts", "40",
          "--eval-prompts", "20", "--eval-every", "1", "--out", str(out)])
    return out


def test_reward_model_cli_saves_an_mlx_lm_checkpoint_and_the_head(rm_run):
    ckpt = rm_run / "checkpoint"
    lm, tokenizer, _ = load_model(str(ckpt))  # a plain mlx-lm checkpoint
    assert not any("head" in k for k in mx.load(str(ckpt / "model.safetensors")))
    head = mx.load(str(ckpt / rmc.HEAD_FILE))
    assert head["linear.weight"].shape == (1, lm.args.hidden_size) and float(head["score_std"].item()) > 0
    rm, _, mean, std = rmc.load_reward_model(rm_run)  # the run directory or its checkpoint
    assert std == pytest.approx(float(head["score_std"].item()))
    # the labeller's pairs, in TRL's explicit-prompt format, readable as --pairs
    data = load_pairs(rm_run / "pairs")
    assert len(data.train) > 0 and len(data.valid) > 0 and set(json.loads(
        (rm_run / "pairs" / "train.jsonl").read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}
    summary = json.loads((rm_run / "summary.json").read_text())
    assert {"eval/loss", "eval/pair_accuracy", "eval/margin", "eval/calibration_error", "eval/prefers_longer",
            "eval/verifier_agreement"} <= set(summary["after"])
    assert summary["before"]["eval/pair_accuracy"] == 0.5 and summary["before"]["eval/loss"] == pytest.approx(np.log(2))
    assert (rm_run / "plots" / "calibration.png").exists()
    rows = [json.loads(line) for line in (rm_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss/bradley_terry"] == pytest.approx(np.log(2), abs=1e-5)  # the head starts at 0


@pytest.mark.parametrize("chapter", ["grpo", "ppo"])
def test_rl_on_the_learned_reward_runs_two_steps(tmp_path, micro_checkpoint, rm_run, chapter):
    from mlx_rl.cli import main

    out = tmp_path / chapter
    sizes = (["--prompts-per-step", "4", "--group-size", "4"] if chapter == "grpo" else
             ["--rollout-batch", "16", "--minibatch-size", "8", "--value-epochs", "1", "--value-warmup", "0"])
    main([chapter, "--model", str(micro_checkpoint), "--reward-model", str(rm_run), "--max-new-tokens", "6",
          "--steps", "2", "--eval-every", "1", "--eval-prompts", "16", *sizes, "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 3 and all("eval/reward_rm" in r for r in evals)  # the verifier and the learned reward
    train = [r for r in rows if "reward/rm" in r]
    assert len(train) == 2 and all("reward/exact" in r for r in train)
    assert train[0]["reward/mean"] == pytest.approx(train[0]["reward/rm"], abs=1e-5)  # the learned reward alone
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any("reward_rm" in s for s in samples)


def test_verifier_weight_adds_the_task_reward(micro_checkpoint, rm_run):
    import types

    from mlx_rl.engine.evaluate import score_rows

    task = get_task("addition")
    session = types.SimpleNamespace(task=task, world=types.SimpleNamespace(rank=1))
    cfg = types.SimpleNamespace(reward_model=str(rm_run), reward_model_weight=2.0, verifier_weight=0.5,
                                chat_template=False)
    learned = rmc.attach_reward_model(session, cfg, max_new_tokens=6)
    rows = task.heldout_rows(4, seed=0)
    texts = [r["answer"] for r in rows[:2]] + [r["answer"] + "1" for r in rows[2:]]
    train, held = score_rows(task, rows, texts, training=True), score_rows(task, rows, texts)
    rm_scores = np.array(learned([r["prompt"] for r in rows], texts))
    verifier = task.rewards.score([r["prompt"] for r in rows], texts, {"answer": [r["answer"] for r in rows]}).total
    np.testing.assert_allclose(train.total, 2.0 * rm_scores + 0.5 * verifier, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(held.total, verifier, rtol=1e-6)  # evaluation: the verifier, the rm at weight 0
    np.testing.assert_allclose(held.per_reward["rm"], rm_scores, rtol=1e-5, atol=1e-6)
    assert held.names[0] == "exact" and task.max_new_tokens == 6


def test_label_pairs_cli_writes_what_reward_model_makes(tmp_path, rm_run):
    from mlx_rl.cli import main

    main(["label-pairs", "--out", str(tmp_path / "pairs"), "--pair-prompts", "40", "--eval-prompts", "20"])
    for split in ("train", "valid"):  # the same seed and settings: the very pairs the reward-model run made
        assert (tmp_path / "pairs" / f"{split}.jsonl").read_text() == (rm_run / "pairs" / f"{split}.jsonl").read_text()


def test_reward_model_resumes_with_its_head(tmp_path, micro_checkpoint):
    from mlx_rl.cli import main

    out = tmp_path / "run"
    common = ["--batch-size", "8", "--pair-prompts", "40", "--eval-prompts", "20", "--eval-every", "0"]
    main(["reward-model", "--model", str(micro_checkpoint), "--steps", "2", *common, "--out", str(out)])
    head_before = mx.load(str(out / "checkpoint" / rmc.HEAD_FILE))
    main(["reward-model", "--resume", str(out), "--steps", "3"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/bradley_terry" in r] == [1, 2, 3]
    assert rows[-1]["loss/bradley_terry"] != pytest.approx(np.log(2), abs=1e-6)  # the head was loaded, not reset
    head_after = mx.load(str(out / "checkpoint" / rmc.HEAD_FILE))
    assert not mx.array_equal(head_before["linear.weight"], head_after["linear.weight"]).item()
