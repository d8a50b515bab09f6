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
- One rollout per prompt at temperature 1; the task's reward parses the answer (--reward-model: a learned
  reward instead, the chapter "Reward models and RLHF").
- Two optimizers, two learning rates: AdamW at --lr for the policy, AdamW at
  --value-lr for the head; the policy and the critic are updated by separate
  losses (no value-loss coefficient is needed when nothing is shared).
- A short value warm-up (--value-warmup steps that train the head only)
  instead of a value model pretrained on the reward.
- The per-token KL in the reward is k1 (log-ratio, mlx_rl/chapters/kl.py), whose expectation
  under the policy is the KL; kl/k3 is reported as the shared, never-negative estimate.
- No entropy bonus; advantages are whitened over the rollout's completion tokens.

Papers: Schulman et al. 2017, Proximal Policy Optimization Algorithms;
Schulman et al. 2016, High-Dimensional Continuous Control Using Generalized
Advantage Estimation; Ziegler et al. 2019, Fine-Tuning Language Models from
Human Preferences (per-token KL in the reward, the adaptive KL controller);
Ouyang et al. 2022 (InstructGPT); Huang et al. 2024, The N+ Implementation
Details of RLHF with PPO.
"""

import contextlib
import dataclasses
import typing

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_rl.chapters.grpo import StalePolicy, completion_width, episode_metrics, episode_signals, pad_columns
from mlx_rl.chapters.grpo_family import CorrectionConfig, PassAtKConfig, approx_kl, is_metrics, is_weights, pass_at_k_details
from mlx_rl.chapters.kl import k1, k3
from mlx_rl.chapters.reward_model import LearnedRewardConfig, attach_reward_model
from mlx_rl.config import MlxRlError, command, option
from mlx_rl.engine import loop
from mlx_rl.engine.evaluate import score_rows
from mlx_rl.engine.logprobs import completion_batch, masked, masked_mean, token_logprobs
from mlx_rl.engine.episodes import play
from mlx_rl.engine.sampling import generate, row_keys
from mlx_rl.engine.session import LLMConfig, MemoryConfig, batch_check, resolve_policy_model, start
from mlx_rl.engine.update import current_lr
from mlx_rl.runs import PhaseTimer

VALUE_HEAD_FILE = "value_head.safetensors"


# --- config --------------------------------------------------------------------


@dataclasses.dataclass
class PPOConfig(LLMConfig, MemoryConfig, PassAtKConfig, CorrectionConfig, LearnedRewardConfig):
    steps: int = option(30, "number of training steps (one rollout batch, then epochs of minibatch updates)", min=1,
                        resumable=True)
    rollout_batch: int = option(256, "prompts per step, one sampled completion each", min=1)
    minibatch_size: int = option(64, "completions per gradient update", min=1)
    epochs: int = option(2, "passes over each batch of collected data (the policy's, over the rollout batch)", min=1)
    clip_eps: float = option(0.2, "clip of the policy ratio: pi/pi_old is clipped to [1 - eps, 1 + eps]", above=0.0)
    value_clip: float = option(0.2, "value clip: new values stay within this of the rollout's (0: no clipping)", min=0.0)
    gamma: float = option(1.0, "discount factor, per token", min=0.0, max=1.0)
    gae_lambda: float = option(0.95, "GAE lambda: 1 = Monte-Carlo return minus value, 0 = one-step TD error", min=0.0, max=1.0)
    kl_coef: float = option(0.05, "weight of the KL penalty to the reference (per token, in the reward; the start value when "
                            "adaptive)", min=0.0)
    kl_target: typing.Optional[float] = option(None, "adapt kl_coef so the KL per completion approaches this (default: "
                                               "fixed kl_coef)", above=0.0)
    kl_horizon: int = option(10000, "adaptive KL: completions over which kl_coef may change by at most 20%", min=1)
    lr: float = option(1e-4, "learning rate of the policy (AdamW)", above=0.0, resumable=True)
    value_lr: float = option(3e-3, "value head learning rate (AdamW)", above=0.0, resumable=True)
    value_epochs: int = option(8, "value head passes over the rollout batch per step (cheap: cached features)", min=1)
    value_warmup: int = option(2, "first steps train the value head only (the policy is left as it is)", min=0)
    rollout_staleness: int = option(0, "sample each step's rollouts with the policy of K steps ago, as an asynchronous "
                                    "trainer does (a copy of the trainable weights is kept; 0: the current policy). "
                                    "The value head and the update use the current weights", min=0)
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 over the rollout's tokens")
    temperature: float = option(1.0, "sampling temperature of the rollouts", above=0.0)
    max_new_tokens: int = option(0, "longest completion (0: the task's answer length + EOS; 64 with --data)", min=0)
    warmup: int = option(0, "linear learning-rate warm-up steps (the policy's, after --value-warmup)", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay (the policy's)", min=0.0)
    lr_schedule: str = option("cosine", "learning rate after warm-up: constant, or cosine decay to lr/20 (the policy's, "
                              "by the last step)", choices=["constant", "cosine"])
    eval_every: int = option(5, "evaluate on held-out data every N steps: greedy accuracy (0: only at the start and the end)",
                             min=0, resumable=True)

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


# --- the maths ---------------------------------------------------------------------


def token_rewards(scores_at, kl, mask, kl_coef):
    """r_t = -kl_coef * kl_t on the model's tokens, plus the task's reward where it was given. (B, T) each.

    scores_at: the rewards laid out on the tokens that earned them: one completion's score on its last
    token (`last_token_rewards`); an episode's turn rewards on the last token of each turn.
    """
    return (-kl_coef * kl + scores_at) * mask


def last_token_rewards(scores, mask):
    """A completion's score on its last token. (B,), (B, T) -> (B, T)"""
    last = mask * (1 - mx.concatenate([mask[:, 1:], mx.zeros_like(mask[:, :1])], axis=1))  # (B, T) 1 at the last token
    return scores[:, None] * last


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, backwards over each row's model tokens. (B, T) each.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1}, where t + 1 is
    the row's next *model* token: positions with mask 0 (the prompt, padding, and in an episode the
    environment's tokens) are skipped, the running value and advantage passing through them
    unchanged. Past the last token (EOS, the length limit, the episode's end) V and A are 0.
    Returns (advantages, returns = A + V), 0 where mask is 0.
    """
    next_value = mx.zeros_like(values[:, 0])  # (B,)
    next_adv = mx.zeros_like(values[:, 0])  # (B,)
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        here = mask[:, t] > 0
        next_adv = mx.where(here, delta + gamma * lam * next_adv, next_adv)  # the Ice Maze's running return, minus V
        next_value = mx.where(here, values[:, t], next_value)
        out.append(next_adv * mask[:, t])
    advantages = mx.stack(out[::-1], axis=1)  # (B, T)
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked positions; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * mx.rsqrt(var + eps) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, n_tokens=None, is_weight=None):
    """PPO's clipped surrogate, mean over completion tokens. (B, T) each -> (loss, metrics).

    n_tokens: the minibatch's token count over all ranks (default: this batch's), so that
    each rank's loss is its share of the global mean.
    is_weight: (B, T) the sampler correction's weight of each token's term (--is-correction), or None.
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    logprobs, old_logprobs, advantages = (masked(x, mask) for x in (logprobs, old_logprobs, advantages))
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = mx.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * mx.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    share = lambda x: masked(x, mask).sum() / n_tokens  # noqa: E731
    surrogate = mx.maximum(unclipped, clipped)  # pessimistic: the worse of the two
    loss = share(surrogate if is_weight is None else surrogate * is_weight)
    ratio = mx.stop_gradient(ratio)
    metrics = {
        "policy/clipfrac": share((clipped > unclipped).astype(mx.float32)),
        "kl/approx": share(approx_kl(log_ratio, ratio)),  # KL(pi_old || pi), as in every chapter
        "policy/ratio_mean": share(ratio),
        "policy/ratio_min": mx.where(mask > 0, ratio, mx.inf).min(),
        "policy/ratio_max": mx.where(mask > 0, ratio, -mx.inf).max(),
    }
    return loss, metrics


def value_loss(values, old_values, returns, mask, value_clip, n_tokens=None):
    """0.5 (V - R)^2, pessimistically clipped so V moves at most value_clip from the rollout's. (B, T) each.

    n_tokens: the minibatch's token count over all ranks (default: this batch's).
    """
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    values, old_values, returns = (masked(x, mask) for x in (values, old_values, returns))
    error = (values - returns) ** 2  # (B, T)
    if value_clip > 0:
        clipped = old_values + mx.clip(values - old_values, -value_clip, value_clip)
        clipped_error = (clipped - returns) ** 2
        clipfrac = masked((clipped_error > error).astype(mx.float32), mask).sum() / n_tokens
        error = mx.maximum(error, clipped_error)
    else:
        clipfrac = mx.array(0.0)
    return 0.5 * masked(error, mask).sum() / n_tokens, {"value/clipfrac": clipfrac}


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
    def loss_fn(model, tokens, mask, old_logprobs, advantages, n_tokens, is_weight=None):
        logprobs, entropy = token_logprobs(model, tokens, temperature)  # (B, T-1) x 2
        loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, n_tokens, is_weight)
        return loss, {**metrics, "policy/entropy": masked(mx.stop_gradient(entropy), mask).sum() / n_tokens}

    return loss_fn


def make_value_loss(value_clip):
    def loss_fn(value_head, features, mask, old_values, returns, n_tokens):
        return value_loss(value_head(features), old_values, returns, mask, value_clip, n_tokens)  # features: (B, T-1, H)

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
        lp, _, hidden = token_logprobs(policy, tokens[idx], temperature, return_hidden=True)
        logprobs.append(lp)
        values.append(value_head(hidden))
        features.append(hidden)
    order = mx.argsort(mx.concatenate(chunks))  # back to the order of the rows scored
    return tuple(mx.concatenate(x, axis=0)[order] for x in (logprobs, values, features))


def ppo_step(cfg, session, value_head, update_policy, update_value, kl_coef, step, max_new_tokens, stale=None):
    """Rollout, rewards, advantages, then epochs of minibatch updates. Returns the step's metrics.

    stale: a StalePolicy (--rollout-staleness, grpo.py); the rollout is sampled with its weights.

    Data-parallel: each rank samples its share of the prompts, then every rank holds the
    whole rollout (world.gather_rows), and each minibatch is split across the ranks, so
    the minibatches are the single-process ones.
    """
    policy, tokenizer, task, rng, timer, world = (session.model, session.tokenizer, session.task, session.rng,
                                                  session.timer, session.world)
    rows = task.train_rows(np.random.default_rng([int(rng.integers(2**31)), 0]), cfg.rollout_batch, distinct=True)
    keys = row_keys(len(rows), world)
    mine = world.shard(rows)
    pad_id = tokenizer.pad_token_id or 0
    env = getattr(task, "env", None)
    with timer("generate"), stale.sampling() if stale is not None else contextlib.nullcontext():
        if env is not None:  # a task with an environment: one episode per prompt (engine/episodes.py)
            rollout = play(policy, tokenizer, mine, env, cfg.temperature, chat_template=cfg.chat_template, keys=keys)
        else:
            rollout = generate(policy, tokenizer, mine, max_new_tokens, cfg.temperature,
                               chat_template=cfg.chat_template, keys=keys)
    with timer("reward"):
        scored = rollout.episodes.scores() if env is not None else score_rows(task, mine, rollout.texts, training=True)
        width = completion_width(rollout, rollout.completion_ids.shape[1])  # an episode's: rounded up, fewer retraces
        completion_ids, completion_mask, present = (pad_columns(x, width) for x in (
            rollout.completion_ids, rollout.mask, rollout.present))
        tokens, mask, sampler_logprobs = completion_batch(rollout.prompt_ids, completion_ids, completion_mask, pad_id,
                                                          values=pad_columns(rollout.logprobs, width), present=present)
        if env is not None:  # each turn's reward on the last token of that turn
            _, _, scores_at = completion_batch(rollout.prompt_ids, completion_ids, completion_mask, pad_id,
                                               values=pad_columns(rollout.episodes.turn_rewards, width), present=present)
        else:
            scores_at = last_token_rewards(mx.array(scored.total), mask)
        tokens, mask, sampler_logprobs, scores_at = (world.gather_rows(tokens, pad_id), world.gather_rows(mask),
                                                     world.gather_rows(sampler_logprobs), world.gather_rows(scores_at))
        mx.eval(scores_at, tokens, mask, sampler_logprobs)
    B = tokens.shape[0]
    first_epoch = minibatches(rng, B, cfg.minibatch_size)
    taken = np.zeros(B, dtype=bool)
    taken[np.array(mx.concatenate(first_epoch))] = True
    rest = np.flatnonzero(~taken)  # rows no full minibatch took
    chunks = [world.shard(idx) for idx in first_epoch + ([mx.array(rest)] if len(rest) else [])]
    with timer("score"):  # log-probs and values of the rollout before any update: pi_old and V_old
        old_logprobs, old_values, features = score_rollout(policy, value_head, tokens, chunks, temperature=cfg.temperature)
        if cfg.kl_coef > 0:
            ref_logprobs = mx.concatenate([session.reference.logprobs(tokens[idx], cfg.temperature) for idx in chunks])
            ref_logprobs = ref_logprobs[mx.argsort(mx.concatenate(chunks))]
        else:
            ref_logprobs = old_logprobs
        # every rank scored its share of each minibatch (returned sorted by row): rollout order, on every rank
        order = mx.argsort(world.gather_rows(mx.sort(mx.concatenate(chunks))))
        old_logprobs, old_values, features, ref_logprobs = (
            world.gather_rows(x)[order] for x in (old_logprobs, old_values, features, ref_logprobs))
        old_logprobs = masked(old_logprobs, mask)
        mx.eval(old_logprobs, old_values, features, ref_logprobs)
    with timer("advantages"):
        logr = masked(ref_logprobs - old_logprobs, mask)  # (B, T-1) log pi_ref - log pi
        kl_per_token = k1(logr)  # (B, T-1)
        rewards = token_rewards(scores_at, kl_per_token, mask, kl_coef)  # (B, T-1)
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
            "kl/sequence": masked(kl_per_token, mask).sum() / B,  # per completion: what --kl-target aims at
            "policy/sampler_mismatch": masked_mean(mx.abs(sampler_logprobs - old_logprobs), mask),
        }
        weights = None
        if cfg.is_correction != "none":  # pi_old / pi_sampler per token (or sequence), truncated or masked
            weights, cut = is_weights(old_logprobs, sampler_logprobs, mask, cfg.is_correction, cfg.is_cap)
            stats.update(is_metrics(weights, cut, mask, mask.sum()))
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
                n_tokens = mask[idx].sum()  # the whole minibatch's: each rank's loss is its share
                idx = world.shard(idx)
                correction = () if weights is None else (weights[idx],)
                loss, metrics, grad_norm = update_policy(tokens[idx], mask[idx], old_logprobs[idx], advantages[idx], n_tokens,
                                                         *correction)
                metrics = world.reduce_metrics({k: v.item() for k, v in metrics.items()})
                ratio_min, ratio_max = min(ratio_min, metrics.pop("policy/ratio_min")), max(ratio_max, metrics.pop("policy/ratio_max"))
                add({**metrics, "loss/policy": loss.item(), "optim/grad_norm": grad_norm.item()})
    for _ in range(cfg.value_epochs):  # the critic: regression on cached features, cheap (timed as time/value_s)
        for idx in minibatches(rng, B, cfg.minibatch_size):
            n_tokens = mask[idx].sum()
            idx = world.shard(idx)
            loss, metrics, _ = update_value(features[idx], mask[idx], old_values[idx], returns[idx], n_tokens)
            add({"loss/value": loss.item(), **world.reduce_metrics({"value/clipfrac": metrics["value/clipfrac"].item()})})

    row = {k: v.item() for k, v in stats.items()}
    row.update({k: sums[k] / counts[k] for k in sums})
    all_scores = world.gather(np.asarray(scored.total))
    row.update({
        "reward/mean": float(all_scores.mean()),
        "reward/std": float(all_scores.std()),
        **{f"reward/{name}": float(np.nanmean(world.gather(scored.per_reward[name]))) for name in scored.names},
        "policy/completion_len": float(masked(mx.ones_like(mask), mask).sum().item() / B),
        "perf/tokens": float(world.sum(np.array([float(rollout.n_tokens())]))[0]),
        "kl/coef": kl_coef,
    })
    if (task.training_rewards or task.rewards).is_verifier():
        row["train/accuracy"] = row[f"reward/{scored.names[0]}"]
    if rollout.episodes is not None:
        row.update(episode_metrics(world, rollout))
    if ratio_min != float("inf"):
        row.update({"policy/ratio_min": ratio_min, "policy/ratio_max": ratio_max})
    return row


# --- the run ---------------------------------------------------------------------------


def value_head_weights(value_head):
    return dict(tree_flatten(value_head.parameters()))


def load_value_head(value_head, ckpt):
    path = ckpt / VALUE_HEAD_FILE
    if not path.exists():
        raise MlxRlError(f"cannot resume: {path} is missing (the value head is saved beside the policy)")
    value_head.load_weights(list(mx.load(str(path)).items()))


def train(cfg):
    resolve_policy_model(cfg)
    session = start("ppo", cfg, precheck=batch_check(cfg.rollout_batch, cfg.max_new_tokens,
                                                     f"--rollout-batch {cfg.rollout_batch}", cfg.micro_batch))
    policy, task = session.model, session.task
    N = cfg.max_new_tokens or task.max_new_tokens
    attach_reward_model(session, cfg, N)  # --reward-model: train on the learned reward (reward_model.py)
    value_head = ValueHead(policy.args.hidden_size)
    if session.checkpoint is not None:
        load_value_head(value_head, session.checkpoint)
    mx.eval(value_head.parameters())
    per_step = cfg.epochs * (cfg.rollout_batch // cfg.minibatch_size)
    policy_opt = session.optimizer(cfg.lr, max(cfg.steps - cfg.value_warmup, 1), cfg.warmup, cfg.weight_decay,
                                   cfg.lr_schedule, name="policy", updates_per_step=per_step)
    value_opt = session.optimizer(cfg.value_lr, cfg.steps, name="value", updates_per_step=per_step)
    update_policy = session.update_step(make_policy_loss(cfg.clip_eps, cfg.temperature), policy_opt)
    value_timer = PhaseTimer()
    update_value = session.update_step(make_value_loss(cfg.value_clip), value_opt, model=value_head, timer=value_timer)
    state = {"kl_coef": session.chapter_state.get("kl_coef", cfg.kl_coef)}  # the adaptive controller's, saved
    stale = StalePolicy(policy, cfg.rollout_staleness, session.checkpoint)

    def step(i):
        stale.start_step()
        row = ppo_step(cfg, session, value_head, update_policy, update_value, state["kl_coef"], i, N, stale)
        row["time/value_s"] = sum(value_timer.pop().values())
        if cfg.kl_target is not None and cfg.kl_coef > 0:
            state["kl_coef"] = adapt_kl_coef(state["kl_coef"], row["kl/sequence"], cfg.kl_target, cfg.rollout_batch,
                                             cfg.kl_horizon)
        row["optim/lr"] = current_lr(policy_opt)
        return row

    return loop.run(session, step, steps=cfg.steps, chapter_state=lambda: dict(state),
                    chapter_arrays=lambda: {VALUE_HEAD_FILE: value_head_weights(value_head), **stale.arrays()},
                    details=pass_at_k_details(session, cfg),  # pass@k of the start now, of the end at the end
                    signals={"reward": "reward/mean", "held-out acc": "eval/accuracy", "KL": "kl/k3",
                             "clip": "policy/clipfrac", "explained variance": "value/explained_variance",
                             **(episode_signals(task) if getattr(task, "env", None) else {})})


cli = command("ppo", PPOConfig, train, help=__doc__.split("\n\n")[0])
