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
    J      = mean_i mean_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - kl_coef KL_it ]
    KL_it  = exp(log r) - log r - 1,  log r = log pi_ref(o_it) - log pi(o_it)    ("k3")

and we minimise -J for a few epochs on the same batch. Sources:
Shao et al. 2024, "DeepSeekMath" (GRPO, eq. 3 and the k3 estimator of eq. 4);
Schulman et al. 2017, "Proximal Policy Optimization" (the clipped objective).
The fixes that followed GRPO (Dr. GRPO, DAPO, GSPO, CISPO, RLOO) are
`--variant`s, each a named choice of the small functions below: see
grpo_family.py and docs/grpo-family.md.

Choices and simplifications, on purpose:
- Zero-signal groups (every completion got the same reward) have advantage
  exactly 0 (masked to 0, since r - mean(r) is not always exactly 0 in floating
  point). They stay in the batch (fixed shapes: no retracing) but push nothing;
  their share is logged as grpo/zero_signal_frac. When *every* group of a step
  is zero-signal the step takes no optimizer update at all (grpo/skipped = 1):
  an Adam step would only replay momentum.
- The "old" log-probs come from the first epoch's own forward pass with the
  gradient stopped: the same numbers bit for bit, so the first ratio is exactly
  1 (a test asserts it), and no extra pass. The sampler's log-probs of the same
  tokens are compared with them every step (policy/sampler_mismatch): a sampler
  and a trainer that disagree (another temperature, a wrong mask) show up there.
- Each epoch is one full-batch step (no minibatches); the temperature-scaled
  distribution is the policy being optimised (the one the rollout sampled
  from); the reference is the starting checkpoint, and with kl_coef = 0 it is
  never built.
"""

import contextlib
import dataclasses

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rl.config import MlxRlError, command, option
from mlx_rl.chapters import grpo_family as family
from mlx_rl.chapters.reward_model import LearnedRewardConfig, attach_reward_model
from mlx_rl.engine import loop
from mlx_rl.engine.evaluate import score_rows
from mlx_rl.engine.logprobs import completion_batch, masked, token_logprobs
from mlx_rl.engine.episodes import play
from mlx_rl.engine.sampling import concat_rollouts, generate, row_keys
from mlx_rl.engine.session import LLMConfig, MemoryConfig, batch_check, resolve_policy_model, start
from mlx_rl.engine.update import current_lr


@dataclasses.dataclass
class GRPOConfig(LLMConfig, MemoryConfig, family.PassAtKConfig, family.VariantConfig, family.CorrectionConfig, LearnedRewardConfig):
    steps: int = option(60, "number of training steps (one rollout batch each)", min=1, resumable=True)
    group_size: int = option(8, "completions sampled per prompt (G)", min=2)
    prompts_per_step: int = option(32, "prompts per step (the batch is prompts_per_step x group_size)", min=1)
    epochs: int = option(2, "passes over each batch of collected data (the rollout batch: GRPO's mu)", min=1, aliases=("inner_iters",))
    kl_coef: float = option(0.04, "weight of the KL penalty to the reference (k3, in the loss; 0: no reference is computed)",
                            min=0.0, aliases=("beta",))
    lr: float = option(1e-4, "learning rate (AdamW); a fresh Adam above ~5e-4 can wreck the checkpoint", above=0.0,
                       resumable=True)
    warmup: int = option(0, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = option("constant", "learning rate after warm-up: constant, or cosine decay to lr/20",
                              choices=["constant", "cosine"])
    temperature: float = option(1.0, "sampling temperature of the rollouts (and of the optimised distribution)", above=0.0)
    max_new_tokens: int = option(0, "longest completion (0: the task's answer length + EOS; 64 with --data)", min=0)
    eval_every: int = option(10, "evaluate on held-out data every N steps: greedy accuracy (0: only at the start and the end)",
                             min=0, resumable=True)
    rollout_staleness: int = option(0, "sample each step's rollouts with the policy of K steps ago, as an asynchronous "
                                    "trainer does (a copy of the trainable weights is kept; 0: the current policy)",
                                    min=0)
    sample_batch: int = option(0, "rows the sampler generates at once, a multiple of --group-size: the step's rows are "
                               "sampled in chunks of this many (a smaller KV cache, the same samples) and trained on "
                               "as one batch (0: all at once)", min=0, resumable=True)

    def validate(self):
        if self.sample_batch % self.group_size:
            raise MlxRlError(f"--sample-batch ({self.sample_batch}) must be a multiple of --group-size "
                             f"({self.group_size}): a group is sampled in one call, its prompt prefilled once")


# --- the step --------------------------------------------------------------------


def make_loss_fn(cfg, variant):
    """loss_fn(model, *arrays) for the update step: the forward pass, then the variant's loss."""

    def loss_fn(model, tokens, mask, advantages, old_logprobs, ref_logprobs, first, n_rows, n_tokens, shared_len=0,
                sampler_logprobs=None):
        # shared_len: the group's rows share their first shared_len tokens (the prompt), run once per group;
        # the positions before shared_len - 1 predict prompt tokens, which the mask drops: not scored at all
        logprobs, entropy = token_logprobs(model, tokens, cfg.temperature, cfg.group_size, shared_len,
                                           skip=max(shared_len - 1, 0))  # (B, T-1) x 2
        logprobs = masked(logprobs, mask)
        # At the first epoch the old policy is the current one: the same numbers, no gradient.
        old_logprobs = mx.stop_gradient(mx.where(first, logprobs, old_logprobs))
        is_weight, is_stats = None, {}
        if sampler_logprobs is not None:  # --is-correction: pi_old / pi_sampler, truncated or masked
            is_weight, cut = family.is_weights(old_logprobs, sampler_logprobs, mask, cfg.is_correction, cfg.is_cap)
            is_stats = family.is_metrics(is_weight, cut, mask, n_tokens)
        loss, metrics = variant.loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cfg.kl_coef, n_rows, n_tokens,
                                     is_weight)
        metrics.update(is_stats)
        metrics["policy/entropy"] = masked(mx.stop_gradient(entropy), mask).sum() / n_tokens
        metrics["logprobs"] = mx.stop_gradient(logprobs)  # (B, T-1): the old log-probs of later epochs
        return loss, metrics

    return loss_fn


def completion_width(rollout, max_new_tokens, bucket=32):
    """The completion's width in the training batch: max_new_tokens for one turn (every step the same shape,
    no retracing); an episode's length varies, so it is rounded up to a multiple of `bucket`."""
    if rollout.episodes is None:
        return max_new_tokens
    return -(-rollout.completion_ids.shape[1] // bucket) * bucket


def group_shared_len(prompt_ids, group_size):
    """How many leading tokens every group's rows share (their prompt; an episode's first observation too,
    where it is the same for the whole group): the part the training pass runs once per group."""
    shared = min(len(p) for p in prompt_ids)
    for g in range(0, len(prompt_ids), group_size):
        first = prompt_ids[g]
        for other in prompt_ids[g + 1 : g + group_size]:
            n = next((i for i, (x, y) in enumerate(zip(first, other)) if x != y), min(len(first), len(other)))
            shared = min(shared, n)
    return shared


def episode_metrics(world, rollout):
    """env/turns, env/episode_reward, env/<counter> (tool_calls, ...) and policy/env_token_frac, over every rank."""
    stats = rollout.episodes
    row = {}
    for name, values in [("turns", stats.turns), ("episode_reward", stats.rewards), ("truncated_frac", stats.truncated),
                         *stats.info.items()]:
        row[f"env/{name}"] = float(world.gather(np.asarray(values, dtype=np.float64)).mean())
    env_tokens = world.sum(np.array([float(rollout.env_mask.sum().item()), float(rollout.present.sum().item())]))
    row["policy/env_token_frac"] = float(env_tokens[0] / max(env_tokens[1], 1.0))  # the share of tokens never trained
    return row


def pad_columns(x, n, value=0):
    """Right-pad a (B, N) array to (B, n), so every step has the same shapes (no retracing)."""
    x = np.asarray(x)
    return np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)


def rollout_batch(session, rows, cfg, max_new_tokens, keys=None):
    """Sample a group per prompt, score it. Returns (rollout, group rows, rewards (P, G) Scores).

    keys: one random key per row (sampling.row_keys); by default drawn for these rows.
    --sample-batch N samples N rows (whole groups) per call of the sampler and joins the parts; each row
    samples from its own key, so the rollout is the same for any N.
    A task with an environment plays a group of G episodes per start instead (engine/episodes.py):
    the completion is the whole episode, and its reward the environment's (time/generate_s includes
    the environment's own time).
    """
    G = cfg.group_size
    group_rows = [r for r in rows for _ in range(G)]  # (P*G,) each prompt G times, groups adjacent
    env = getattr(session.task, "env", None)
    if keys is None:
        keys = row_keys(len(group_rows))  # drawn for every row before chunking
    chunk = cfg.sample_batch or len(group_rows)
    with session.timer("generate"):
        parts = []
        for begin in range(0, len(group_rows), chunk):
            part_rows, part_keys = group_rows[begin : begin + chunk], keys[begin : begin + chunk]
            if env is not None:
                parts.append(play(session.model, session.tokenizer, part_rows, env, cfg.temperature,
                                  chat_template=cfg.chat_template, keys=part_keys))
            else:
                parts.append(generate(session.model, session.tokenizer, part_rows, max_new_tokens, cfg.temperature,
                                      chat_template=cfg.chat_template, keys=part_keys))
        rollout = parts[0] if len(parts) == 1 else concat_rollouts(parts, session.tokenizer.pad_token_id or 0)
    with session.timer("reward"):
        if env is not None:
            scores = rollout.episodes.scores()
        else:
            scores = score_rows(session.task, group_rows, rollout.texts, training=True)
    return rollout, group_rows, scores


class StalePolicy:
    """--rollout-staleness K: the rollouts of step i are sampled by the policy of step i - K (the start's
    while i < K), what a trainer sees when another process samples with the weights it had K steps ago.

    Keeps the trainable weights at the start of the last K + 1 steps (the LoRA adapters only, with LoRA;
    MLX arrays are immutable, so a snapshot shares them and costs memory, never a copy step) and swaps
    the oldest into the model while it samples. Saved with every checkpoint, so --resume samples the
    same tokens. K = 0 keeps nothing and swaps nothing.
    """

    FILE = "stale_policies.safetensors"

    def __init__(self, model, staleness, checkpoint=None):
        self.model, self.K, self.history = model, staleness, []  # oldest first, {name: array} each
        if staleness and checkpoint is not None:
            path = checkpoint / self.FILE
            if not path.exists():
                raise MlxRlError(f"cannot resume: {path} is missing (the stale policies are saved with the checkpoint)")
            saved = mx.load(str(path))
            for j in sorted({int(k.split(".", 1)[0]) for k in saved}):
                prefix = f"{j}."
                self.history.append({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})

    def start_step(self):
        """Remember the weights this step starts from; keep the last K + 1."""
        if self.K:
            self.history = (self.history + [dict(tree_flatten(self.model.trainable_parameters()))])[-(self.K + 1):]

    @contextlib.contextmanager
    def sampling(self):
        """The sampler's weights (the oldest kept) in the model while the block runs; the current ones after."""
        if not self.K:
            yield
            return
        current = self.model.trainable_parameters()
        self.model.update(tree_unflatten(list(self.history[0].items())))
        try:
            yield
        finally:
            self.model.update(current)

    def arrays(self):
        """What the checkpoint keeps: the last K snapshots (the next step adds its own)."""
        if not self.K:
            return {}
        return {self.FILE: {f"{j}.{k}": v for j, snap in enumerate(self.history[-self.K:]) for k, v in snap.items()}}


def grpo_step(session, cfg, variant, update, max_new_tokens, stale=None):
    """One GRPO step: rollout, rewards, advantages, epochs of updates. Returns the step's metrics.

    stale: a StalePolicy (--rollout-staleness); the rollout is sampled with its weights."""
    world, timer, task = session.world, session.timer, session.task
    G = cfg.group_size
    pad_id = session.tokenizer.pad_token_id or 0
    # Every rank draws the global batch of prompts (one RNG stream, as one process would) and keeps whole groups;
    # each row samples from its own key, so the completions don't depend on how the batch is split.
    all_rows = family.draw_prompts(session, cfg, variant)
    keys = row_keys(len(all_rows) * G, world, rows_per_item=G)
    with stale.sampling() if stale is not None else contextlib.nullcontext():  # the policy of K steps ago samples
        rollout, group_rows, scores = rollout_batch(session, world.shard(all_rows), cfg, max_new_tokens, keys)
        rollout, group_rows, scores, refill_stats = family.refill(session, cfg, variant, rollout, group_rows, scores,
                                                                  max_new_tokens)  # DAPO
    with timer("reward"):
        rewards = scores.total.reshape(-1, G)  # (P, G) this rank's groups
        rewards = rewards + variant.overlong_penalty(np.asarray(rollout.lengths), max_new_tokens).reshape(-1, G)
        advantages, zero_signal = variant.advantages(rewards)
        N = int(world.gather(np.array([completion_width(rollout, max_new_tokens)])).max())  # every rank: the same shapes
        tokens, mask, sampler_logprobs = completion_batch(  # (B, T), (B, T-1) x 2 with T fixed by N
            rollout.prompt_ids, pad_columns(rollout.completion_ids, N, pad_id), pad_columns(rollout.mask, N), pad_id,
            values=pad_columns(rollout.logprobs, N), present=pad_columns(rollout.present, N))
        advantages = mx.array(advantages.reshape(-1).astype(np.float32))  # (B,)
        shared_len = group_shared_len(rollout.prompt_ids, G)  # the group's rows share their prompt
        n_rows = mx.array(float(world.sum(np.array([mask.shape[0]]))[0]))  # global counts: each rank's loss is a share
        n_tokens = mx.array(float(world.sum(np.array([mask.sum().item()]))[0]))
        mx.eval(tokens, mask, advantages, sampler_logprobs)

    all_rewards, all_zero = world.gather(rewards), world.gather(zero_signal)  # global figures, as one process has them
    lengths = world.gather(np.asarray(rollout.lengths))
    row = {
        "reward/mean": float(all_rewards.mean()),
        "reward/std": float(all_rewards.std()),
        "grpo/group_reward_std": float(all_rewards.std(axis=1).mean()),  # the spread the advantages see
        "policy/completion_len": float(lengths.mean()),
        "perf/tokens": float(world.sum(np.array([float(rollout.n_tokens())]))[0]),
        "grpo/zero_signal_frac": float(all_zero.mean()),
        "grpo/skipped": float(all_zero.all()),
        **refill_stats,
    }
    if rollout.episodes is not None:
        row.update(episode_metrics(world, rollout))
    for name in scores.names:
        values = world.gather(scores.per_reward[name])
        row[f"reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    if (task.training_rewards or task.rewards).is_verifier():
        row["train/accuracy"] = row[f"reward/{scores.names[0]}"]
    samples = [
        {"split": "train", "prompt": r["prompt"], "completion": c, "reward": float(x), "advantage": float(a)}
        for r, c, x, a in list(zip(group_rows, rollout.texts, rewards.reshape(-1), np.array(advantages)))[:G]
    ]
    if all_zero.all():  # no group says which way is better: take no step on noise
        return row, samples

    ref_logprobs = mx.zeros(mask.shape)
    if cfg.kl_coef > 0:
        with timer("reference"):
            ref_logprobs = session.reference.logprobs(  # (B, T-1), no gradient; laid out as the policy's pass
                tokens, cfg.temperature, group_size=G, shared_len=shared_len, skip=max(shared_len - 1, 0))
            mx.eval(ref_logprobs)

    old_logprobs, per_epoch = mx.zeros(mask.shape), []
    correction = (sampler_logprobs,) if cfg.is_correction != "none" else ()  # the sampler's log-probs, for the weight
    for epoch in range(cfg.epochs):
        loss, metrics, grad_norm = update(tokens, mask, advantages, old_logprobs, ref_logprobs, mx.array(epoch == 0),
                                          n_rows, n_tokens, shared_len, *correction)
        if epoch == 0:
            old_logprobs = metrics["logprobs"]  # log pi_old: the policy that sampled, before any update
            mismatch = mx.abs(masked(sampler_logprobs - old_logprobs, mask)).sum() / n_tokens
            metrics["policy/sampler_mismatch"] = mismatch
        values = {k: v.item() for k, v in metrics.items() if k != "logprobs"}
        per_epoch.append(world.reduce_metrics(values) | {"optim/grad_norm": grad_norm.item(), "loss/total": loss.item()})

    # One figure per step: the mean over epochs, the extremes for ratio_min / ratio_max.
    for k in per_epoch[0]:
        values = [m[k] for m in per_epoch if k in m]
        row[k] = min(values) if k.endswith("_min") else max(values) if k.endswith("_max") else float(np.mean(values))
    return row, samples


# --- the run -----------------------------------------------------------------------


def train(cfg):
    resolve_policy_model(cfg)
    session = start("grpo", cfg, precheck=batch_check(
        cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens,
        f"--prompts-per-step {cfg.prompts_per_step} x --group-size {cfg.group_size}"
        + (f", --sample-batch {cfg.sample_batch}" if cfg.sample_batch else ""), cfg.micro_batch, cfg.sample_batch))
    env = getattr(session.task, "env", None)
    if env is not None:  # an episode's length: every model turn at its longest (the constant aggregation's L)
        N = env.max_turns * env.max_turn_tokens
        variant = family.make_variant(cfg, N, answer_len=N)  # no overlong penalty unless asked for
    else:
        N = cfg.max_new_tokens or session.task.max_new_tokens
        variant = family.make_variant(cfg, N, answer_len=0 if cfg.data else session.task.max_new_tokens)
    if cfg.max_new_tokens and cfg.max_new_tokens < session.task.max_new_tokens and not cfg.data and env is None:
        print(f"note: --max-new-tokens {cfg.max_new_tokens} is shorter than the task's answer ({session.task.max_new_tokens})")
    attach_reward_model(session, cfg, N)  # --reward-model: train on the learned reward (reward_model.py)
    optimizer = session.optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.lr_schedule,
                                  updates_per_step=cfg.epochs)
    update = session.update_step(make_loss_fn(cfg, variant), optimizer, row_multiple=cfg.group_size)  # whole groups
    stale = StalePolicy(session.model, cfg.rollout_staleness, session.checkpoint)

    def step(i):
        stale.start_step()
        row, samples = grpo_step(session, cfg, variant, update, N, stale)
        row["optim/lr"] = current_lr(optimizer)
        if cfg.eval_every and (i + 1) % cfg.eval_every == 0:
            session.run.log_samples(i + 1, samples)
        return row

    signals = {"reward": "reward/mean", "held-out acc": "eval/accuracy", "KL": "kl/k3", "clip": "policy/clipfrac",
               "entropy": "policy/entropy"}
    if env is not None:
        signals.update(episode_signals(session.task))
    return loop.run(session, step, steps=cfg.steps, details=family.pass_at_k_details(session, cfg),
                    signals=signals, chapter_arrays=stale.arrays)


def episode_signals(task):
    """What the live line adds for a task with an environment: turns, and its tool calls where it has a tool."""
    signals = {"turns": "env/turns"}
    if task.name == "calculator" or getattr(task, "tool", False):
        signals["tool calls"] = "env/tool_calls"
    return signals


cli = command("grpo", GRPOConfig, train, help=__doc__.split("\n\n")[0])
