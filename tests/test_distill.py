"""Distillation: the exact KL against numpy, which way each estimator's gradient points, the vocabulary check,
and CLI runs (on-policy, off-policy, LoRA, --resume); a short run that really lowers the KL."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.chapters import distill
from mlx_rl.cli import main
from mlx_rl.data.tasks import get_task
from mlx_rl.engine.checkpoint import save_checkpoint
from mlx_rl.engine.logprobs import completion_batch, sampled_distribution
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.engine.sampling import generate


def numpy_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_exact_kl_matches_numpy():
    rng = np.random.default_rng(0)
    B, T, V = 3, 5, 11
    s, t = numpy_log_softmax(rng.normal(size=(B, T, V))), numpy_log_softmax(rng.normal(size=(B, T, V)) * 2)
    targets = rng.integers(0, V, size=(B, T))
    mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float32)
    mask[0, 0] = 1
    loss, m = distill.distill_loss(mx.array(s.astype(np.float32)), mx.array(t.astype(np.float32)), mx.array(targets),
                                   mx.array(mask), "exact", mx.array(mask.sum()))
    per_position = sum(np.exp(s[..., v]) * (s[..., v] - t[..., v]) for v in range(V))  # a loop over the vocabulary
    expected = (per_position * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["distill/reverse_kl"].item() == pytest.approx(expected, rel=1e-5)
    s_tok = np.take_along_axis(s, targets[..., None], -1)[..., 0]
    t_tok = np.take_along_axis(t, targets[..., None], -1)[..., 0]
    assert m["distill/k1"].item() == pytest.approx(((s_tok - t_tok) * mask).sum() / mask.sum(), rel=1e-5)
    logr = t_tok - s_tok
    assert m["distill/k3"].item() == pytest.approx(((np.expm1(logr) - logr) * mask).sum() / mask.sum(), rel=1e-5)


@pytest.fixture(scope="module")
def pair():
    """A student and a teacher with the same vocabulary (two random micro models), and a batch the student sampled."""
    student, tokenizer, config = new_tiny_model("micro", seed=0)
    teacher, _, _ = new_tiny_model("micro", seed=1)
    task = get_task("addition")
    rows = task.train_rows(np.random.default_rng(0), 64)
    mx.random.seed(0)
    rollout = generate(student, tokenizer, rows, task.max_new_tokens, 1.0)
    tokens, mask = completion_batch(rollout.prompt_ids, np.array(rollout.completion_ids), np.array(rollout.mask), 0)
    return student, teacher, tokenizer, config, tokens, mask


def gradient(model, loss_fn, *arrays):
    (_, _), grads = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))(*arrays)
    return np.concatenate([np.array(g).ravel() for _, g in tree_flatten(grads)])


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_each_estimators_gradient_points_where_the_docs_say(pair):
    student, teacher, _, _, tokens, mask = pair
    t_logp = distill.teacher_logprobs(teacher, tokens, 1.0)
    n = mask.sum()
    grads = {}
    for est in distill.ESTIMATORS:
        cfg = distill.DistillConfig(kl_estimator=est)
        grads[est] = gradient(student, distill.make_loss_fn(cfg), tokens, mask, t_logp, n)

    def forward_kl(model, tokens, mask, t_logp, n):  # KL(teacher || student), exact, per position
        s_logp = sampled_distribution(model(tokens[:, :-1]))
        return ((mx.exp(t_logp) * (t_logp - s_logp)).sum(-1) * mask).sum() / n, {}

    assert np.abs(grads["exact"]).max() > 0
    # k1 (score function) and k2 (direct) estimate the reverse KL's gradient from the sampled tokens alone
    assert cosine(grads["k1"], grads["exact"]) > 0.5 and cosine(grads["k2"], grads["exact"]) > 0.5
    # k2 differentiated equals k1's surrogate term for term: the same gradient
    np.testing.assert_allclose(grads["k2"], grads["k1"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("estimator,target", [("k1", "reverse"), ("k2", "reverse"), ("k3", "forward")])
def test_expected_gradient_of_each_estimator_exactly(estimator, target):
    """One next-token distribution with logits theta: the expectation over the student's samples, summed
    exactly over the vocabulary, of each estimator's gradient, against the gradient of the KL it follows."""
    rng = np.random.default_rng(4)
    V = 7
    theta = mx.array(rng.normal(size=V).astype(np.float32))
    t_logp = mx.array(numpy_log_softmax(rng.normal(size=V) * 1.5).astype(np.float32))[None, None]  # (1, 1, V)
    probs = np.exp(numpy_log_softmax(np.array(theta)))

    def sampled_loss(theta, x):  # the chapter's loss on one sampled token x
        s_logp = sampled_distribution(theta)[None, None]  # (1, 1, V)
        return distill.distill_loss(s_logp, t_logp, mx.array([[x]]), mx.ones((1, 1)), estimator, mx.array(1.0))[0]

    expected = sum(probs[x] * np.array(mx.grad(sampled_loss)(theta, x), dtype=np.float64) for x in range(V))

    def kl(theta):
        s = sampled_distribution(theta)
        t = t_logp[0, 0]
        return (mx.exp(s) * (s - t)).sum() if target == "reverse" else (mx.exp(t) * (t - s)).sum()

    np.testing.assert_allclose(expected, np.array(mx.grad(kl)(theta)), atol=1e-5)
    other = "forward" if target == "reverse" else "reverse"
    target, kl_other = target, None
    if other == "reverse":
        kl_other = lambda th: (mx.exp(sampled_distribution(th)) * (sampled_distribution(th) - t_logp[0, 0])).sum()  # noqa: E731
    else:
        kl_other = lambda th: (mx.exp(t_logp[0, 0]) * (t_logp[0, 0] - sampled_distribution(th))).sum()  # noqa: E731
    assert np.abs(expected - np.array(mx.grad(kl_other)(theta))).max() > 1e-2  # and not the other direction's


@pytest.mark.parametrize("estimator", ["exact", "k1"])
def test_a_step_lowers_the_reverse_kl(pair, estimator):
    from mlx_rl.engine.update import make_optimizer, make_update

    base, teacher, _, _, tokens, mask = pair
    student = type(base)(base.args)
    student.update(base.parameters())
    t_logp = distill.teacher_logprobs(teacher, tokens, 1.0)
    cfg = distill.DistillConfig(kl_estimator=estimator)
    update = make_update(student, make_optimizer(1e-3, 10), distill.make_loss_fn(cfg), compile=True)
    exact_fn = distill.make_loss_fn(distill.DistillConfig(kl_estimator="exact"))
    before = exact_fn(student, tokens, mask, t_logp, mask.sum())[0].item()
    for _ in range(3):
        update(tokens, mask, t_logp, mask.sum())
    after = exact_fn(student, tokens, mask, t_logp, mask.sum())[0].item()
    assert after < before - 1e-3, (before, after)


# --- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pair):
    student, teacher, tokenizer, config, _, _ = pair
    root = tmp_path_factory.mktemp("distill")
    save_checkpoint(root / "student", student, tokenizer, config)
    save_checkpoint(root / "teacher", teacher, tokenizer, config)
    other, other_tok, other_config = new_tiny_model("micro", seed=2, extra_chars="éü")
    save_checkpoint(root / "other", other, other_tok, other_config)
    return root


SMALL = ["--prompts-per-step", "8", "--eval-prompts", "8", "--eval-every", "1"]


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_on_policy_and_resume(tmp_path, ckpts):
    out = tmp_path / "run"
    main(["distill", "--teacher", str(ckpts / "teacher"), "--model", str(ckpts / "student"), "--out", str(out),
          "--steps", "2", *SMALL])
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["distill/reverse_kl"] > 0 and "time/teacher_s" in rows[1] and "eval/accuracy" in rows[2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chapter"] == "distill" and set(summary) >= {"before", "after", "final", "phase_seconds", "wall_s"}
    assert (out / "checkpoint" / "model.safetensors").exists() and (out / "plots").is_dir()
    main(["distill", "--resume", str(out), "--steps", "3"])
    assert [r["step"] for r in rows_of(out)] == [0, 1, 2, 3]


def test_resume_is_bit_for_bit(tmp_path, ckpts):
    args = ["distill", "--teacher", str(ckpts / "teacher"), "--model", str(ckpts / "student"), *SMALL,
            "--eval-every", "0"]
    main(args + ["--out", str(tmp_path / "whole"), "--steps", "3"])
    main(args + ["--out", str(tmp_path / "split"), "--steps", "1"])
    main(["distill", "--resume", str(tmp_path / "split"), "--steps", "3"])
    keep = lambda rows: [{k: v for k, v in r.items() if k.startswith(("distill/", "loss/", "reward/"))}  # noqa: E731
                         for r in rows]
    assert keep(rows_of(tmp_path / "split")) == keep(rows_of(tmp_path / "whole"))


def test_cli_off_policy_and_lora(tmp_path, ckpts):
    out = tmp_path / "sft"
    main(["distill", "--teacher", str(ckpts / "teacher"), "--model", str(ckpts / "student"), "--out", str(out),
          "--steps", "2", "--off-policy", *SMALL])
    rows = rows_of(out)
    assert rows[2]["loss/cross_entropy"] > 0 and "time/teacher_s" not in rows[2] and "distill/reverse_kl" not in rows[2]
    out = tmp_path / "lora"
    main(["distill", "--teacher", str(ckpts / "teacher"), "--model", str(ckpts / "student"), "--out", str(out),
          "--steps", "2", "--lora-rank", "4", "--kl-estimator", "k1", *SMALL])
    assert (out / "checkpoint" / "adapters" / "adapters.safetensors").exists()


def test_a_teacher_with_another_vocabulary_is_one_line(tmp_path, ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--teacher", str(ckpts / "other"), "--model", str(ckpts / "student"),
              "--out", str(tmp_path / "x"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "vocabulary" in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        main(["distill", "--model", str(ckpts / "student"), "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--teacher" in err and len(err.splitlines()) == 1, err


def test_distillation_lowers_the_kl_to_a_teacher(tmp_path, ckpts, trained_micro):
    """A random student distilled from the briefly pretrained model: the exact reverse KL falls by half."""
    out = tmp_path / "learn"
    main(["distill", "--teacher", str(trained_micro[1]), "--model", str(ckpts / "student"), "--out", str(out),
          "--steps", "25", "--prompts-per-step", "32", "--lr", "3e-3", "--eval-prompts", "16", "--eval-every", "0"])
    rows = rows_of(out)
    first, last = rows[1]["distill/reverse_kl"], np.mean([r["distill/reverse_kl"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
