"""Chapter "GRPO": reinforcement learning with a verifiable reward and group-relative advantages.

What it teaches: the pretrained model imitated a corpus with a systematic
mistake, so its greedy answers plateau. GRPO (Group Relative Policy
Optimization) samples a *group* of completions for each prompt, scores them
with the task's reward, and pushes up the log-probs of the completions that
did better than their group and down those that did worse. No value network:
the group's mean reward is the baseline.

For prompt q with group {o_1..o_G}, rewards r_i, and the policy pi_old that sampled them:

    A_i    = (r_i - mean(r)) / std(r)                            (group-relative advantage)
    rho_it = pi(o_it | q, o_<t) / pi_old(o_it | q, o_<t)         (importance ratio, per token)
    J      = mean_i mean_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta KL_it ]
    KL_it  = exp(log r) - log r - 1,  log r = log pi_ref(o_it) - log pi(o_it)    ("k3")

and we minimise -J for a few inner iterations on the same batch. Sources:
Shao et al. 2024, "DeepSeekMath" (GRPO, eq. 3 and the k3 estimator of eq. 4);
Schulman et al. 2017, "Proximal Policy Optimization" (the clipped objective);
Liu et al. 2025, "Understanding R1-Zero-like training" (Dr. GRPO: skipping the
std scaling, and averaging over all tokens instead of per sequence).

Choices and simplifications, on purpose:
- Zero-signal groups (every completion got the same reward) have advantage
  exactly 0 (std scaling divides by std + eps and such groups are masked to 0,
  since r - mean(r) is not always exactly 0 in floating point). They stay in the
  batch (fixed shapes: no retracing) but push nothing. Their share is logged as
  grpo/zero_signal_frac. When *every* group of a step is zero-signal the step
  takes no optimizer update at all: the policy gradient is zero, and an Adam
  step would only replay momentum and the KL pull (logged as grpo/skipped = 1).
- The "old" log-probs are not the sampler's: at the first inner iteration the
  loss uses the current log-probs with the gradient stopped, which is the same
  number bit for bit, so the ratio is exactly 1 and the clip fraction 0 (a test
  asserts it). Those log-probs come out of that first forward pass and serve as
  the old log-probs of the later inner iterations, so they cost no extra pass.
- Each inner iteration is one full-batch step (no mini-batches); the
  temperature-scaled distribution is the policy being optimised (the one the
  rollout sampled from); the reference is the starting checkpoint, and with
  beta = 0 it is never built.
"""

import dataclasses

import mlx.core as mx
import numpy as np

from mlx_rl import train
from mlx_rl.config import command, option
from mlx_rl.kl import k3  # (r - 1) - log r: per-token estimate of KL(policy || reference), never negative
from mlx_rl.logprobs import completion_batch, masked_mean, token_logprobs
from mlx_rl.plots import plot_run
from mlx_rl.rollout import generate
from mlx_rl.runs import PhaseTimer, Progress


@dataclasses.dataclass
class GRPOConfig(train.LLMConfig):
    steps: int = option(60, "number of GRPO steps (one rollout batch each)", min=1)
    group_size: int = option(8, "completions sampled per prompt (G)", min=2)
    prompts_per_step: int = option(32, "prompts per step (the batch is prompts_per_step x group_size)", min=1)
    inner_iters: int = option(2, "update iterations on each rollout batch (mu)", min=1)
    clip_eps: float = option(0.2, "clip the importance ratio to [1 - eps, 1 + eps]", above=0.0)
    beta: float = option(0.04, "KL penalty coefficient to the frozen reference (0: no reference is computed)", min=0.0)
    scale_std: bool = option(True, "divide advantages by the group's reward std (--no-scale-std: Dr. GRPO)")
    loss_agg: str = option("sequence", "average the per-token loss per sequence then over the batch, or over all tokens",
                           choices=["sequence", "token"])
    lr: float = option(1e-4, "learning rate (AdamW); a fresh Adam above ~5e-4 can wreck the checkpoint", above=0.0)
    warmup: int = option(0, "linear learning-rate warm-up steps", min=0)
    temperature: float = option(1.0, "sampling temperature of the rollouts (and of the optimised distribution)", above=0.0)
    max_new_tokens: int = option(0, "longest completion (0: the task's answer length + EOS)", min=0)
    eval_every: int = option(10, "evaluate held-out greedy accuracy every N steps (0: only at start and end)", min=0)


# --- the maths: pure functions of arrays --------------------------------------


def group_advantages(rewards, scale_std=True, eps=1e-4):
    """Group-relative advantages. rewards (P, G) -> advantages (P, G), zero_signal (P,) bool.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0.
    """
    rewards = np.asarray(rewards, dtype=np.float32)
    zero_signal = rewards.max(axis=1) == rewards.min(axis=1)  # (P,)
    advantages = rewards - rewards.mean(axis=1, keepdims=True)  # (P, G)
    if scale_std:
        advantages = advantages / (rewards.std(axis=1, keepdims=True) + eps)
    advantages[zero_signal] = 0.0
    return advantages, zero_signal


def sequence_mean(per_token, mask):
    """Mean over each sequence's tokens, then over sequences (GRPO paper). (B, T) -> ()"""
    return ((per_token * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)).mean()


def token_mean(per_token, mask):
    """Mean over every completion token of the batch (long answers weigh more). (B, T) -> ()"""
    return (per_token * mask).sum() / mx.maximum(mask.sum(), 1.0)


AGGREGATE = {"sequence": sequence_mean, "token": token_mean}


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps=0.2, beta=0.0, loss_agg="sequence"):
    """The GRPO loss -J. Per-token arrays are (B, T), advantages (B,). Returns (loss, metrics).

    (Metrics reuse the loss's own nodes: MLX 0.32's compiled value_and_grad fails with
    "_Map_base::at" when an aux output is a second copy of an expression inside the loss.)
    """
    adv = advantages[:, None]  # (B, 1): every token of a completion shares its advantage
    ratio = mx.exp(logprobs - old_logprobs)  # (B, T)
    clipped_ratio = mx.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    policy_term = mx.minimum(ratio * adv, clipped_ratio * adv)  # (B, T) pessimistic bound
    aggregate = AGGREGATE[loss_agg]
    policy_loss = -aggregate(policy_term, mask)
    loss, metrics = policy_loss, {"loss/policy": policy_loss}
    if beta > 0:  # with beta = 0 the reference log-probs are never looked at
        kl = aggregate(k3(ref_logprobs - logprobs), mask)  # averaged as the policy term is
        kl_term = beta * kl
        loss = policy_loss + kl_term
        metrics.update({"loss/kl": kl_term, "kl/k3": kl})
    # The clip is active where it removes the gradient: ratio past the edge in the advantage's direction.
    clipped = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))  # (B, T)
    metrics.update({
        "loss/total": loss,
        "policy/clipfrac": masked_mean(clipped.astype(mx.float32), mask),
        "policy/ratio_mean": masked_mean(ratio, mask),
        "policy/ratio_min": mx.where(mask > 0, ratio, mx.inf).min(),
        "policy/ratio_max": mx.where(mask > 0, ratio, -mx.inf).max(),
        "kl/approx": masked_mean(k3(old_logprobs - logprobs), mask),  # KL(new || old): drift within the batch
    })
    return loss, metrics


# --- the step --------------------------------------------------------------------


def make_loss_fn(cfg):
    """loss_fn(model, *arrays) for train.make_update: the forward pass, then grpo_loss."""

    def loss_fn(model, tokens, mask, advantages, old_logprobs, ref_logprobs, first, shared_len=0):
        # shared_len: the group's rows share their first shared_len tokens (the prompt), run once per group
        logprobs, entropy = token_logprobs(model, tokens, cfg.temperature, cfg.group_size, shared_len)  # (B, T-1) x 2
        # At the first inner iteration the old policy is the current one: the same numbers, no gradient.
        old_logprobs = mx.stop_gradient(mx.where(first, logprobs, old_logprobs))
        loss, metrics = grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cfg.clip_eps, cfg.beta, cfg.loss_agg)
        metrics["policy/entropy"] = masked_mean(mx.stop_gradient(entropy), mask)
        metrics["logprobs"] = mx.stop_gradient(logprobs)  # (B, T-1): the old log-probs of later iterations
        return loss, metrics

    return loss_fn


def make_update(model, optimizer, cfg):
    """update(tokens, mask, advantages, old_logprobs, ref_logprobs, first, timer) -> (loss, metrics, grad_norm)."""
    return train.make_update(model, optimizer, make_loss_fn(cfg), cfg.max_grad_norm, cfg.compile)


def pad_columns(x, n, value=0):
    """Right-pad a (B, N) array to (B, n), so every step has the same shapes (no retracing)."""
    x = np.asarray(x)
    return np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)


def sample_prompts(task, rng, n):
    """n training prompts drawn with the run's numpy RNG (saved for --resume); repeats allowed."""
    return [task.prompt(task.train_problem(rng)) for _ in range(n)]


def grpo_step(model, tokenizer, task, prompts, cfg, update, reference, timer, reward_fn=None):
    """One GRPO step: rollout, rewards, advantages, inner updates. Returns a metrics dict and rollout rows."""
    reward_fn = reward_fn or task.reward
    G, N = cfg.group_size, cfg.max_new_tokens or task.max_new_tokens
    pad_id = tokenizer.pad_token_id or 0

    with timer("generate"):
        group_prompts = [p for p in prompts for _ in range(G)]  # (P*G,) each prompt G times, groups adjacent
        rollout = generate(model, tokenizer, group_prompts, N, cfg.temperature, chat_template=cfg.chat_template)

    with timer("reward"):
        rewards = np.array([reward_fn(p, c) for p, c in zip(group_prompts, rollout.texts)]).reshape(-1, G)  # (P, G)
        correct = np.array([task.is_correct(p, c) for p, c in zip(group_prompts, rollout.texts)])
        advantages, zero_signal = group_advantages(rewards, cfg.scale_std)
        tokens, mask = completion_batch(  # (B, T), (B, T-1) with T fixed by N
            rollout.prompt_ids, pad_columns(rollout.completion_ids, N, pad_id), pad_columns(rollout.mask, N), pad_id
        )
        advantages = mx.array(advantages.reshape(-1))  # (B,)
        shared_len = min(len(p) for p in rollout.prompt_ids)  # every row's prompt is its group's prompt
        mx.eval(tokens, mask, advantages)

    row = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "grpo/group_reward_std": float(rewards.std(axis=1).mean()),  # the spread the advantages see
        "train/accuracy": float(correct.mean()),
        "policy/completion_len": float(np.asarray(rollout.mask).sum(axis=1).mean()),
        "grpo/zero_signal_frac": float(zero_signal.mean()),
        "grpo/skipped": float(zero_signal.all()),
    }
    samples = [
        {"split": "train", "prompt": p, "completion": c, "reward": float(r), "advantage": float(a)}
        for p, c, r, a in list(zip(group_prompts, rollout.texts, rewards.reshape(-1), np.array(advantages)))[:G]
    ]
    if zero_signal.all():  # no group says which way is better: take no step on noise
        return row, samples

    ref_logprobs = mx.zeros(mask.shape)
    if cfg.beta > 0:
        with timer("reference"):
            ref_logprobs = reference.logprobs(tokens, cfg.temperature)  # (B, T-1), no gradient
            mx.eval(ref_logprobs)

    old_logprobs, per_iter = mx.zeros(mask.shape), []
    for i in range(cfg.inner_iters):
        loss, metrics, grad_norm = update(tokens, mask, advantages, old_logprobs, ref_logprobs, mx.array(i == 0), shared_len,
                                         timer=timer)
        if i == 0:
            old_logprobs = metrics["logprobs"]  # log pi_old: the policy that sampled, before any update
        per_iter.append({k: v.item() for k, v in metrics.items() if k != "logprobs"} | {"optim/grad_norm": grad_norm.item()})

    # One figure per step: the mean over inner iterations, the extremes for ratio_min / ratio_max.
    for k in per_iter[0]:
        values = [m[k] for m in per_iter]
        row[k] = min(values) if k.endswith("_min") else max(values) if k.endswith("_max") else float(np.mean(values))
    return row, samples


# --- the run -----------------------------------------------------------------------


def run_grpo(cfg):
    train.resolve_policy_model(cfg)
    session = train.start("grpo", cfg)
    model, tokenizer, task, run = session.model, session.tokenizer, session.task, session.run
    if cfg.max_new_tokens and cfg.max_new_tokens < task.max_new_tokens:
        print(f"note: --max-new-tokens {cfg.max_new_tokens} is shorter than the task's answer ({task.max_new_tokens})")
    # The starting policy (on --resume reloaded from --model, not from the run's checkpoint); never built at beta = 0.
    reference = train.starting_reference(session) if cfg.beta > 0 else None
    optimizer = train.make_optimizer(cfg.lr, cfg.steps, cfg.warmup)
    train.restore(session, optimizer)
    update = make_update(model, optimizer, cfg)
    heldout = task.prompts("heldout", cfg.eval_prompts, seed=cfg.seed)
    timer = PhaseTimer()
    progress = Progress(cfg.steps, session.start_step, desc="grpo")
    step = session.start_step
    metrics = {}

    def evaluate(step):
        with timer("eval"):
            metrics, samples = train.evaluate(model, tokenizer, task, heldout, cfg.chat_template)
        run.log_samples(step, samples)
        return metrics

    if step == 0:  # where we start from, so the curve has its first point
        metrics = evaluate(0)
        start_accuracy = metrics["eval/accuracy"]
        run.log(0, {**metrics, **timer.pop()})
        print(f"held-out greedy accuracy at start {start_accuracy:.1%}")
    else:
        start_accuracy = next((m["eval/accuracy"] for m in run.metrics() if m["step"] == 0), float("nan"))

    with train.interruptible(session, lambda: (step, optimizer)):
        while step < cfg.steps:
            train.step_seed(cfg, step)  # MLX's sampling RNG from (seed, step): --resume samples the same tokens
            prompts = sample_prompts(task, session.rng, cfg.prompts_per_step)
            row, samples = grpo_step(model, tokenizer, task, prompts, cfg, update, reference, timer)
            step += 1
            row["optim/lr"] = train.current_lr(optimizer)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                metrics = evaluate(step)
                row.update(metrics)
                run.log_samples(step, samples)
                train.save(session, step, optimizer)
            row.update(timer.pop())
            row["perf/peak_memory_gb"] = train.peak_memory_gb()
            run.log(step, row)
            progress.update(step, reward=row["reward/mean"], acc=metrics.get("eval/accuracy", float("nan")))
    progress.close()

    plot_run(run.path)
    times = {}
    for m in run.metrics():
        for k, v in m.items():
            if k.startswith("time/"):
                times[k] = times.get(k, 0.0) + v
    summary = run.write_summary(steps=step, start_accuracy=start_accuracy, **metrics,
                                total_phase_s={k: round(v, 2) for k, v in times.items()},
                                checkpoint=str(run.checkpoint_dir))
    print(f"held-out greedy accuracy {start_accuracy:.1%} -> {metrics['eval/accuracy']:.1%}  ({run.path})")
    return summary


cli = command("grpo", GRPOConfig, run_grpo, help=__doc__.split("\n\n")[0])
