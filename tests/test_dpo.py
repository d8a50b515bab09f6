"""DPO: the loss against numpy, log 2 at the start, completion-only masking, the JSONL loader, smoke runs."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_rl.chapters import dpo
from mlx_rl.config import MlxRlError
from mlx_rl.data.pairs import build_pairs, pair_batch, read_pairs, tokenize_pairs
from mlx_rl.data.rewards import load_rewards
from mlx_rl.data.tasks import get_task
from mlx_rl.engine.logprobs import sequence_logprobs
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.runs import PhaseTimer


# --- the maths against a numpy reference --------------------------------------------


def numpy_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):  # one pair at a time, written out
        h = (a - c) - (b - d)
        if loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            p = 1 / (1 + math.exp(-beta * h))
            out.append(-(1 - eps) * math.log(p) - eps * math.log(1 - p))
    return float(np.mean(out))


@pytest.mark.parametrize("loss_type,eps,beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5), ("ipo", 0.0, 0.1), ("sigmoid", 0.0, 2.0)])
def test_loss_matches_numpy(loss_type, eps, beta):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-5, 3, size=16).astype(np.float32) for _ in range(4))
    loss, m = dpo.dpo_loss(*map(mx.array, (pc, pr, rc, rr)), beta, loss_type, eps)
    assert loss.item() == pytest.approx(numpy_dpo(pc, pr, rc, rr, beta, loss_type, eps), rel=1e-5)
    rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
    assert m["dpo/reward_chosen"].item() == pytest.approx(rew_c.mean(), rel=1e-5, abs=1e-6)
    assert m["dpo/margin"].item() == pytest.approx((rew_c - rew_r).mean(), rel=1e-5, abs=1e-6)
    assert m["dpo/accuracy"].item() == pytest.approx((rew_c > rew_r).mean())
    assert m["dpo/logp_rejected"].item() == pytest.approx(pr.mean(), rel=1e-5)


def test_chosen_nll_is_per_token():
    nll = dpo.chosen_nll(mx.array([-2.0, -4.0]), mx.array(2.0 + 6.0))  # two answers of 2 and 6 tokens
    assert nll.item() == pytest.approx(6.0 / 8.0)


# --- pairs on a tiny model --------------------------------------------------------------


def text_pairs(tokenizer, n=6):
    task = get_task("addition")
    records = []
    for i, row in enumerate(task.train_rows(np.random.default_rng(0), n, distinct=True)):
        right = row["answer"]
        records.append({"prompt": row["prompt"], "chosen": right, "rejected": right[::-1] + "9" * (i % 2), "where": f"x:{i}"})
    return tokenize_pairs(records, tokenizer)


def batch_counts(pairs, idx):
    """The loss's global counts for a batch of pairs: (n_pairs, n_chosen_tokens)."""
    return mx.array(float(len(idx))), mx.array(float(sum(len(pairs.chosen_ids[i]) for i in idx)))


def test_step_zero_loss_is_log2_and_margins_zero(micro_model):
    model, tokenizer, _ = micro_model
    pairs = dpo.compute_reference(model, text_pairs(tokenizer))
    idx = np.arange(len(pairs))
    tokens, mask, ref = pair_batch(pairs, idx)
    counts = batch_counts(pairs, idx)
    loss, m = dpo.make_loss_fn(0.1)(model, tokens, mask, ref, *counts)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    for k in ("dpo/margin", "dpo/reward_chosen", "dpo/reward_rejected"):
        assert abs(m[k].item()) < 1e-5
    # with the NLL term the DPO part is still log 2, and the total adds the chosen answers' NLL
    loss, m = dpo.make_loss_fn(0.1, rpo_alpha=1.0)(model, tokens, mask, ref, *counts)
    assert m["loss/dpo"].item() == pytest.approx(math.log(2), abs=1e-5)
    assert loss.item() == pytest.approx(math.log(2) + m["loss/nll"].item(), abs=1e-5)
    # the NLL is per chosen token: -sum of the chosen answers' log-probs / their token count
    chosen = sequence_logprobs(model, tokens, mask)[: len(pairs)]
    assert m["loss/nll"].item() == pytest.approx(-chosen.sum().item() / counts[1].item(), rel=1e-5)


def slow_sequence_logprob(model, prompt_ids, answer_ids):
    """Sum of log p(answer token | everything before it), one model call per answer token."""
    total, ids = 0.0, list(prompt_ids)
    for tok in answer_ids:
        logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
        total += (logits - mx.logsumexp(logits)).tolist()[tok]
        ids.append(tok)
    return total


def test_only_completion_tokens_contribute(micro_model):
    model, tokenizer, _ = micro_model
    pairs = text_pairs(tokenizer)
    pairs.prompt_ids[0] = pairs.prompt_ids[0] + tokenizer.encode("   ", add_special_tokens=False)  # ragged prompts
    pairs.chosen_ids[1] = pairs.chosen_ids[1][:1]  # a short answer, so the batch has padding
    pairs = dpo.compute_reference(model, pairs)
    for i in range(len(pairs)):
        assert pairs.ref_chosen[i] == pytest.approx(slow_sequence_logprob(model, pairs.prompt_ids[i], pairs.chosen_ids[i]), abs=1e-4)
        assert pairs.ref_rejected[i] == pytest.approx(slow_sequence_logprob(model, pairs.prompt_ids[i], pairs.rejected_ids[i]), abs=1e-4)
    tokens, mask, _ = pair_batch(pairs, np.arange(len(pairs)))
    # the mask marks exactly the answer tokens (EOS included): never the prompt, never padding
    n_answer = sum(map(len, pairs.chosen_ids)) + sum(map(len, pairs.rejected_ids))
    assert mask.sum().item() == n_answer
    # changing what sits in the padding changes nothing
    junk = mx.where(mx.concatenate([mx.ones((tokens.shape[0], 1)), mask], axis=1) > 0, tokens, 7)
    prompt_len = np.array([len(p) for p in pairs.prompt_ids] * 2)
    keep_prompt = mx.array(np.arange(tokens.shape[1])[None, :] < prompt_len[:, None])
    junk = mx.where(keep_prompt, tokens, junk)
    a = sequence_logprobs(model, tokens, mask)
    b = sequence_logprobs(model, junk, mask)
    assert mx.allclose(a, b, atol=1e-5).item()


def test_update_has_gradients_and_lowers_the_loss(micro_model):
    from mlx_rl.engine.models import new_tiny_model

    model, tokenizer, _ = new_tiny_model("micro", seed=1)  # a fresh copy: this test trains it
    pairs = dpo.compute_reference(model, text_pairs(tokenizer, 8))
    batch = (*pair_batch(pairs, np.arange(8)), *batch_counts(pairs, np.arange(8)))
    optimizer = make_optimizer(1e-3, 10)
    timer = PhaseTimer()
    update = make_update(model, optimizer, dpo.make_loss_fn(0.1), 1.0, timer=timer)
    losses = []
    for _ in range(8):
        loss, m, grad_norm = update(*batch)
        assert grad_norm.item() > 0
        losses.append(loss.item())
    assert set(timer.pop()) == {"time/forward_backward_s", "time/optimizer_s"}  # DPO's two phases
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < losses[0] - 0.05
    assert m["dpo/accuracy"].item() > 0.5


def test_build_pairs_keeps_sampled_ids(micro_model):
    model, tokenizer, _ = micro_model
    task = get_task("addition")

    def varied(completions, **kwargs):  # an untrained model scores 0 on the task: every answer ties, no pair
        return [(sum(map(ord, c)) % 7) / 6 for c in completions]

    task.rewards = load_rewards([varied])
    mx.random.seed(0)
    prompts = task.train_rows(np.random.default_rng(0), 16, distinct=True)
    pairs, rows, metrics = build_pairs(model, tokenizer, task, prompts, 4)
    assert len(pairs) == len(rows) == metrics["pairs/count"] > 0
    assert metrics["pairs/count"] + metrics["pairs/skipped_prompts"] == 16
    for i, r in enumerate(rows):
        assert r["score_chosen"] > r["score_rejected"]
        assert pairs.prompt_ids[i] == tokenizer.encode(r["prompt"])
        text = tokenizer.decode([t for t in pairs.chosen_ids[i] if t != tokenizer.eos_token_id])
        assert text == r["chosen"]


# --- the JSONL loader -------------------------------------------------------------------


GOOD = {"prompt": "07+45=", "chosen": "250", "rejected": "240"}


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "must be a JSON object"),
    (json.dumps({"prompt": "1+1=", "rejected": "3"}), "missing key 'chosen'"),
    (json.dumps({"chosen": "2", "rejected": "3"}), "share no prompt text at their start; add a 'prompt'"),  # implicit
    (json.dumps({**GOOD, "prompt": 5}), "'prompt' must be a string or a list of messages"),
    (json.dumps({**GOOD, "prompt": ""}), "'prompt' is empty"),
    (json.dumps({**GOOD, "chosen": ""}), "'chosen' is empty"),
    (json.dumps({**GOOD, "rejected": None}), "'rejected' must be a string or a list of messages"),
    (json.dumps({**GOOD, "rejected": "250"}), "are the same answer"),
    (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "message 1 of 'prompt' must have a string 'content'"),
    (json.dumps({**GOOD, "prompt": []}), "empty list of messages"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "250"}]}), "must have role 'assistant'"),
])
def test_loader_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(MlxRlError) as e:
        read_pairs(path)
    assert f"{path}:3" in str(e.value) and message in str(e.value)


def test_loader_file_errors(tmp_path):
    with pytest.raises(MlxRlError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MlxRlError, match="is empty: it holds no rows"):
        read_pairs(tmp_path / "empty.jsonl")


def test_tokenize_text_and_chat_pairs(tmp_path, micro_model):
    _, tokenizer, _ = micro_model
    path = tmp_path / "pairs.jsonl"
    chat = {"prompt": [{"role": "user", "content": "07+45="}],
            "chosen": [{"role": "assistant", "content": "250"}], "rejected": "240", "extra": 1}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(chat) + "\n")
    pairs = tokenize_pairs(read_pairs(path), tokenizer)
    eos = tokenizer.eos_token_id
    assert pairs.prompt_ids[0] == tokenizer.encode("07+45=")  # BOS + prompt, on its own
    assert pairs.chosen_ids[0] == tokenizer.encode("250", add_special_tokens=False) + [eos]
    assert pairs.rejected_ids[0] == tokenizer.encode("240", add_special_tokens=False) + [eos]
    assert pairs.prompt_ids[1] == list(tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True))
    assert pairs.chosen_ids[1] == pairs.chosen_ids[0]


def test_chat_prompt_needs_a_chat_template(tmp_path, micro_model):
    _, tokenizer, _ = micro_model

    class NoTemplate:
        has_chat_template = False
        eos_token_id = tokenizer.eos_token_id

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**GOOD, "prompt": [{"role": "user", "content": "07+45="}]}) + "\n")
    with pytest.raises(MlxRlError, match=r"pairs.jsonl:1: .*no chat template"):
        tokenize_pairs(read_pairs(path), NoTemplate())


# --- command-line smoke runs ------------------------------------------------------------


def test_cli_dpo_from_file_and_resume(tmp_path, micro_checkpoint):
    from mlx_rl.cli import main

    pairs = tmp_path / "pairs.jsonl"
    task = get_task("addition")
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["answer"], "rejected": "000"}) + "\n"
                             for r in task.train_rows(np.random.default_rng(0), 8, distinct=True)))
    out = tmp_path / "run"
    common = ["--batch-size", "2", "--eval-prompts", "10", "--eval-every", "2"]
    main(["dpo", "--model", str(micro_checkpoint), "--pairs", str(pairs), "--steps", "2", "--out", str(out), *common])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)
    for name in ("loss/total", "dpo/margin", "dpo/accuracy", "dpo/reward_chosen", "dpo/logp_chosen", "optim/grad_norm",
                 "time/forward_backward_s", "time/optimizer_s"):  # the update's two phases, as in every chapter
        assert name in rows[1], name
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    # --resume continues with the same pairs and reference log-probs, up to the end of the epoch
    main(["dpo", "--resume", str(out), "--steps", "4"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["before"]["eval/accuracy"] == rows[0]["eval/accuracy"]
    assert "eval/accuracy" in summary["after"] and {"forward_backward", "optimizer"} <= set(summary["phase_seconds"])


def test_cli_on_policy_pairs(tmp_path, micro_checkpoint):
    from mlx_rl.cli import main

    out = tmp_path / "pairs.jsonl"
    main(["dpo-pairs", "--model", str(micro_checkpoint), "--pair-prompts", "16", "--out", str(out)])
    assert read_pairs(out)
    run = tmp_path / "run"
    main(["dpo", "--model", str(micro_checkpoint), "--rounds", "2", "--pair-prompts", "16",
          "--batch-size", "2", "--eval-prompts", "10", "--steps", "3", "--out", str(run)])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["pairs/count"] > 0 and "train/accuracy" in rows[1]
    assert (run / "pairs-round0.jsonl").exists() and (run / "checkpoint" / "config.json").exists()


def test_cli_errors(tmp_path, micro_checkpoint, capsys):
    from mlx_rl.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    for args, message in [
        (["--pairs", str(bad), "--out", str(tmp_path / "r")], "bad.jsonl:1: missing key 'rejected'"),
        (["--loss-type", "ipo", "--label-smoothing", "0.1"], "sigmoid loss only"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["dpo", "--model", str(micro_checkpoint), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


# --- the learning run ---------------------------------------------------------------------


@pytest.mark.acceptance
def test_default_run_gets_past_the_plateau(tmp_path, addition_plateau):
    """Pretrain's default checkpoint, then the default DPO run (under 10 minutes)."""
    from mlx_rl.cli import main

    main(["dpo", "--model", str(addition_plateau), "--out", str(tmp_path / "dpo")])
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["after"]["eval/accuracy"] >= 0.85
    assert summary["after"]["eval/accuracy"] - summary["before"]["eval/accuracy"] >= 0.25
    assert summary["wall_s"] < 600


def test_lr_schedule_cosine_decays_toward_a_twentieth_over_steps(tmp_path, micro_checkpoint, capsys):
    from mlx_rl.cli import main
    from mlx_rl.data.tasks import get_task

    pairs = tmp_path / "pairs.jsonl"
    task = get_task("addition")
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["answer"], "rejected": "000"}) + "\n"
                             for r in task.train_rows(np.random.default_rng(0), 16, distinct=True)))
    common = ["--model", str(micro_checkpoint), "--pairs", str(pairs), "--batch-size", "2", "--eval-prompts", "8",
              "--warmup", "0", "--lr", "1e-3"]
    out = tmp_path / "cosine"
    main(["dpo", *common, "--steps", "4", "--lr-schedule", "cosine", "--out", str(out)])
    lrs = [r["optim/lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "optim/lr" in r]
    # the rate each update used: step k (1..4) at k - 1 quarters of a half cosine from lr to lr/20
    end = 1e-3 / 20
    expected = [end + (1e-3 - end) * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-5), lrs
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # no --steps: nothing to decay over, said in one line
        main(["dpo", *common, "--lr-schedule", "cosine", "--out", str(tmp_path / "no-steps")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--steps" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "no-steps").exists()
