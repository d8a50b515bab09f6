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
final hidden states, not a second value model. A separate value model (a copy
of the policy with a scalar head) would roughly double the forward, backward
and optimizer work of every update (an estimate: not built); the head costs
one dot product per token. The
head is a *probe*: it reads the hidden states that the rollout's scoring pass
computes anyway, and its loss never flows into the transformer. Measured on
the default run, letting the value loss train the shared body (one network,
two heads, as in the Ice Maze's REINFORCE) dragged the fresh critic's errors
into the fragile starting policy: the accuracy of its samples fell from 51% to 0%
within four steps. Because the features are cached, the head can take many cheap
epochs per step (--value-epochs), which is what lets its explained variance
climb. The policy object stays the mlx-lm model it was given (`session.model`),
so its checkpoint is a plain mlx-lm checkpoint; the head and its optimizer
state are saved beside it, in RUN/checkpoint/value_head.safetensors.

Deliberate simplifications:
- One rollout per prompt at temperature 1; no reward model (the task's reward parses the answer).
- Two optimizers, two learning rates: AdamW at --lr for the policy, AdamW at
  --value-lr for the head; the policy and the critic are updated by separate
  losses (no value-loss coefficient is needed when nothing is shared).
- A short value warm-up (--value-warmup steps that train the head only)
  instead of a value model pretrained on the reward.
- The per-token KL in the reward is k1 (log-ratio, mlx_rl.kl), whose expectation
  under the policy is the KL; kl/k3 is reported as the shared, never-negative estimate.
- No entropy bonus; advantages are whitened over the rollout's completion tokens.

Papers: Schulman et al. 2017, Proximal Policy Optimization Algorithms;
Schulman et al. 2016, High-Dimensional Continuous Control Using Generalized
Advantage Estimation; Ziegler et al. 2019, Fine-Tuning Language Models from
Human Preferences (per-token KL in the reward, the adaptive KL controller);
Ouyang et al. 2022 (InstructGPT); Huang et al. 2024, The N+ Implementation
Details of RLHF with PPO.
"""

import dataclasses
import typing

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rl import train
from mlx_rl.config import MlxRlError, command, option
from mlx_rl.kl import k1, k3
from mlx_rl.logprobs import completion_batch, masked_mean
from mlx_rl.plots import plot_run
from mlx_rl.rollout import generate
from mlx_rl.runs import PhaseTimer, Progress, find_checkpoint

VALUE_HEAD_FILE = "value_head.safetensors"


# --- config --------------------------------------------------------------------


@dataclasses.dataclass
class PPOConfig(train.LLMConfig):
    steps: int = option(30, "number of PPO steps (one rollout batch, then epochs of minibatch updates)", min=1)
    rollout_batch: int = option(256, "prompts per step, one sampled completion each", min=1)
    minibatch_size: int = option(64, "completions per gradient update", min=1)
    epochs: int = option(2, "policy passes over the rollout batch per step", min=1)
    clip_eps: float = option(0.2, "policy clip: the ratio pi/pi_old is clipped to [1 - eps, 1 + eps]", above=0.0)
    value_clip: float = option(0.2, "value clip: new values stay within this of the rollout's (0: no clipping)", min=0.0)
    gamma: float = option(1.0, "discount per token", min=0.0, max=1.0)
    gae_lambda: float = option(0.95, "GAE lambda: 1 = Monte-Carlo return minus value, 0 = one-step TD error", min=0.0, max=1.0)
    kl_coef: float = option(0.05, "weight of the per-token KL penalty to the reference in the reward (start value when adaptive)", min=0.0)
    kl_target: typing.Optional[float] = option(None, "adapt kl_coef so the KL per completion approaches this (default: fixed kl_coef)", above=0.0)
    kl_horizon: int = option(10000, "adaptive KL: completions over which kl_coef may change by at most 20%", min=1)
    lr: float = option(1e-4, "policy learning rate (AdamW)", above=0.0)
    value_lr: float = option(3e-3, "value head learning rate (AdamW)", above=0.0)
    value_epochs: int = option(8, "value head passes over the rollout batch per step (cheap: cached features)", min=1)
    value_warmup: int = option(2, "first steps train the value head only (the policy is left as it is)", min=0)
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 over the rollout's tokens")
    temperature: float = option(1.0, "sampling temperature of the rollouts", above=0.0)
    warmup: int = option(0, "linear learning-rate warm-up of the policy, in updates", min=0)
    lr_schedule: str = option("cosine", "policy learning rate after warm-up: constant, or cosine decay to lr/20 by the last update",
                              choices=["constant", "cosine"])
    eval_every: int = option(5, "evaluate held-out greedy accuracy every N steps (0: only at the end)", min=0)

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
        return self.linear(hidden)[..., 0].astype(mx.float32)


def output_layer(model, hidden):
    """The policy's own head: logits from final hidden states (tied embeddings or lm_head)."""
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def policy_forward(model, tokens, temperature=1.0):
    """Per-token log-probs and entropies of tokens[:, 1:], and the hidden states they came from.

    One pass of the transformer body (`model.model`) serves the policy and the
    value head. Returns (B, T-1), (B, T-1), (B, T-1, H).
    """
    hidden = model.model(tokens[:, :-1])  # (B, T-1, H) final-normed hidden states
    logits = output_layer(model, hidden).astype(mx.float32) / temperature  # (B, T-1, V)
    logp_all = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, T-1, V)
    logprobs = mx.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, T-1)
    entropy = -(mx.exp(logp_all) * logp_all).sum(axis=-1)  # (B, T-1)
    return logprobs, entropy, hidden


# --- the maths ---------------------------------------------------------------------


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
    ratio = mx.stop_gradient(ratio)
    metrics = {
        "policy/clipfrac": masked_mean((clipped > unclipped).astype(mx.float32), mask),
        "kl/approx": masked_mean((ratio - 1) - mx.stop_gradient(logratio), mask),  # k3 of old vs new
        "policy/ratio_mean": masked_mean(ratio, mask),
        "policy/ratio_min": mx.where(mask > 0, ratio, mx.inf).min(),
        "policy/ratio_max": mx.where(mask > 0, ratio, -mx.inf).max(),
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


def adapt_kl_coef(kl_coef, kl, kl_target, n, horizon):
    """Ziegler et al.'s proportional controller: move kl_coef toward the KL target, at most 20% per horizon."""
    error = min(max(kl / kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / horizon)


# --- the two losses the update steps differentiate ----------------------------------


def make_policy_loss(clip_eps, temperature):
    def loss_fn(model, tokens, mask, old_logprobs, advantages):
        logprobs, entropy, _ = policy_forward(model, tokens, temperature)  # (B, T-1) x 2
        loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
        return loss, {**metrics, "policy/entropy": masked_mean(entropy, mask)}

    return loss_fn


def make_value_loss(value_clip):
    def loss_fn(value_head, features, mask, old_values, returns):
        return value_loss(value_head(features), old_values, returns, mask, value_clip)  # features: (B, T-1, H)

    return loss_fn


# --- one step ------------------------------------------------------------------------


def minibatches(rng, n, size):
    """Shuffled index arrays of `size` rows; the last, partial one is dropped."""
    perm = rng.permutation(n)
    return [mx.array(perm[i : i + size]) for i in range(0, n - size + 1, size)]


def score_rollout(policy, value_head, tokens, chunks, temperature):
    """Old log-probs, values and the hidden states (the value head's features), teacher-forced
    chunk by chunk in the same shapes the first policy epoch will use, so its ratio is exactly 1."""
    logprobs, values, features = [], [], []
    for idx in chunks:
        lp, _, hidden = policy_forward(policy, tokens[idx], temperature)
        logprobs.append(lp)
        values.append(value_head(hidden))
        features.append(hidden)
    order = mx.argsort(mx.concatenate(chunks))  # back to rollout order
    return tuple(mx.concatenate(x, axis=0)[order] for x in (logprobs, values, features))


def ppo_step(cfg, session, value_head, reference, update_policy, update_value, kl_coef, step, timer):
    """Rollout, rewards, advantages, then epochs of minibatch updates. Returns the step's metrics."""
    policy, tokenizer, task, rng = session.model, session.tokenizer, session.task, session.rng
    with timer("generate"):
        prompts = task.prompts("train", cfg.rollout_batch, seed=int(rng.integers(2**31)))
        rollout = generate(policy, tokenizer, prompts, task.max_new_tokens, cfg.temperature, chat_template=cfg.chat_template)
    with timer("reward"):
        scores = mx.array([task.reward(p, c) for p, c in zip(rollout.prompts, rollout.texts)])  # (B,)
        correct = np.array([task.is_correct(p, c) for p, c in zip(rollout.prompts, rollout.texts)])
        tokens, mask = completion_batch(rollout.prompt_ids, rollout.completion_ids, rollout.mask, tokenizer.pad_token_id or 0)
        mx.eval(scores, tokens, mask)
    B = tokens.shape[0]
    first_epoch = minibatches(rng, B, cfg.minibatch_size)
    in_first = set(np.array(mx.concatenate(first_epoch)).tolist())
    rest = [i for i in range(B) if i not in in_first]  # rows no full minibatch took
    with timer("score"):  # log-probs and values of the rollout before any update: pi_old and V_old
        old_logprobs, old_values, features = score_rollout(
            policy, value_head, tokens, first_epoch + ([mx.array(rest)] if rest else []), cfg.temperature
        )
        mx.eval(old_logprobs, old_values, features)
    with timer("reference"):
        ref_logprobs = reference.logprobs(tokens, cfg.temperature) if reference is not None else old_logprobs  # (B, T-1)
        logr = ref_logprobs - old_logprobs  # (B, T-1) log pi_ref - log pi
        mx.eval(logr)
    with timer("advantages"):
        kl_per_token = k1(logr)  # (B, T-1)
        rewards = token_rewards(scores, kl_per_token, mask, kl_coef)  # (B, T-1)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
        adv_mean = masked_mean(advantages, mask)
        stats = {
            "value/explained_variance": explained_variance(old_values, returns, mask),
            "value/mean": masked_mean(old_values, mask),
            "value/return_mean": masked_mean(returns, mask),
            "value/advantage_mean": adv_mean,
            "value/advantage_std": mx.sqrt(masked_mean((advantages - adv_mean) ** 2, mask)),
            "kl/k3": masked_mean(k3(logr), mask),  # per token
            "kl/k1": masked_mean(kl_per_token, mask),
            "kl/sequence": (kl_per_token * mask).sum() / B,  # per completion: what --kl-target aims at
        }
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        mx.eval(advantages, returns, stats)

    sums, counts = {}, {}
    ratio_min, ratio_max = float("inf"), float("-inf")

    def add(metrics):
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1

    if step >= cfg.value_warmup:  # the policy: clipped steps on shuffled minibatches, several epochs
        for epoch in range(cfg.epochs):
            for idx in first_epoch if epoch == 0 else minibatches(rng, B, cfg.minibatch_size):
                loss, metrics, grad_norm = update_policy(tokens[idx], mask[idx], old_logprobs[idx], advantages[idx], timer=timer)
                metrics = {k: v.item() for k, v in metrics.items()}
                ratio_min, ratio_max = min(ratio_min, metrics.pop("policy/ratio_min")), max(ratio_max, metrics.pop("policy/ratio_max"))
                add({**metrics, "loss/policy": loss.item(), "optim/grad_norm": grad_norm.item()})
    value_timer = PhaseTimer()  # its forward/backward/optimizer seconds are reported as one phase
    for _ in range(cfg.value_epochs):  # the critic: regression on cached features, cheap
        for idx in minibatches(rng, B, cfg.minibatch_size):
            loss, metrics, _ = update_value(features[idx], mask[idx], old_values[idx], returns[idx], timer=value_timer)
            add({"loss/value": loss.item(), "value/clipfrac": metrics["value/clipfrac"].item()})

    row = {k: v.item() for k, v in stats.items()}
    row.update({k: sums[k] / counts[k] for k in sums})
    lengths = np.array(rollout.lengths)
    row.update({
        "reward/mean": float(np.array(scores).mean()),
        "reward/std": float(np.array(scores).std()),
        "train/accuracy": float(correct.mean()),
        "policy/completion_len": float(lengths.mean()),
        "kl/coef": kl_coef,
        "time/value_s": sum(value_timer.pop().values()),
    })
    if ratio_min != float("inf"):
        row.update({"policy/ratio_min": ratio_min, "policy/ratio_max": ratio_max})
    return row


# --- checkpoints and the loop ------------------------------------------------------


def value_head_arrays(value_head, value_opt):
    """The head's weights and its optimizer state, for RUN/checkpoint/value_head.safetensors."""
    arrays = dict(tree_flatten(value_head.parameters()))
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(value_opt.state)})
    return arrays


def load_value_head(value_head, value_opt, ckpt):
    path = ckpt / VALUE_HEAD_FILE
    if not path.exists():
        raise MlxRlError(f"cannot resume: {path} is missing (the value head is saved beside the policy)")
    arrays = mx.load(str(path))
    prefix = "optimizer."
    value_head.load_weights([(k, v) for k, v in arrays.items() if not k.startswith(prefix)])
    value_opt.state = tree_unflatten([(k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix)])


def run_ppo(cfg):
    train.resolve_policy_model(cfg)
    session = train.start("ppo", cfg)
    policy, tokenizer, task, run = session.model, session.tokenizer, session.task, session.run
    value_head = ValueHead(policy.args.hidden_size)
    updates = cfg.steps * cfg.epochs * (cfg.rollout_batch // cfg.minibatch_size)
    policy_updates = max(cfg.steps - cfg.value_warmup, 1) * cfg.epochs * (cfg.rollout_batch // cfg.minibatch_size)
    policy_opt = train.make_optimizer(cfg.lr, policy_updates, cfg.warmup, schedule=cfg.lr_schedule)
    value_opt = train.make_optimizer(cfg.value_lr, updates)
    train.restore(session, policy_opt)
    if session.trainer_state is not None:
        load_value_head(value_head, value_opt, find_checkpoint(run.path))
    mx.eval(value_head.parameters())

    # The reference is the starting policy (on --resume too); kl_coef 0 never evaluates it.
    reference = train.starting_reference(session) if cfg.kl_coef > 0 else None

    update_policy = train.make_update(policy, policy_opt, make_policy_loss(cfg.clip_eps, cfg.temperature), cfg.max_grad_norm, cfg.compile)
    update_value = train.make_update(value_head, value_opt, make_value_loss(cfg.value_clip), cfg.max_grad_norm, cfg.compile)

    heldout = task.prompts("heldout", cfg.eval_prompts, seed=cfg.seed)
    timer = PhaseTimer()
    progress = Progress(cfg.steps, session.start_step, every=max(1, cfg.steps // 20), desc="ppo")
    step = session.start_step
    kl_coef = (session.trainer_state or {}).get("kl_coef", cfg.kl_coef)
    state = lambda: {"extra_state": {"kl_coef": kl_coef}, "extra_arrays": {VALUE_HEAD_FILE: value_head_arrays(value_head, value_opt)}}  # noqa: E731
    metrics = {}

    if step == 0:  # the starting point, so every run shows its own before/after figure
        with timer("eval"):
            metrics, samples = train.evaluate(policy, tokenizer, task, heldout, cfg.chat_template)
        run.log_samples(0, samples)
        run.log(0, {**metrics, **timer.pop()})
        start_accuracy = metrics["eval/accuracy"]
    else:
        start_accuracy = next((m["eval/accuracy"] for m in run.metrics() if m["step"] == 0 and "eval/accuracy" in m), float("nan"))

    with train.interruptible(session, lambda: (step, policy_opt, state())):
        while step < cfg.steps:
            row = ppo_step(cfg, session, value_head, reference, update_policy, update_value, kl_coef, step, timer)
            step += 1
            if cfg.kl_target is not None and reference is not None:
                kl_coef = adapt_kl_coef(kl_coef, row["kl/sequence"], cfg.kl_target, cfg.rollout_batch, cfg.kl_horizon)
            row["optim/lr"] = train.current_lr(policy_opt)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                with timer("eval"):
                    metrics, samples = train.evaluate(policy, tokenizer, task, heldout, cfg.chat_template)
                row.update(metrics)
                run.log_samples(step, samples)
                train.save(session, step, policy_opt, **state())
            row.update(timer.pop())
            row["perf/peak_memory_gb"] = train.peak_memory_gb()
            run.log(step, row)
            progress.update(step, reward=row["reward/mean"], ev=row["value/explained_variance"], acc=metrics.get("eval/accuracy", float("nan")))
    progress.close()

    plot_run(run.path)
    rows = run.metrics()
    phases = {k: round(sum(r.get(k, 0.0) for r in rows), 2) for k in sorted({k for r in rows for k in r if k.startswith("time/")})}
    summary = run.write_summary(steps=step, start_accuracy=start_accuracy, **metrics, phase_seconds=phases, checkpoint=str(run.checkpoint_dir))
    print(f"held-out greedy accuracy {start_accuracy:.1%} -> {metrics['eval/accuracy']:.1%} in {summary['wall_s']:.0f}s  ({run.path})")
    return summary


cli = command("ppo", PPOConfig, run_ppo, help=__doc__.split("\n\n")[0])
