"""Chapter "Distillation": a teacher grades every token of the student's own samples.

What it teaches: RL gives a sparse signal (one reward per completion, and
nothing at all from a group that is all right or all wrong); imitation gives a
dense one (every token) but only on the teacher's text, where the student may
never go. On-policy distillation takes the best of both: the student samples
its own completions, the teacher scores every token of them, and the loss is
the per-token reverse KL between the two next-token distributions,

    KL_t = KL(pi_s(. | x, y_<t) || pi_t(. | x, y_<t))
         = sum_v pi_s(v) (log pi_s(v) - log pi_t(v))      (v over the vocabulary)

on the student's own prefixes y ~ pi_s. Reverse KL is mode-seeking: the student
is pushed off every token the teacher finds unlikely, exactly where its own
mistakes begin. Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (GKD); Gu et al. 2024, "MiniLLM";
the Qwen3 technical report distils its small models this way.

The per-token loss, `--kl-estimator`, with log r = log pi_t(y_t) - log pi_s(y_t)
on the sampled token (the KL chapter's convention, samples from the student):

    exact   sum_v pi_s(v) (log pi_s(v) - log pi_t(v)), differentiated directly:
            the teacher's whole distribution is at hand, so no estimate at all
    k1      sg(-log r) * log pi_s(y_t): the sampled reverse KL as a per-token cost,
            through the score function (REINFORCE with advantage log r); its
            expected gradient is the exact one's
    k2      (log r)^2 / 2, differentiated directly: (log pi_s - log pi_t) d log pi_s,
            the same expected gradient as k1, without the score function
    k3      (r - 1) - log r, differentiated directly: its expected gradient is
            (1 - r) d log pi_s, which is the gradient of the *forward* KL(pi_t || pi_s):
            an estimator of the right value (unbiased for the reverse KL) whose
            gradient points elsewhere, the trap the KL chapter warns about

`--off-policy` trains on the teacher's samples instead: plain cross-entropy on
the teacher's completions (SFT on distilled data), the baseline the on-policy
version is measured against.

Choices and simplifications, on purpose:
- Discount 0: each token's loss is its own position's KL; the effect of a token
  on the KL of later positions is not credited back (as in GKD and Thinking
  Machines' on-policy distillation recipe).
- The teacher must share the student's vocabulary (the same tokenizer): the loss
  compares the two models' probabilities of the same token ids. Checked at the
  start, in one line.
- One completion per prompt, one update per rollout batch (no epochs: a dense
  per-token signal needs no group baseline and no ratio clipping).
- The teacher is frozen and scored without gradient, at the sampling temperature.
"""

import dataclasses
import typing

import mlx.core as mx
import numpy as np

from mlx_rl.chapters.grpo import pad_columns
from mlx_rl.chapters.kl import k3
from mlx_rl.config import MlxRlError, command, option
from mlx_rl.engine import loop
from mlx_rl.engine.evaluate import score_rows
from mlx_rl.engine.logprobs import completion_batch, entropy_of, masked, sampled_distribution
from mlx_rl.engine.models import load_model
from mlx_rl.engine.sampling import generate, row_keys
from mlx_rl.engine.session import LLMConfig, batch_check, resolve_policy_model, start
from mlx_rl.engine.update import current_lr

ESTIMATORS = ("exact", "k1", "k2", "k3")


@dataclasses.dataclass
class DistillConfig(LLMConfig):
    teacher: typing.Optional[str] = option(None, "the teacher's checkpoint directory (required; the same vocabulary as "
                                           "the student's)")
    steps: int = option(40, "number of training steps (one rollout batch each)", min=1, resumable=True)
    prompts_per_step: int = option(64, "prompts per step, one completion each", min=1)
    kl_estimator: str = option("exact", "the per-token loss: exact (full-vocabulary reverse KL), k1 (sampled, through "
                               "the score function), k2 or k3 (sampled, differentiated directly)",
                               choices=list(ESTIMATORS))
    off_policy: bool = option(False, "train on the teacher's samples instead (cross-entropy: SFT on distilled data)")
    lr: float = option(3e-4, "learning rate (AdamW)", above=0.0, resumable=True)
    warmup: int = option(0, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = option("constant", "learning rate after warm-up: constant, or cosine decay to lr/20",
                              choices=["constant", "cosine"])
    temperature: float = option(1.0, "sampling temperature of the rollouts (and of both distributions compared)", above=0.0)
    max_new_tokens: int = option(0, "longest completion (0: the task's answer length + EOS; 64 with --data)", min=0)
    eval_every: int = option(5, "evaluate on held-out data every N steps: greedy accuracy (0: only at the start and the end)",
                             min=0, resumable=True)


# --- the maths ---------------------------------------------------------------------------------


def distill_loss(student_logp, teacher_logp, targets, mask, estimator, n_tokens):
    """The per-token reverse KL loss. student_logp, teacher_logp (B, T, V) log-probs, targets (B, T) the
    sampled ids, mask (B, T). Returns (loss, metrics); n_tokens: the global count of masked tokens."""
    s = mx.take_along_axis(student_logp, targets[..., None], axis=-1)[..., 0]  # (B, T) log pi_s(y_t)
    t = mx.take_along_axis(teacher_logp, targets[..., None], axis=-1)[..., 0]  # (B, T) log pi_t(y_t)
    log_r = masked(t - s, mask)  # (B, T) log pi_t - log pi_s on the student's samples
    exact = (mx.exp(student_logp) * (student_logp - teacher_logp)).sum(axis=-1)  # (B, T) KL(pi_s || pi_t)
    if estimator == "exact":
        per_token = exact
    elif estimator == "k1":
        per_token = mx.stop_gradient(-log_r) * s  # the score function: cost log pi_s - log pi_t per token
    elif estimator == "k2":
        per_token = 0.5 * log_r**2
    elif estimator == "k3":
        per_token = k3(log_r)
    else:
        raise MlxRlError(f"unknown --kl-estimator {estimator} (choose from {', '.join(ESTIMATORS)})")
    share = lambda x: masked(x, mask).sum() / n_tokens  # noqa: E731  a share of the global token mean
    loss = share(per_token)
    sg_log_r = mx.stop_gradient(log_r)
    metrics = {
        "distill/reverse_kl": share(mx.stop_gradient(exact)),  # the quantity minimised, exactly, per token
        "distill/k1": share(-sg_log_r),  # its sample estimates, as the KL chapter writes them
        "distill/k3": share(k3(sg_log_r)),
    }
    # A metric that is the loss itself reuses the loss's node: MLX 0.32's compiled value_and_grad fails
    # ("_Map_base::at") when an output is a second copy of an expression inside the loss.
    if estimator in ("exact", "k3"):
        metrics["distill/reverse_kl" if estimator == "exact" else "distill/k3"] = loss
    return loss, metrics


def sft_loss(student_logp, targets, mask, n_tokens):
    """--off-policy: cross-entropy on the teacher's sampled tokens, mean per token. Returns (loss, metrics)."""
    s = mx.take_along_axis(student_logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    loss = -masked(s, mask).sum() / n_tokens
    return loss, {"loss/cross_entropy": loss}


def make_loss_fn(cfg):
    """loss_fn(model, tokens, mask, teacher_logp, n_tokens): the student's forward inside the differentiated fn."""

    def loss_fn(model, tokens, mask, teacher_logp, n_tokens):
        logits = model(tokens[:, :-1])  # (B, T-1, V)
        student_logp, probs = sampled_distribution(logits, cfg.temperature, with_probs=True)  # (B, T-1, V) x 2
        targets = tokens[:, 1:]  # (B, T-1)
        if cfg.off_policy:
            loss, metrics = sft_loss(student_logp, targets, mask, n_tokens)
        else:
            loss, metrics = distill_loss(student_logp, teacher_logp, targets, mask, cfg.kl_estimator, n_tokens)
        entropy = mx.stop_gradient(entropy_of(student_logp, probs))  # (B, T-1)
        metrics["policy/entropy"] = masked(entropy, mask).sum() / n_tokens
        return loss, metrics

    return loss_fn


# --- the teacher ------------------------------------------------------------------------------


def load_teacher(cfg, student_tokenizer, student_config):
    """The frozen teacher, checked to share the student's vocabulary (one line if it does not)."""
    if not cfg.teacher:
        raise MlxRlError("distill needs a teacher: pass --teacher DIR (a checkpoint with the student's vocabulary)")
    teacher, tokenizer, config = load_model(cfg.teacher)
    mine, theirs = student_tokenizer.get_vocab(), tokenizer.get_vocab()
    if mine != theirs or config.get("vocab_size") != student_config.get("vocab_size"):
        raise MlxRlError(f"--teacher {cfg.teacher}: its vocabulary ({len(theirs)} tokens, {config.get('vocab_size')} "
                         f"embeddings) is not the student's ({len(mine)} tokens, {student_config.get('vocab_size')} "
                         "embeddings); distillation compares both models' probabilities of the same token ids, so "
                         "they must share one tokenizer")
    teacher.freeze()
    teacher.eval()
    return teacher


def teacher_logprobs(teacher, tokens, temperature):
    """(B, T-1, V) the teacher's log-probs at every position, no gradient."""
    return mx.stop_gradient(sampled_distribution(teacher(tokens[:, :-1]), temperature))


# --- the step ---------------------------------------------------------------------------------


def distill_step(session, cfg, teacher, update, max_new_tokens):
    """One step: the student (or, off-policy, the teacher) samples; the teacher scores; one update."""
    world, timer, task = session.world, session.timer, session.task
    pad_id = session.tokenizer.pad_token_id or 0
    all_rows = task.train_rows(session.rng, cfg.prompts_per_step)
    keys = row_keys(len(all_rows), world)
    rows = world.shard(all_rows)
    sampler = teacher if cfg.off_policy else session.model
    with timer("generate"):
        rollout = generate(sampler, session.tokenizer, rows, max_new_tokens, cfg.temperature,
                           chat_template=cfg.chat_template, keys=keys)
    with timer("reward"):  # not trained on: how good the samples are (the student's own, on-policy)
        scores = score_rows(task, rows, rollout.texts, training=True)
        tokens, mask = completion_batch(  # (B, T), (B, T-1), T fixed by max_new_tokens: no retracing
            rollout.prompt_ids, pad_columns(rollout.completion_ids, max_new_tokens, pad_id),
            pad_columns(rollout.mask, max_new_tokens), pad_id)
        n_tokens = mx.array(float(world.sum(np.array([mask.sum().item()]))[0]))
    teacher_logp = mx.zeros((1, 1, 1))  # off-policy: the loss never reads it
    if not cfg.off_policy:
        with timer("teacher"):
            teacher_logp = teacher_logprobs(teacher, tokens, cfg.temperature)  # (B, T-1, V)
            mx.eval(teacher_logp)
    loss, metrics, grad_norm = update(tokens, mask, teacher_logp, n_tokens)
    row = world.reduce_metrics({k: v.item() for k, v in metrics.items()})
    all_rewards = world.gather(np.asarray(scores.total))
    row.update({
        "loss/total": loss.item(),  # the update summed the ranks' shares already
        "optim/grad_norm": grad_norm.item(),
        "reward/mean": float(all_rewards.mean()),
        "policy/completion_len": float(world.gather(np.asarray(rollout.lengths)).mean()),
    })
    for name in scores.names:
        values = world.gather(scores.per_reward[name])
        row[f"reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    if (task.training_rewards or task.rewards).is_verifier():
        row["train/accuracy"] = row[f"reward/{scores.names[0]}"]
    return row


# --- the run -----------------------------------------------------------------------------------


def train(cfg):
    if not cfg.teacher:
        raise MlxRlError("distill needs a teacher: pass --teacher DIR (a checkpoint with the student's vocabulary)")
    resolve_policy_model(cfg)
    memory = batch_check(cfg.prompts_per_step, cfg.max_new_tokens, f"--prompts-per-step {cfg.prompts_per_step}")
    loaded = {}

    def precheck(model, tokenizer, model_config, task, world):  # before anything is written
        if getattr(task, "env", None) is not None:
            raise MlxRlError(f"distill: task {task.name} has an environment; this chapter distils single "
                             "completions (use a task without one)")
        loaded["teacher"] = load_teacher(cfg, tokenizer, model_config)
        memory(model, tokenizer, model_config, task, world)

    session = start("distill", cfg, precheck=precheck)
    teacher = loaded["teacher"]
    N = cfg.max_new_tokens or session.task.max_new_tokens
    optimizer = session.optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.lr_schedule)
    update = session.update_step(make_loss_fn(cfg), optimizer)

    def step(i):
        row = distill_step(session, cfg, teacher, update, N)
        row["optim/lr"] = current_lr(optimizer)
        return row

    signals = {"reverse KL": "distill/reverse_kl", "held-out acc": "eval/accuracy", "train acc": "train/accuracy",
               "entropy": "policy/entropy"}
    if cfg.off_policy:
        signals = {"CE": "loss/cross_entropy", "held-out acc": "eval/accuracy", "entropy": "policy/entropy"}
    return loop.run(session, step, steps=cfg.steps, signals=signals)


cli = command("distill", DistillConfig, train, help=__doc__.split("\n\n")[0])
