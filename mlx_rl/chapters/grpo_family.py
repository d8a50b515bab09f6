"""Chapter "GRPO's family": the fixes that followed GRPO, each a small function, chosen with `mlx-rl grpo --variant`.

What it teaches: GRPO's loss is a pipeline of five choices, and each paper
since DeepSeekMath changed one or two of them to fix one problem:

    advantages  how a completion's reward becomes its advantage
    ratio       the importance ratio pi / pi_old: per token, or per sequence
    objective   what the ratio does: PPO's clipped min, or a clipped weight on log pi
    aggregate   how per-token terms are averaged into one number
    filter      which groups the batch keeps (and an overlong penalty on the reward)

A variant is a named choice of parts, not a branch inside one long loss:

    variant   advantages         ratio     objective                aggregate          filter
    grpo      (r - mean) / std   token     clip(1 - e, 1 + e)       per sequence       -
    dr_grpo   r - mean           token     clip(1 - e, 1 + e)       constant (B x L)   -
    dapo      (r - mean) / std   token     clip(1 - e, 1 + e_high)  per token          dynamic sampling, overlong penalty
    gspo      (r - mean) / std   sequence  clip per sequence        per sequence       -
    cispo     (r - mean) / std   token     sg(clip(rho)) A log pi   per token          -
    rloo      r - mean of others token     clip(1 - e, 1 + e)       per sequence       -

Each part's option can be set on its own (`--clip-eps-high 0.28 --loss-agg token`
on top of `--variant grpo`); an unset option takes the variant's choice.

One part is shared, not chosen: the k3 KL penalty to the reference (--kl-coef,
aggregated like the policy term), so that comparing two variants changes only
their parts. DAPO, Dr. GRPO, GSPO and CISPO train without it: add --kl-coef 0
to run them as published.

Papers: Shao et al. 2024 (GRPO); Liu et al. 2025, "Understanding R1-Zero-Like
Training" (Dr. GRPO); Yu et al. 2025, "DAPO"; Zheng et al. 2025, "Group
Sequence Policy Optimization" (GSPO); MiniMax 2025, "MiniMax-M1" (CISPO);
Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization" (RLOO); Yue et al. 2025, "Does Reinforcement Learning Really
Incentivize Reasoning Capacity in LLMs Beyond the Base Model?" (pass@k).
"""

import dataclasses
import typing

import mlx.core as mx
import numpy as np

from mlx_rl.config import MlxRlError, option
from mlx_rl.data.rewards import Scores
from mlx_rl.engine.evaluate import evaluate_pass_at_k
from mlx_rl.engine.logprobs import masked
from mlx_rl.chapters.kl import k3  # (r - 1) - log r: per-token estimate of KL(policy || reference), never negative


@dataclasses.dataclass
class PassAtKConfig:
    """pass@k at the start and the end of an RL run (GRPO, PPO), in summary.json's details.pass_at_k."""

    pass_k: typing.Tuple[str, ...] = option(("1", "8"), "pass@k at the start and end of the run, k comma-separated "
                                            "(sampled at temperature 1; empty: skip)")
    pass_k_prompts: int = option(200, "held-out prompts for pass@k", min=1)


@dataclasses.dataclass
class VariantConfig:
    variant: str = option("grpo", "the loss: grpo, dr_grpo, dapo, gspo, cispo or rloo (docs/grpo-family.md)",
                          choices=["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo"])
    clip_eps: typing.Optional[float] = option(None, "clip of the policy ratio, its lower side: the ratio may fall to 1 - eps; in grpo, dr_grpo and "
                                              "rloo it sets the upper clip too (default: the variant's; 0.2, GSPO "
                                              "3e-4, CISPO none)", above=0.0)
    clip_eps_high: typing.Optional[float] = option(None, "upper clip: the ratio may rise to 1 + eps_high (default: "
                                                   "the variant's; --clip-eps, DAPO and CISPO 0.28, GSPO 4e-4)",
                                                   above=0.0)
    scale_std: typing.Optional[bool] = option(None, "divide advantages by the group's reward std (default: the "
                                              "variant's; off in Dr. GRPO and RLOO)")
    loss_agg: typing.Optional[str] = option(None, "average per-token terms per sequence, over all tokens, or over a "
                                            "constant B x max-new-tokens (default: the variant's)",
                                            choices=["sequence", "token", "constant"])
    dynamic_sampling: typing.Optional[bool] = option(None, "refill the batch with groups that carry signal (default: "
                                                     "on in DAPO)")
    overlong_buffer: typing.Optional[int] = option(None, "soft overlong penalty over the last N tokens before "
                                                   "--max-new-tokens (default: DAPO a quarter of it, but never over "
                                                   "a built-in task's answer length; others 0)", min=0)


IS_CORRECTIONS = ("none", "token-tis", "token-mask", "seq-tis", "seq-mask")


@dataclasses.dataclass
class CorrectionConfig:
    """The sampler correction (GRPO, PPO): an importance weight between the policy that sampled and the trainer's."""

    is_correction: str = option("none", "weight each token's policy term by pi_old / pi_sampler: per token or per "
                                "sequence, truncated at --is-cap (tis) or zeroed above it (mask); none: no weight",
                                choices=list(IS_CORRECTIONS))
    is_cap: float = option(3.0, "the importance weight's cap C (--is-correction)", above=0.0)


# --- advantages: rewards (P, G) -> advantages (P, G), zero_signal (P,) ----------------------------


def group_advantages(rewards, scale_std=True, eps=1e-4):
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps), over each prompt's group.

    A group whose rewards are all equal carries no signal: its advantages are exactly 0.
    The division up-weights groups whose rewards hardly differ (nearly all right or all
    wrong: a bias toward easy and hopeless prompts); Dr. GRPO (scale_std=False) drops it,
    A_i = r_i - mean(r).
    """
    rewards = np.asarray(rewards, dtype=np.float32)
    zero_signal = rewards.max(axis=1) == rewards.min(axis=1)  # (P,)
    advantages = rewards - rewards.mean(axis=1, keepdims=True)  # (P, G)
    if scale_std:
        advantages = advantages / (rewards.std(axis=1, keepdims=True) + eps)
    advantages[zero_signal] = 0.0
    return advantages, zero_signal


def rloo_advantages(rewards, scale_std=False, eps=1e-4):
    """RLOO: A_i = r_i - 1/(G-1) sum_{j != i} r_j, the leave-one-out baseline: it never includes r_i
    itself, so it does not depend on the sample it judges and the estimate stays unbiased (GRPO's
    mean includes r_i, which shrinks every advantage by (G-1)/G). Equals G / (G-1) x (r_i - mean(r)).
    scale_std (off in RLOO) divides by the group's reward std, as GRPO does."""
    rewards = np.asarray(rewards, dtype=np.float32)
    G = rewards.shape[1]
    zero_signal = rewards.max(axis=1) == rewards.min(axis=1)
    others = (rewards.sum(axis=1, keepdims=True) - rewards) / (G - 1)  # (P, G) mean of the other G-1
    advantages = rewards - others
    if scale_std:
        advantages = advantages / (rewards.std(axis=1, keepdims=True) + eps)
    advantages[zero_signal] = 0.0
    return advantages, zero_signal


# --- ratios: (B, T) log-probs -> (B, T) ratios -----------------------------------------------------


def token_ratio(log_ratio, mask):
    """rho_it = pi(o_it) / pi_old(o_it) = exp(log pi - log pi_old): one importance ratio per token (PPO, GRPO)."""
    return mx.exp(log_ratio)


def sequence_ratio(log_ratio, mask):
    """GSPO: s_i = (pi(o_i) / pi_old(o_i))^(1 / |o_i|) = exp(mean_t log rho_it), one ratio per sequence.

    A per-token ratio is a one-sample importance weight for a distribution that
    changes token by token, so its noise grows with length and single tokens get
    clipped for no reason; the sequence's geometric mean is a ratio of what the
    reward was given for: the whole completion. Broadcast to (B, T). A geometric
    mean moves far less than a token's ratio, hence GSPO's tiny clip range
    (1 - 3e-4, 1 + 4e-4); its gradient is s_i x mean_t d log pi(o_it).
    """
    n = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)  # (B, 1)
    mean_logratio = log_ratio.sum(axis=1, keepdims=True) / n  # (B, 1): the inputs are masked already
    return mx.broadcast_to(mx.exp(mean_logratio), log_ratio.shape)


# --- the sampler correction: pi_old / pi_sampler, truncated or masked -------------------------------------


def is_weights(old_logprobs, sampler_logprobs, mask, mode, cap):
    """The importance weight between the policy that sampled a rollout and the trainer's old policy.

        token level      w_it = pi_old(o_it) / pi_sampler(o_it) = exp(log pi_old - log pi_sampler)
        sequence level   w_i  = prod_t w_it = exp(sum_t (log pi_old - log pi_sampler)), every token of o_i
        tis  (truncate)  w <- min(w, C)                 (truncated importance sampling)
        mask             w <- 0 where w > C, else w     (the token, or the whole sequence, is dropped)

    as TRL defines `vllm_importance_sampling_mode` (token_truncate, token_mask, sequence_truncate,
    sequence_mask; cap 3.0) and veRL's rollout correction its truncated weights (rollout_is token /
    sequence), log-ratios bounded to +-20 before the exp as veRL does. The weight multiplies the policy
    term of each token, not the KL penalty (as in both). It is a constant: no gradient flows through it.
    The PPO ratio pi / pi_old still corrects for the trainer's own updates; this weight corrects for the
    sampler being another policy (an older copy, another kernel, quantised weights).
    (B, T) x 3 -> weights (B, T), cut (B, T) bool: where the cap changed the weight.
    """
    log_w = masked(old_logprobs - sampler_logprobs, mask)  # (B, T): padding and environment tokens 0
    if mode.startswith("seq"):
        log_w = log_w.sum(axis=1, keepdims=True)  # (B, 1)
    w = mx.exp(mx.clip(log_w, -20.0, 20.0))
    cut = w > cap
    w = mx.minimum(w, cap) if mode.endswith("tis") else mx.where(cut, 0.0, w)
    return mx.stop_gradient(mx.broadcast_to(w, mask.shape)), mx.broadcast_to(cut, mask.shape)


def is_metrics(weights, cut, mask, n_tokens):
    """policy/is_weight_mean, _max and policy/is_masked_frac (the share of tokens the cap truncated or masked)."""
    share = lambda x: masked(x, mask).sum() / n_tokens  # noqa: E731
    return {"policy/is_weight_mean": share(weights),
            "policy/is_weight_max": mx.where(mask > 0, weights, -mx.inf).max(),
            "policy/is_masked_frac": share(cut.astype(mx.float32))}


# --- objectives: per-token terms to maximise, and which tokens the clip touched ----------------------


def clipped_objective(ratio, advantages, logprobs, eps_low, eps_high):
    """PPO's pessimistic bound: min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A).

    DAPO's "clip-higher" (eps_high > eps_low) lets unlikely tokens that did well grow
    faster, which keeps entropy from collapsing. Returns (terms (B, T), clipped (B, T)).
    """
    adv = advantages[:, None]  # (B, 1): every token of a completion shares its advantage
    terms = mx.minimum(ratio * adv, mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    # The clip is active where it removes the gradient: ratio past the edge in the advantage's direction.
    clipped = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))
    return terms, clipped


def cispo_objective(ratio, advantages, logprobs, eps_low, eps_high):
    """CISPO: sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi.

    PPO's clip *drops* a token's gradient once its ratio leaves the range, and the
    rare tokens that open a new line of reasoning are exactly the ones that do. CISPO
    clips the importance weight instead and keeps every token's gradient, A d log pi,
    scaled by the (stopped) weight. The paper sets no lower bound and tunes only the
    upper one: eps_low defaults to 1 (no bound; it is ignored unless below 1) and
    eps_high to 0.28, DAPO's upper clip (open implementations such as Trinity-RFT's
    use the same pair).
    """
    lower = 1.0 - eps_low if eps_low < 1.0 else 0.0
    weight = mx.stop_gradient(mx.clip(ratio, lower, 1.0 + eps_high))  # (B, T)
    terms = weight * advantages[:, None] * logprobs
    clipped = (ratio > 1.0 + eps_high) | (ratio < lower)  # where the weight was cut (the gradient stays)
    return terms, clipped


# --- aggregation: per-token terms (B, T) -> one number, as a share of the global batch ---------------
# n_rows and n_tokens are the global batch's counts, so that in a data-parallel run each
# rank's loss is its share and the shares add up to the single-process loss.


def sequence_mean(terms, mask, n_rows, n_tokens, length):
    """Mean over each sequence's tokens, then over sequences (GRPO): long completions weigh no more than short."""
    return (masked(terms, mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)).sum() / n_rows


def token_mean(terms, mask, n_rows, n_tokens, length):
    """Mean over every completion token of the batch (DAPO): a long completion's tokens count as much as a short's."""
    return masked(terms, mask).sum() / n_tokens


def constant_mean(terms, mask, n_rows, n_tokens, length):
    """Sum over tokens divided by a constant B x L (Dr. GRPO): no length normalisation at all, so a wrong
    answer is not rewarded for being long (the per-sequence mean divides its penalty by its length)."""
    return masked(terms, mask).sum() / (n_rows * length)


AGGREGATE = {"sequence": sequence_mean, "token": token_mean, "constant": constant_mean}


# --- batch filter and reward shaping -------------------------------------------------------------------


def overlong_penalty(lengths, max_len, buffer):
    """DAPO's soft overlong punishment, added to the reward: with L_max = max_len and L_cache = buffer,

        R_length(y) = 0                                  |y| <= L_max - L_cache
                      ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max

    i.e. 0 up to max_len - buffer tokens, then falling linearly to -1 at max_len (|y| counts EOS).
    It fixes reward noise: a hard -1 for every truncated completion punishes reasoning that was
    sound but long; the ramp tells the model it is getting too long before it is cut off. The
    buffer must lie beyond the length a right answer needs, or right answers are punished."""
    lengths = np.asarray(lengths, dtype=np.float32)
    if buffer <= 0:
        return np.zeros_like(lengths)
    return np.clip((max_len - buffer - lengths) / buffer, -1.0, 0.0)


# --- a variant: a named choice of the parts above -----------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    advantage_fn: typing.Callable
    ratio_fn: typing.Callable
    objective_fn: typing.Callable
    loss_agg: str
    eps_low: float
    eps_high: float
    scale_std: bool
    dynamic_sampling: bool
    overlong_buffer: int
    length: int  # the constant aggregation's L (max new tokens)

    def advantages(self, rewards):
        return self.advantage_fn(rewards, self.scale_std)

    def overlong_penalty(self, lengths, max_len):
        return overlong_penalty(lengths, max_len, self.overlong_buffer)

    def loss(self, logprobs, old_logprobs, ref_logprobs, advantages, mask, kl_coef, n_rows, n_tokens, is_weight=None):
        """-J and its metrics. Per-token arrays (B, T) (masked already), advantages (B,), counts global.
        is_weight: (B, T) the sampler correction's weights (is_weights), or None."""
        aggregate = AGGREGATE[self.loss_agg]
        log_ratio = logprobs - old_logprobs  # (B, T)
        ratio = self.ratio_fn(log_ratio, mask)  # (B, T)
        terms, clipped = self.objective_fn(ratio, advantages, logprobs, self.eps_low, self.eps_high)
        if is_weight is not None:
            terms = terms * is_weight  # the policy term only: the KL penalty is not reweighted
        policy_loss = -aggregate(terms, mask, n_rows, n_tokens, self.length)
        loss, metrics = policy_loss, {"loss/policy": policy_loss}
        if kl_coef > 0:  # with kl_coef = 0 the reference log-probs are never looked at
            kl = aggregate(k3(masked(ref_logprobs - logprobs, mask)), mask, n_rows, n_tokens, self.length)
            kl_term = kl_coef * kl
            loss = policy_loss + kl_term
            metrics.update({"loss/kl": kl_term, "kl/k3": kl})  # (the loss's own nodes: see note below)
        token_share = lambda x: masked(x, mask).sum() / n_tokens  # noqa: E731  a share of the global token mean
        token_level = ratio if self.ratio_fn is token_ratio else mx.exp(log_ratio)
        metrics.update({
            "policy/clipfrac": token_share(clipped.astype(mx.float32)),
            "policy/ratio_mean": token_share(ratio),
            "policy/ratio_min": mx.where(mask > 0, ratio, mx.inf).min(),
            "policy/ratio_max": mx.where(mask > 0, ratio, -mx.inf).max(),
            "kl/approx": token_share(approx_kl(log_ratio, token_level)),
        })
        # Note: metrics reuse the loss's own nodes (kl_term, ratio): MLX 0.32's compiled value_and_grad fails
        # with "_Map_base::at" when an output is a second copy of an expression inside the loss.
        return loss, metrics


def approx_kl(log_ratio, ratio=None):
    """kl/approx in every chapter: k3 of log_ratio = log pi - log pi_old on the rollout's tokens, which pi_old
    sampled, so it estimates KL(pi_old || pi): how far this update has moved the policy from the one that sampled.
    k3(x) = (e^x - 1) - x; pass ratio = e^x when the loss has it already. (B, T) -> (B, T)"""
    ratio = mx.exp(log_ratio) if ratio is None else ratio
    return mx.stop_gradient((ratio - 1) - log_ratio)


VARIANTS = {  # name: (advantages, ratio, objective, loss_agg, eps_low, eps_high, scale_std, dynamic sampling, overlong)
    "grpo": (group_advantages, token_ratio, clipped_objective, "sequence", 0.2, 0.2, True, False, 0.0),
    "dr_grpo": (group_advantages, token_ratio, clipped_objective, "constant", 0.2, 0.2, False, False, 0.0),
    "dapo": (group_advantages, token_ratio, clipped_objective, "token", 0.2, 0.28, True, True, 0.25),
    "gspo": (group_advantages, sequence_ratio, clipped_objective, "sequence", 3e-4, 4e-4, True, False, 0.0),
    "cispo": (group_advantages, token_ratio, cispo_objective, "token", 1.0, 0.28, True, False, 0.0),
    "rloo": (rloo_advantages, token_ratio, clipped_objective, "sequence", 0.2, 0.2, False, False, 0.0),
}


def make_variant(cfg, max_new_tokens=None, answer_len=0):
    """The variant cfg names, each option the user left unset taking the variant's choice.

    answer_len: the longest right answer, where the task knows it (a built-in task's answer
    and EOS): the default overlong buffer stops short of it, so that right answers are never
    punished for their length (with the default --max-new-tokens it is 0: no penalty at all).
    """
    if cfg.variant not in VARIANTS:
        raise MlxRlError(f"unknown --variant {cfg.variant} (choose from {', '.join(VARIANTS)})")
    adv, ratio, objective, agg, eps_low, eps_high, scale_std, dynamic, overlong = VARIANTS[cfg.variant]
    length = max_new_tokens or cfg.max_new_tokens or 1
    pick = lambda value, default: default if value is None else value  # noqa: E731
    symmetric = eps_low == eps_high  # grpo, dr_grpo, rloo: --clip-eps alone sets both edges
    low = pick(cfg.clip_eps, eps_low)
    buffer = min(int(round(overlong * length)), max(length - answer_len, 0))
    return Variant(
        name=cfg.variant, advantage_fn=adv, ratio_fn=ratio, objective_fn=objective,
        loss_agg=pick(cfg.loss_agg, agg), eps_low=low, eps_high=pick(cfg.clip_eps_high, low if symmetric else eps_high),
        scale_std=pick(cfg.scale_std, scale_std), dynamic_sampling=pick(cfg.dynamic_sampling, dynamic),
        overlong_buffer=pick(cfg.overlong_buffer, buffer), length=length)


# --- the parts of the step that differ by variant --------------------------------------------------------


def draw_prompts(session, cfg, variant):
    """The step's prompts, drawn from the run's numpy RNG (saved for --resume); repeats allowed."""
    return session.task.train_rows(session.rng, cfg.prompts_per_step)


def refill(session, cfg, variant, rollout, group_rows, scores, max_new_tokens, max_rounds=8):
    """DAPO's dynamic sampling: replace zero-signal groups with fresh ones that carry signal.

    Keeps the batch size (P groups); never trains on a zero-signal group. Fresh prompts
    come from a generator of their own (seeded by seed, step and rank), so the run's
    main data stream, and every rank's, stays where it would be without refills. If
    after max_rounds rounds some slots are still empty, groups that carry signal are
    repeated (counted in dapo/repeated_groups); a step where none does is skipped.
    dapo/filtered_frac: the share of the step's first groups that were replaced (what the
    filter saves the update from; grpo/zero_signal_frac is then 0).
    """
    if not variant.dynamic_sampling:
        return rollout, group_rows, scores, {}
    from mlx_rl.chapters.grpo import rollout_batch

    G = cfg.group_size
    P = len(group_rows) // G
    keep = [signal_groups(scores, G, rollout, variant, max_new_tokens)]
    stats = {"dapo/filtered_frac": 1.0 - len(keep[0]) / max(P, 1), "dapo/refill_rounds": 0, "dapo/repeated_groups": 0}
    if len(keep[0]) == P:  # every group carries signal: nothing to replace
        return rollout, group_rows, scores, stats
    rng = np.random.default_rng([cfg.seed, session.step, session.world.rank, 7])
    parts = [(rollout, group_rows, scores)]
    rounds = 0
    while sum(len(k) for k in keep) < P and rounds < max_rounds:
        fresh = session.task.train_rows(rng, P)
        r, rows, s = rollout_batch(session, fresh, cfg, max_new_tokens)
        parts.append((r, rows, s))
        keep.append(signal_groups(s, G, r, variant, max_new_tokens))
        rounds += 1
    chosen = [(j, g) for j, groups in enumerate(keep) for g in groups][:P]
    repeated = 0
    if chosen:
        while len(chosen) < P:
            chosen.append(chosen[repeated % len(chosen)])
            repeated += 1
    else:
        chosen = [(0, g) for g in range(P)]  # nothing carries signal: the step will take no update
    stats.update({"dapo/refill_rounds": rounds, "dapo/repeated_groups": repeated})
    return (*merge_groups(parts, chosen, G, session.tokenizer), stats)


def signal_groups(scores, G, rollout, variant, max_new_tokens):
    """The groups whose rewards (overlong penalty included, as the advantages see them) are not all equal."""
    rewards = scores.total.reshape(-1, G) + variant.overlong_penalty(np.asarray(rollout.lengths), max_new_tokens).reshape(-1, G)
    return [g for g in range(rewards.shape[0]) if rewards[g].max() > rewards[g].min()]


def merge_groups(parts, chosen, G, tokenizer):
    """One rollout of the chosen (part, group) pairs, with their rows and scores."""
    from mlx_rl.engine.sampling import Rollout

    rows_idx = [(j, g * G + k) for j, g in chosen for k in range(G)]
    N = max(p[0].completion_ids.shape[1] for p in parts)
    pad = tokenizer.pad_token_id or 0

    def column(get, fill=0):
        out = []
        for j, i in rows_idx:
            x = np.array(get(parts[j][0]))[i]
            out.append(np.pad(x, (0, N - x.shape[0]), constant_values=fill))
        return mx.array(np.stack(out))

    rollout = Rollout(
        prompts=[parts[j][0].prompts[i] for j, i in rows_idx],
        prompt_ids=[parts[j][0].prompt_ids[i] for j, i in rows_idx],
        completion_ids=column(lambda r: r.completion_ids, pad).astype(mx.int32),
        logprobs=column(lambda r: r.logprobs),
        mask=column(lambda r: r.mask),
        finish_reasons=[parts[j][0].finish_reasons[i] for j, i in rows_idx],
        texts=[parts[j][0].texts[i] for j, i in rows_idx],
    )
    if parts[0][0].episodes is not None:  # episodes: their environment's tokens and outcomes come along
        from mlx_rl.engine.episodes import EpisodeStats

        stats = [p[0].episodes for p in parts]
        pick = lambda get: np.array([get(stats[j])[i] for j, i in rows_idx])  # noqa: E731
        rollout.env_mask = column(lambda r: r.env_mask)
        rollout.episodes = EpisodeStats(
            rewards=pick(lambda s: s.rewards), solved=pick(lambda s: s.solved), turns=pick(lambda s: s.turns),
            truncated=pick(lambda s: s.truncated),
            turn_rewards=np.array(column(lambda r: r.episodes.turn_rewards)),
            info={k: pick(lambda s, k=k: s.info.get(k, np.zeros(len(s.rewards)))) for k in stats[0].info},
            transcripts=[stats[j].transcripts[i] for j, i in rows_idx])
    group_rows = [parts[j][1][i] for j, i in rows_idx]
    first = parts[0][2]
    total = np.array([parts[j][2].total[i] for j, i in rows_idx], dtype=np.float32)
    per_reward = {n: np.array([parts[j][2].per_reward[n][i] for j, i in rows_idx]) for n in first.names}
    none_rows = int(sum(np.isnan(v).all() for v in zip(*per_reward.values())))
    return rollout, group_rows, Scores(total, per_reward, first.names, first.weights, none_rows)


def parse_ks(values):
    ks = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    k = int(part)
                except ValueError:
                    raise MlxRlError(f"--pass-k: {part!r} is not a whole number") from None
                if k < 1:
                    raise MlxRlError(f"--pass-k: k must be at least 1, got {k}")
                ks.append(k)
    return sorted(set(ks))


def pass_at_k_details(session, cfg):
    """pass@k of the starting policy (now) and of the final one (at the end), for summary.json."""
    ks = parse_ks(cfg.pass_k)
    rewards = session.task.rewards
    # A user's reward function counts as a 0/1 verifier only once it has returned values: an undecided one
    # is measured, then dropped if it is not one (a start saved for --resume was measured with a verifier).
    undecided = rewards.rewards[0].verifier is None and not rewards.rewards[0].seen_values
    if not ks or not (rewards.is_verifier() or undecided):
        return None
    rows = session.task.heldout_rows(cfg.pass_k_prompts, seed=cfg.seed + 1)

    def measure():
        with session.timer("eval"):
            return evaluate_pass_at_k(session.model, session.tokenizer, session.task, rows, ks,
                                      chat_template=cfg.chat_template, world=session.world)

    start = session.chapter_state.get("pass_at_k_start") if session.start_step else None
    if start is None:
        start = measure()
        if not rewards.is_verifier():
            return None
    session.keep_state["pass_at_k_start"] = start  # saved with every checkpoint: --resume reports the same start

    def details():
        return {"pass_at_k": {"start": start, "end": measure(), "prompts": len(rows)}}

    return details
