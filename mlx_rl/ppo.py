"""Chapter "PPO": proximal policy optimisation with a learned value function, the classic RLHF recipe.

What it teaches: the Ice Maze's return, value and advantage, now on an LLM. A
completion is a token-level episode: each sampled token is an action, the
prompt plus the tokens so far is the state, and the episode ends at EOS (or at
the length limit). The rewards of that episode are

    r_t = -kl_coef * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))   at every completion token
        + the task's reward                                     at the last token,

so the KL penalty that keeps the policy near its frozen reference is simply
part of the return. A value head predicts, at every completion token, the
return from there, V(s_t). Generalised advantage estimation (GAE) turns
rewards and values into advantages: with lambda = 1 they are the Ice Maze's
"return minus baseline", with lambda = 0 the one-step TD error. The policy then
takes several epochs of clipped-ratio steps over shuffled minibatches of the
rollout, and the value head a clipped regression onto the returns.

The value head: a Linear(hidden, 1) (`ValueHead`) reading the policy's own
final hidden states, not a second value model. It costs one extra matrix-vector
product per token instead of a second transformer (a separate value model
doubles the forward, backward and optimizer work of every update: measured in
docs/ppo.md), and the policy object stays the mlx-lm model it was given
(`session.model`), so its checkpoint is a plain mlx-lm checkpoint; the head is
saved beside it as RUN/checkpoint/value_head.safetensors. By default the value
loss does not flow into the shared transformer body (`--value-grad-body` turns
that on): the value head is a probe on the policy's features, so a freshly
initialised critic cannot push the fragile starting policy around, and the
policy is changed by its policy loss alone.

Deliberate simplifications:
- One rollout per prompt at temperature 1; no reward model (the task's reward parses the answer).
- Policy and value head are updated in one backward pass of one loss
  (policy loss + value_coef * value loss) through an `optim.MultiOptimizer`:
  AdamW at --lr for the policy, AdamW at --value-lr for the fresh head.
- A short value warm-up (--value-warmup steps that update the value head only)
  instead of a value model pretrained on the reward.
- The per-token KL in the reward is k1 (log-ratio), whose expectation under
  the policy is the KL; kl/k3 is reported as the shared, always-positive estimate.
- No entropy bonus; advantages are whitened over the rollout's completion tokens.

Papers: Schulman et al. 2017, Proximal Policy Optimization Algorithms;
Schulman et al. 2016, High-Dimensional Continuous Control Using Generalized
Advantage Estimation; Ziegler et al. 2019, Fine-Tuning Language Models from
Human Preferences (per-token KL in the reward, the adaptive KL controller);
Ouyang et al. 2022 (InstructGPT); Huang et al. 2024, The N+ Implementation
Details of RLHF with PPO.
"""

import dataclasses
import math
import typing

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_rl import train
from mlx_rl.config import MlxRlError, command, option
from mlx_rl.logprobs import completion_batch, masked_mean
from mlx_rl.models import load_model
from mlx_rl.plots import plot_run
from mlx_rl.rollout import generate
from mlx_rl.runs import PhaseTimer, Progress, find_checkpoint

VALUE_HEAD_FILE = "value_head.safetensors"


# --- config --------------------------------------------------------------------


@dataclasses.dataclass
class PPOConfig(train.LLMConfig):
    steps: int = option(60, "number of PPO steps (one rollout batch, then epochs of minibatch updates)", min=1)
    rollout_batch: int = option(256, "prompts per step, one sampled completion each", min=1)
    minibatch_size: int = option(64, "completions per gradient update", min=1)
    epochs: int = option(2, "passes over the rollout batch per step", min=1)
    clip_eps: float = option(0.2, "policy clip: the ratio pi/pi_old is clipped to [1 - eps, 1 + eps]", above=0.0)
    value_clip: float = option(0.2, "value clip: new values stay within this of the rollout's (0: no clipping)", min=0.0)
    gamma: float = option(1.0, "discount per token", min=0.0, max=1.0)
    gae_lambda: float = option(0.95, "GAE lambda: 1 = Monte-Carlo return minus value, 0 = one-step TD error", min=0.0, max=1.0)
    kl_coef: float = option(0.05, "weight of the per-token KL penalty to the reference in the reward (start value when adaptive)", min=0.0)
    kl_target: typing.Optional[float] = option(None, "adapt kl_coef so the KL per completion approaches this (default: fixed kl_coef)", above=0.0)
    kl_horizon: int = option(10000, "adaptive KL: completions over which kl_coef may change by at most 20%", min=1)
    lr: float = option(1e-4, "policy learning rate (AdamW)", above=0.0)
    value_lr: float = option(1e-3, "value head learning rate (AdamW)", above=0.0)
    value_coef: float = option(0.5, "weight of the value loss in the joint loss", min=0.0)
    value_warmup: int = option(3, "first steps train the value head only (the policy is left as it is)", min=0)
    value_grad_body: bool = option(False, "let the value loss train the shared transformer body too")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 over the rollout's tokens")
    temperature: float = option(1.0, "sampling temperature of the rollouts", above=0.0)
    warmup: int = option(0, "linear learning-rate warm-up steps (counted in updates)", min=0)
    eval_every: int = option(10, "evaluate held-out greedy accuracy every N steps (0: only at the end)", min=0)

    def validate(self):
        if self.minibatch_size > self.rollout_batch:
            raise MlxRlError(f"--minibatch-size ({self.minibatch_size}) cannot exceed --rollout-batch ({self.rollout_batch})")


# --- the model: the policy and a value head on its hidden states -----------------


class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state at t: one linear layer, zero-initialised (V = 0 at start)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.linear.weight = mx.zeros_like(self.linear.weight)
        self.linear.bias = mx.zeros_like(self.linear.bias)

    def __call__(self, hidden):  # (B, T, H) -> (B, T)
        return self.linear(hidden)[..., 0]


def output_layer(model, hidden):
    """The policy's own head: logits from final hidden states (tied embeddings or lm_head)."""
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


class PolicyWithValue(nn.Module):
    """The policy (the mlx-lm model, unchanged) and the value head, so one optimizer sees both."""

    def __init__(self, policy, value_grad_body=False):
        super().__init__()
        self.policy = policy
        self.value_head = ValueHead(policy.args.hidden_size)
        self.value_grad_body = value_grad_body

    def __call__(self, tokens, temperature=1.0):
        """Per-token log-probs, entropies and values for tokens[:, 1:], each (B, T-1)."""
        hidden = self.policy.model(tokens[:, :-1])  # (B, T-1, H) one pass of the transformer body
        logits = output_layer(self.policy, hidden).astype(mx.float32) / temperature  # (B, T-1, V)
        logp_all = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, T-1, V)
        logprobs = mx.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, T-1)
        entropy = -(mx.exp(logp_all) * logp_all).sum(axis=-1)  # (B, T-1)
        if not self.value_grad_body:
            hidden = mx.stop_gradient(hidden)  # the critic reads the policy's features, never changes them
        values = self.value_head(hidden).astype(mx.float32)  # (B, T-1): V of the state before token t+1
        return logprobs, entropy, values


# --- the maths ---------------------------------------------------------------------


def k1(logr):
    """log pi - log pi_ref per token (logr = log pi_ref - log pi): KL's unbiased, noisy estimate."""
    return -logr


def k3(logr):
    """exp(logr) - logr - 1 >= 0 (Schulman's low-variance KL estimate). (Inline until mlx_rl.kl is shared.)"""
    return mx.exp(logr) - logr - 1


def token_rewards(scores, kl, mask, kl_coef):
    """r_t = -kl_coef * kl_t on completion tokens, plus the task score on the last one. (B,), (B, T) -> (B, T)"""
    last = mask * (1 - mx.concatenate([mask[:, 1:], mx.zeros_like(mask[:, :1])], axis=1))  # (B, T) 1 at the last token
    return (-kl_coef * kl + scores[:, None] * last) * mask


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, backwards over each row's completion tokens. (B, T) each.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1}.
    Past the last token (EOS or the length limit) V and A are 0, and masked
    positions (prompt, padding) contribute nothing. Returns (advantages, returns = A + V).
    """
    next_value = mx.zeros_like(values[:, 0])  # (B,)
    next_adv = mx.zeros_like(values[:, 0])  # (B,)
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # the Ice Maze's running return, minus V
        next_value = values[:, t] * mask[:, t]
        out.append(next_adv)
    advantages = mx.stack(out[::-1], axis=1)  # (B, T)
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * mx.rsqrt(var + eps) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """PPO's clipped surrogate, mean over completion tokens. (B, T) each -> (loss, metrics)."""
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = mx.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * mx.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(mx.maximum(unclipped, clipped), mask)  # pessimistic: the worse of the two
    big = mx.array(1e9, dtype=ratio.dtype)
    metrics = {
        "policy/clipfrac": masked_mean((clipped > unclipped).astype(mx.float32), mask),
        "kl/approx": masked_mean(mx.stop_gradient((ratio - 1) - logratio), mask),  # k3 of old vs new
        "policy/ratio_mean": masked_mean(mx.stop_gradient(ratio), mask),
        "policy/ratio_min": mx.stop_gradient(mx.where(mask > 0, ratio, big).min()),
        "policy/ratio_max": mx.stop_gradient(mx.where(mask > 0, ratio, -big).max()),
    }
    return loss, metrics


def value_loss(values, old_values, returns, mask, value_clip):
    """0.5 (V - R)^2, pessimistically clipped so V moves at most value_clip from the rollout's. (B, T) each."""
    error = (values - returns) ** 2  # (B, T)
    if value_clip > 0:
        clipped = old_values + mx.clip(values - old_values, -value_clip, value_clip)
        clipped_error = (clipped - returns) ** 2
        clipfrac = masked_mean((clipped_error > error).astype(mx.float32), mask)
        error = mx.maximum(error, clipped_error)
    else:
        clipfrac = mx.array(0.0)
    return 0.5 * masked_mean(error, mask), {"value/clipfrac": clipfrac}


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 for a perfect V, about 0 for a constant one."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1 - var_residual / mx.maximum(var_returns, 1e-12)


def ppo_loss(model, tokens, mask, old_logprobs, old_values, advantages, returns, policy_weight, *, clip_eps, value_clip, value_coef, temperature):
    """The minibatch loss: policy_weight * clipped policy loss + value_coef * clipped value loss."""
    logprobs, entropy, values = model(tokens, temperature)  # (B, T-1) x 3
    pg_loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    v_loss, v_metrics = value_loss(values, old_values, returns, mask, value_clip)
    loss = policy_weight * pg_loss + value_coef * v_loss
    return loss, {**metrics, **v_metrics, "loss/policy": pg_loss, "loss/value": v_loss, "policy/entropy": masked_mean(entropy, mask)}


def adapt_kl_coef(kl_coef, kl, kl_target, n, horizon):
    """Ziegler et al.'s proportional controller: move kl_coef toward the KL target, at most 20% per horizon."""
    error = min(max(kl / kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / horizon)


# --- one step ------------------------------------------------------------------------


def score_rollout(model, tokens, mask, chunks, temperature):
    """Old log-probs and values, teacher-forced in the same minibatch chunks as the first epoch."""
    B, T1 = mask.shape
    old_logprobs, old_values = mx.zeros((B, T1)), mx.zeros((B, T1))
    for idx in chunks:
        logprobs, _, values = model(tokens[idx], temperature)
        old_logprobs[idx] = logprobs
        old_values[idx] = values
    return mx.stop_gradient(old_logprobs), mx.stop_gradient(old_values)


def ppo_step(cfg, session, model, reference, update, kl_coef, step, timer):
    """Rollout, rewards, advantages, then epochs of minibatch updates. Returns the step's metrics."""
    tokenizer, task = session.tokenizer, session.task
    with timer("generate"):
        prompts = task.prompts("train", cfg.rollout_batch, seed=int(session.rng.integers(2**31)))
        rollout = generate(session.model, tokenizer, prompts, task.max_new_tokens, cfg.temperature, chat_template=cfg.chat_template)
    with timer("reward"):
        scores = mx.array([task.reward(p, c) for p, c in zip(rollout.prompts, rollout.texts)])  # (B,)
        correct = np.array([task.is_correct(p, c) for p, c in zip(rollout.prompts, rollout.texts)])
        tokens, mask = completion_batch(rollout.prompt_ids, rollout.completion_ids, rollout.mask, tokenizer.pad_token_id or 0)
        mx.eval(scores, tokens, mask)
    B = tokens.shape[0]
    mb = cfg.minibatch_size
    perms = [mx.array(session.rng.permutation(B)) for _ in range(cfg.epochs)]
    chunks = [[p[i : i + mb] for i in range(0, B - mb + 1, mb)] for p in perms]  # full minibatches only

    with timer("old_logprobs"):
        old_logprobs, old_values = score_rollout(model, tokens, mask, chunks[0] + tail(perms[0], B, mb), cfg.temperature)
        mx.eval(old_logprobs, old_values)
    with timer("reference"):
        if reference is not None:
            ref_logprobs = reference.logprobs(tokens, cfg.temperature)  # (B, T-1)
        else:
            ref_logprobs = old_logprobs
        logr = ref_logprobs - old_logprobs  # (B, T-1)
        mx.eval(logr)
    with timer("advantages"):
        rewards = token_rewards(scores, k1(logr), mask, kl_coef)  # (B, T-1)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        raw_adv = advantages
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        adv_mean = masked_mean(raw_adv, mask)
        row = {
            "value/explained_variance": explained_variance(old_values, returns, mask),
            "value/mean": masked_mean(old_values, mask),
            "value/return_mean": masked_mean(returns, mask),
            "value/advantage_mean": adv_mean,
            "value/advantage_std": mx.sqrt(masked_mean((raw_adv - adv_mean) ** 2, mask)),
            "kl/k3": masked_mean(k3(logr), mask),  # per token
            "kl/k1": masked_mean(k1(logr), mask),
            "kl/sequence": (k1(logr) * mask).sum() / B,  # per completion: what --kl-target aims at
        }
        mx.eval(advantages, returns, row)

    policy_weight = mx.array(0.0 if step < cfg.value_warmup else 1.0)
    sums, n = {}, 0
    ratio_min, ratio_max = float("inf"), float("-inf")
    for epoch_chunks in chunks:
        for idx in epoch_chunks:
            loss, metrics, grad_norm = update(
                tokens[idx], mask[idx], old_logprobs[idx], old_values[idx], advantages[idx], returns[idx], policy_weight, timer=timer
            )
            metrics = {k: v.item() for k, v in metrics.items()}
            ratio_min, ratio_max = min(ratio_min, metrics.pop("policy/ratio_min")), max(ratio_max, metrics.pop("policy/ratio_max"))
            for k, v in {**metrics, "loss/total": loss.item(), "optim/grad_norm": grad_norm.item()}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    row = {k: v.item() for k, v in row.items()}
    row.update({k: v / n for k, v in sums.items()})
    lengths = np.array(rollout.lengths)
    row.update({
        "reward/mean": float(np.array(scores).mean()),
        "reward/std": float(np.array(scores).std()),
        "train/accuracy": float(correct.mean()),
        "policy/ratio_min": ratio_min,
        "policy/ratio_max": ratio_max,
        "policy/completion_len": float(lengths.mean()),
        "kl/coef": kl_coef,
    })
    return row


def tail(perm, B, mb):
    """Rows left over after the full minibatches (scored for the advantage statistics, not trained on this epoch)."""
    start = (B // mb) * mb
    return [perm[start:]] if start < B else []


# --- checkpoints and the loop ------------------------------------------------------


def value_head_arrays(model):
    return {"value_head." + k: v for k, v in tree_flatten(model.value_head.parameters())}


def load_value_head(model, ckpt):
    path = ckpt / VALUE_HEAD_FILE
    if not path.exists():
        raise MlxRlError(f"cannot resume: {path} is missing (the value head is saved beside the policy)")
    weights = mx.load(str(path))
    model.value_head.load_weights([(k[len("value_head."):], v) for k, v in weights.items()])


def make_optimizer(cfg, total_updates):
    """AdamW at --value-lr for the value head, AdamW at --lr for everything else (the policy)."""
    value_opt = train.make_optimizer(cfg.value_lr, total_updates)
    policy_opt = train.make_optimizer(cfg.lr, total_updates, cfg.warmup)
    return optim.MultiOptimizer([value_opt, policy_opt], [lambda path, _: path.startswith("value_head.")]), policy_opt


def run_ppo(cfg):
    train.resolve_policy_model(cfg)
    session = train.start("ppo", cfg)
    tokenizer, task, run = session.tokenizer, session.task, session.run
    model = PolicyWithValue(session.model, cfg.value_grad_body)
    if session.trainer_state is not None:
        load_value_head(model, find_checkpoint(run.path))
    mx.eval(model.parameters())

    reference = None
    if cfg.kl_coef > 0:
        # The reference is the starting policy: on --resume, reload it from --model, not from the checkpoint.
        start_model = session.model if session.start_step == 0 else load_model(cfg.model)[0]
        reference = train.Reference(start_model)

    updates_per_step = cfg.epochs * (cfg.rollout_batch // cfg.minibatch_size)
    optimizer, policy_opt = make_optimizer(cfg, cfg.steps * updates_per_step)
    train.restore(session, optimizer)
    loss_fn = lambda m, *arrays: ppo_loss(m, *arrays, clip_eps=cfg.clip_eps, value_clip=cfg.value_clip, value_coef=cfg.value_coef, temperature=cfg.temperature)  # noqa: E731
    update = train.make_update(model, optimizer, loss_fn, cfg.max_grad_norm, cfg.compile)

    heldout = task.prompts("heldout", cfg.eval_prompts, seed=cfg.seed)
    timer = PhaseTimer()
    progress = Progress(cfg.steps, session.start_step, every=max(1, cfg.steps // 20), desc="ppo")
    step = session.start_step
    kl_coef = (session.trainer_state or {}).get("kl_coef", cfg.kl_coef)
    state = lambda: {"extra_state": {"kl_coef": kl_coef}, "extra_arrays": {VALUE_HEAD_FILE: value_head_arrays(model)}}  # noqa: E731
    metrics = {}

    if step == 0:  # the starting point, so every run shows its own before/after figure
        with timer("eval"):
            metrics, samples = train.evaluate(session.model, tokenizer, task, heldout, cfg.chat_template)
        run.log_samples(0, samples)
        run.log(0, {**metrics, **timer.pop()})
        start_accuracy = metrics["eval/accuracy"]
    else:
        start_accuracy = next((m["eval/accuracy"] for m in run.metrics() if m["step"] == 0 and "eval/accuracy" in m), float("nan"))

    with train.interruptible(session, lambda: (step, optimizer, state())):
        while step < cfg.steps:
            row = ppo_step(cfg, session, model, reference, update, kl_coef, step, timer)
            step += 1
            if cfg.kl_target is not None and reference is not None:
                kl_coef = adapt_kl_coef(kl_coef, row["kl/sequence"], cfg.kl_target, cfg.rollout_batch, cfg.kl_horizon)
            row["optim/lr"] = train.current_lr(policy_opt)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                with timer("eval"):
                    metrics, samples = train.evaluate(session.model, tokenizer, task, heldout, cfg.chat_template)
                row.update(metrics)
                run.log_samples(step, samples)
                train.save(session, step, optimizer, **state())
            row.update(timer.pop())
            row["perf/peak_memory_gb"] = train.peak_memory_gb()
            run.log(step, row)
            progress.update(step, reward=row["reward/mean"], ev=row["value/explained_variance"], acc=metrics.get("eval/accuracy", float("nan")))
    progress.close()

    plot_run(run.path)
    rows = run.metrics()
    phases = {k: sum(r.get(k, 0.0) for r in rows) for k in sorted({k for r in rows for k in r if k.startswith("time/")})}
    summary = run.write_summary(
        steps=step, start_accuracy=start_accuracy, **metrics, phase_seconds={k: round(v, 2) for k, v in phases.items()}, checkpoint=str(run.checkpoint_dir)
    )
    print(f"held-out greedy accuracy {start_accuracy:.1%} -> {metrics['eval/accuracy']:.1%} in {summary['wall_s']:.0f}s  ({run.path})")
    return summary


cli = command("ppo", PPOConfig, run_ppo, help=__doc__.split("\n\n")[0])
