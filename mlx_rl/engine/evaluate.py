"""Held-out evaluation: greedy answers scored by the task's rewards, and pass@k from samples.

    eval/accuracy        share of held-out prompts whose greedy answer the first reward
                         (a 0/1 verifier such as `exact`) accepts
    eval/reward          mean of the weighted reward sum
    eval/reward_<name>   each reward's own mean
    eval/accuracy_<kind> accuracy on the rows of each `kind` (the built-in tasks: carry /
                         no_carry, repeats / distinct), so a collapse on one kind shows

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
sample n >= k answers per prompt at temperature 1, count the c that are right,
and average the unbiased estimate 1 - C(n - c, k) / C(n, k) over prompts. pass@1
is the sampling accuracy; a large k asks whether the model *can* produce the
answer at all, which is what RL can only reweight, not create (Yue et al. 2025).

In a data-parallel run each rank scores its share of the prompts and the sums
are added up (`world.sum`), so every rank reports the same global figures.
"""

import numpy as np

from mlx_rl.engine.sampling import generate, row_keys


def score_rows(task, rows, texts, training=False):
    """Rewards of completions `texts` for dataset `rows`: a Scores (total, per reward).

    training: score with the rewards the policy is trained on (`task.training_rewards`,
    e.g. a learned reward model) instead of the task's own verifier, which evaluation uses.
    """
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    rewards = (task.training_rewards or task.rewards) if training else (task.eval_rewards or task.rewards)
    return rewards.score(prompts, texts, columns)


def evaluate(model, tokenizer, task, rows, chat_template=False, batch_size=256, n_samples=8, world=None):
    """Greedy held-out figures and sample rows. Returns (metrics, samples)."""
    if getattr(task, "env", None) is not None:
        return evaluate_episodes(model, tokenizer, task, rows, chat_template, batch_size, n_samples, world)
    mine = world.shard(rows) if world is not None else rows
    texts = []
    for i in range(0, len(mine), batch_size):
        texts += generate(model, tokenizer, mine[i : i + batch_size], task.max_new_tokens, temperature=0.0,
                          chat_template=chat_template).texts
    scores = score_rows(task, mine, texts) if mine else None
    names = (task.eval_rewards or task.rewards).names
    # sums, so that ranks can add theirs up: [n, total, each reward's sum and count, per-kind right and count]
    kinds = sorted({r.get("kind") for r in rows if isinstance(r.get("kind"), str)})
    sums = np.zeros(2 + 2 * len(names) + 2 * len(kinds), dtype=np.float64)
    if mine:
        sums[0], sums[1] = len(mine), scores.total.sum()
        for j, name in enumerate(names):
            values = scores.per_reward[name]
            sums[2 + 2 * j], sums[3 + 2 * j] = np.nansum(values), np.isfinite(values).sum()
        first = scores.per_reward[names[0]]
        for j, kind in enumerate(kinds):
            of_kind = np.array([r.get("kind") == kind for r in mine])
            sums[2 + 2 * len(names) + 2 * j] = np.nansum(first[of_kind])
            sums[3 + 2 * len(names) + 2 * j] = np.isfinite(first[of_kind]).sum()
    if world is not None:
        sums = world.sum(sums)
    n = max(sums[0], 1.0)
    metrics = {"eval/reward": sums[1] / n, "eval/prompts": int(sums[0])}  # the count, for the accuracy's band
    for j, name in enumerate(names):
        metrics[f"eval/reward_{name}"] = sums[2 + 2 * j] / sums[3 + 2 * j] if sums[3 + 2 * j] else float("nan")
    if task.rewards.is_verifier():
        metrics["eval/accuracy"] = metrics[f"eval/reward_{names[0]}"]
        for j, kind in enumerate(kinds):
            count = sums[3 + 2 * len(names) + 2 * j]
            metrics[f"eval/accuracy_{kind}"] = sums[2 + 2 * len(names) + 2 * j] / count if count else float("nan")
    samples = []
    for row, text, total in list(zip(mine, texts, scores.total if mine else []))[:n_samples]:
        sample = {"prompt": row["prompt"], "completion": text, "reward": float(total)}
        if "answer" in row:
            sample["answer"] = row["answer"]
        for name in names:
            value = scores.per_reward[name][len(samples)]
            sample[f"reward_{name}"] = None if np.isnan(value) else float(value)
        samples.append(sample)
    return {k: float(v) for k, v in metrics.items()}, samples


def evaluate_episodes(model, tokenizer, task, rows, chat_template=False, batch_size=256, n_samples=8, world=None):
    """Greedy episodes on held-out rows: (metrics, samples) with whole transcripts.

    eval/accuracy        share of episodes solved (the environment's `solved`, else reward >= 1)
    eval/reward          mean summed reward of an episode
    eval/accuracy_<kind> per `kind` of row (icemaze: start / elsewhere; calculator: guessed / tool)
    eval/turns, eval/<info>   mean model turns, and each of the environment's counters (eval/tool_calls)
    """
    from mlx_rl.engine.episodes import play

    mine = world.shard(rows) if world is not None else rows
    stats, texts = [], []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        r = play(model, tokenizer, chunk, task.env, temperature=0.0, chat_template=chat_template)
        stats.append(r.episodes)
        texts += r.texts
    kinds = sorted({r.get("kind") for r in rows if isinstance(r.get("kind"), str)})
    info_names = sorted({k for s in stats for k in s.info})
    # sums, so that ranks can add theirs up: [n, solved, reward, turns, each info, per-kind solved and count]
    sums = np.zeros(4 + len(info_names) + 2 * len(kinds), dtype=np.float64)
    solved = np.concatenate([s.solved for s in stats]) if stats else np.zeros(0)
    if mine:
        sums[0] = len(mine)
        sums[1] = solved.sum()
        sums[2] = sum(s.rewards.sum() for s in stats)
        sums[3] = sum(s.turns.sum() for s in stats)
        for j, name in enumerate(info_names):
            sums[4 + j] = sum(s.info.get(name, np.zeros(len(s.rewards))).sum() for s in stats)
        for j, kind in enumerate(kinds):
            of_kind = np.array([r.get("kind") == kind for r in mine])
            sums[4 + len(info_names) + 2 * j] = solved[of_kind].sum()
            sums[5 + len(info_names) + 2 * j] = of_kind.sum()
    if world is not None:
        sums = world.sum(sums)
    n = max(sums[0], 1.0)
    metrics = {"eval/accuracy": sums[1] / n, "eval/reward": sums[2] / n, "eval/turns": sums[3] / n,
               "eval/prompts": int(sums[0])}
    for j, name in enumerate(info_names):
        metrics[f"eval/{name}"] = sums[4 + j] / n
    for j, kind in enumerate(kinds):
        count = sums[5 + len(info_names) + 2 * j]
        metrics[f"eval/accuracy_{kind}"] = sums[4 + len(info_names) + 2 * j] / count if count else float("nan")
    samples = []
    transcripts = [t for s in stats for t in s.transcripts]
    rewards = np.concatenate([s.rewards for s in stats]) if stats else np.zeros(0)
    for row, text, segments, reward, ok in list(zip(mine, texts, transcripts, rewards, solved))[:n_samples]:
        sample = {"prompt": row["prompt"], "completion": text, "reward": float(reward), "solved": bool(ok),
                  "transcript": segments}
        if "answer" in row:
            sample["answer"] = row["answer"]
        samples.append(sample)
    return {k: float(v) for k, v in metrics.items()}, samples


def pass_at_k(n, c, k):
    """Unbiased pass@k for one prompt: n samples, c of them right. 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def evaluate_pass_at_k(model, tokenizer, task, rows, ks, n=None, temperature=1.0, chat_template=False, chunk=512, world=None):
    """pass@k for each k in ks, from n samples per held-out prompt (n = max(ks)). Returns {"pass@k": value}."""
    n = n or max(ks)
    mine = world.shard(rows) if world is not None else rows
    correct = np.zeros(len(mine), dtype=np.int64)
    repeated = [r for r in mine for _ in range(n)]  # (P * n,) each prompt n times, adjacent
    keys = row_keys(len(rows) * n, world, rows_per_item=n)
    texts, solved = [], []
    for i in range(0, len(repeated), chunk):
        if getattr(task, "env", None) is not None:  # episodes: right = solved
            from mlx_rl.engine.episodes import play

            solved.append(play(model, tokenizer, repeated[i : i + chunk], task.env, temperature,
                               chat_template=chat_template, keys=keys[i : i + chunk]).episodes.solved)
            continue
        texts += generate(model, tokenizer, repeated[i : i + chunk], task.max_new_tokens, temperature=temperature,
                          chat_template=chat_template, keys=keys[i : i + chunk]).texts
    if mine:
        if solved:
            first = np.concatenate(solved)
        else:
            first = score_rows(task, repeated, texts).per_reward[task.rewards.names[0]]  # (P * n,)
        correct = (np.nan_to_num(first) >= 1.0).reshape(len(mine), n).sum(axis=1)
    sums = np.array([len(mine)] + [sum(pass_at_k(n, int(c), k) for c in correct) for k in ks], dtype=np.float64)
    if world is not None:
        sums = world.sum(sums)
    return {f"pass@{k}": float(sums[1 + i] / max(sums[0], 1.0)) for i, k in enumerate(ks)}
