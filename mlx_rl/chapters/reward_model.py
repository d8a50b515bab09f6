"""Chapter "Reward models and RLHF": learn a reward from preferences, then optimise it, and watch it break.

What it teaches: RLHF (Christiano et al. 2017; Ouyang et al. 2022, InstructGPT)
is how RL entered language models. People compare two answers to a prompt and
say which they prefer; a reward model learns to score answers so that the
preferred one scores higher; PPO (or GRPO) then optimises the policy against
that learned score. Three stages:

    1. pairs          `mlx-rl label-pairs`: a (simulated) labeller compares answers
    2. reward model   `mlx-rl reward-model`: Bradley-Terry on those pairs
    3. RL             `mlx-rl ppo --reward-model RUN`: the learned reward in place of the verifier

The reward model is the language model with a scalar head: a Linear(hidden, 1)
on the final hidden state of the last token of prompt + answer (EOS). Bradley
and Terry (1952) model the chance that answer a is preferred to answer b as

    P(a > b) = sigmoid(r(a) - r(b))

so the loss on a pair is -log sigmoid(r_chosen - r_rejected): only differences
of rewards are learned (adding a constant to every reward changes nothing).

The lesson: a learned reward is a proxy. It is right where the labeller was
right and wrong where the labeller was, and a policy pushed hard against it
goes where it is wrong. The built-in labeller (`Labeller`) is imperfect the
way people are: it prefers the right answer (it knows what the task's verifier
knows), but flips its choice with probability --label-noise, and it likes
longer answers: of two answers of different lengths it picks the longer one
with probability --length-bias, whatever they say. Addition answers have a
fixed length, so a longer answer is always wrong: the verifier never shares
the bias. A policy trained on the learned reward learns to append digits
(docs/rlhf.md).

Deliberate simplifications:
- The labeller is simulated (a person would be slower and less consistent in
  other ways); the answers it compares are made, not sampled from a policy: the
  right one, the corpus's mistaken one, near-misses (one digit changed), and
  longer versions of the right and a wrong one (1..--max-extra digits appended).
  Every pair is the right answer against a wrong one: two wrong answers are
  never compared (the verifier has no preference between them).
- By default the whole network is trained (body and head: a 1M-parameter body
  is cheap, and a frozen body's last hidden state does not say whether a sum is
  right); --no-train-body trains the head alone, --lora-rank the head and LoRA
  adapters. The head starts at zero, so every reward starts at 0 and the loss at
  log 2 (chance).
- The rewards the RL chapters see are standardised (mean 0, std 1 over the
  held-out pairs' answers, stored with the head), so --kl-coef means the same
  thing as with the verifier's 0..1.3 reward.
- No ensembles, no reward-model refresh during RL (Gao et al. 2023 study how
  over-optimisation grows with the KL; here a KL penalty is the remedy shown).

Papers: Bradley & Terry 1952; Christiano et al. 2017, Deep RL from Human
Preferences; Stiennon et al. 2020, Learning to Summarize from Human Feedback;
Ouyang et al. 2022, Training Language Models to Follow Instructions (InstructGPT);
Gao et al. 2023, Scaling Laws for Reward Model Overoptimization; Singhal et al.
2023, A Long Way to Go: Investigating Length Correlations in RLHF.
"""

import dataclasses
import json
import typing
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_rl.config import MlxRlError, command, option
from mlx_rl.data.pairs import load_pairs, pair_tokens, tokenize_pairs, write_pairs
from mlx_rl.data.tasks import BuiltinTask, TaskConfig, make_task
from mlx_rl.engine import loop
from mlx_rl.engine.logprobs import completion_batch
from mlx_rl.engine.session import LLMConfig, resolve_policy_model, start
from mlx_rl.engine.update import current_lr

HEAD_FILE = "reward_head.safetensors"  # beside the mlx-lm checkpoint: the head and the reward's scale


# --- config ----------------------------------------------------------------------


@dataclasses.dataclass
class LabellerConfig:
    """The simulated labeller's settings (reward-model --task, label-pairs)."""

    label_noise: float = option(0.1, "labeller: chance it picks the worse answer of a pair (its noise)", min=0.0, max=0.5)
    length_bias: float = option(0.7, "labeller: chance that, of two answers of different lengths, it picks the longer "
                                "one whatever they say (its bias; 0: none)", min=0.0, max=1.0)
    max_extra: int = option(2, "labeller: longer answers it is shown have 1 to this many digits appended", min=1, max=8)
    pair_prompts: int = option(8000, "training prompts to build preference pairs from (the simulated labeller "
                                     "compares their answers)", min=1)
    pairs_per_prompt: int = option(2, "labeller: pairs per prompt (from 5 candidate answers)", min=1, max=10)


@dataclasses.dataclass
class RewardModelConfig(LabellerConfig, LLMConfig):
    steps: int = option(150, "number of training steps (batches of pairs)", min=1, resumable=True)
    pairs: typing.Optional[str] = option(None, "preference pairs in TRL's formats (a JSONL file, or a folder with "
                                         "train.jsonl and valid.jsonl); default: the simulated labeller on --task")
    valid_share: float = option(0.1, "--pairs without valid.jsonl: share of prompts held out", min=0.0, max=0.5)
    batch_size: int = option(128, "training examples per step (preference pairs)", min=1)
    lr: float = option(1e-3, "learning rate (AdamW)", above=0.0, resumable=True)
    warmup: int = option(10, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = option("cosine", "learning rate after warm-up: constant, or cosine decay to lr/20",
                              choices=["constant", "cosine"])
    train_body: bool = option(True, "train the language model under the head too (--no-train-body: the head alone; "
                              "with --lora-rank: the head and the adapters)")
    calibration_bins: int = option(5, "bins of the calibration figure (confidence 0.5..1)", min=2)
    eval_every: int = option(25, "evaluate on held-out data every N steps: pair-ranking accuracy (0: only at the start and the end)", min=0,
                             resumable=True)


@dataclasses.dataclass
class LearnedRewardConfig:
    """The fields GRPO and PPO take to train on a reward model."""

    reward_model: typing.Optional[str] = option(
        None, "train on this reward model's score (a `mlx-rl reward-model` run or its checkpoint) instead of the "
        "task's reward; held-out evaluation still reports the verifier, and the reward model's score beside it")
    reward_model_weight: float = option(1.0, "--reward-model: weight of the learned reward")
    verifier_weight: float = option(0.0, "--reward-model: weight of the task's own reward added to the learned one "
                                    "(0: the learned reward alone, as in RLHF)")


# --- the model: a language model with a scalar head on the last token --------------------


class RewardHead(nn.Module):
    """r = w . h + b on the last token's hidden state; zero-initialised, so every reward starts at 0."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.linear.weight = mx.zeros_like(self.linear.weight)
        self.linear.bias = mx.zeros_like(self.linear.bias)

    def __call__(self, hidden):  # (B, H) -> (B,)
        return self.linear(hidden)[:, 0].astype(mx.float32)


class RewardModel(nn.Module):
    """An mlx-lm model's body and a RewardHead. `lm` stays the mlx-lm model, so its checkpoint is a plain one."""

    def __init__(self, lm, head):
        super().__init__()
        self.lm = lm
        self.head = head

    def __call__(self, tokens, last):
        hidden = self.lm.model(tokens)  # (B, T, H) final-normed hidden states (no vocabulary projection)
        at_last = hidden[mx.arange(tokens.shape[0]), last]  # (B, H) each row's last real token (EOS)
        return self.head(at_last)  # (B,)


# --- the maths -------------------------------------------------------------------------


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_chosen - r_rejected), the mean over pairs: P(chosen > rejected) = sigmoid of the margin.
    (B,), (B,) -> (loss, metrics)"""
    margin = r_chosen - r_rejected  # (B,)
    loss = -nn.log_sigmoid(margin).mean()
    metrics = {
        "rm/accuracy": ((margin > 0).astype(mx.float32) + 0.5 * (margin == 0).astype(mx.float32)).mean(),  # ties: half
        "rm/margin": margin.mean(),
        "rm/chosen": r_chosen.mean(),
        "rm/rejected": r_rejected.mean(),
    }
    return loss, metrics


def calibration(margins, bins=5):
    """Does the model's confidence mean what it says? margins: (N,) r_chosen - r_rejected of held-out pairs.

    The model's probability for its own ranking is p = sigmoid(|margin|), in [0.5, 1]. In each bin of p the
    observed rate is the share of pairs it ranks the way the labeller did. A calibrated model's points lie on
    the diagonal: of the pairs it gives 80%, the labeller agreed on 80%. Returns (rows, expected calibration
    error), rows = [(lo, hi, mean p, observed rate, count)], empty bins left out.
    """
    margins = np.asarray(margins, dtype=np.float64)
    p = 1 / (1 + np.exp(-np.abs(margins)))  # (N,)
    agreed = (margins > 0) + 0.5 * (margins == 0)  # (N,)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    rows, error = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append((float(edges[b]), float(edges[b + 1]), float(p[inside].mean()), float(agreed[inside].mean()),
                         int(inside.sum())))
            error += inside.mean() * abs(p[inside].mean() - agreed[inside].mean())
    return rows, float(error)


def make_loss_fn():
    """loss_fn(rm, tokens (2B, T), last (2B,), n_pairs): chosen rows first, then rejected."""

    def loss_fn(rm, tokens, last, n_pairs):
        rewards = rm(tokens, last)  # (2B,)
        B = rewards.shape[0] // 2
        share = B / n_pairs  # 1 in one process; each rank's share of the global mean in a data-parallel run
        loss, metrics = bradley_terry_loss(rewards[:B], rewards[B:])
        return loss * share, {k: v * share for k, v in metrics.items()}

    return loss_fn


# --- sequences: prompt ids + answer ids, scored at the last token -----------------------


def sequence_batch(prompt_ids, answer_ids, pad_id=0):
    """Rows laid out as prompt ids then answer ids, right-padded: tokens (B, T) and each row's last index (B,)."""
    n = max(len(a) for a in answer_ids)
    padded = [a + [pad_id] * (n - len(a)) for a in answer_ids]
    mask = [[1] * len(a) + [0] * (n - len(a)) for a in answer_ids]
    tokens, _ = completion_batch(prompt_ids, padded, mask, pad_id)
    last = mx.array([len(p) + len(a) - 1 for p, a in zip(prompt_ids, answer_ids)], dtype=mx.int32)
    return tokens, last


def score_sequences(rm, prompt_ids, answer_ids, pad_id=0, chunk=512):
    """Rewards of many (prompt, answer) rows: one forward pass per chunk, no gradient. -> (N,) numpy"""
    out = []
    for s in range(0, len(prompt_ids), chunk):
        tokens, last = sequence_batch(prompt_ids[s : s + chunk], answer_ids[s : s + chunk], pad_id)
        out.append(np.array(mx.stop_gradient(rm(tokens, last))))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def pair_rewards(rm, pairs, pad_id=0):
    """(r_chosen, r_rejected), each (P,), of tokenised Pairs."""
    r = score_sequences(rm, pairs.prompt_ids * 2, pairs.chosen_ids + pairs.rejected_ids, pad_id)
    return r[: len(pairs)], r[len(pairs):]


# --- the simulated labeller ---------------------------------------------------------------


def near_miss(answer, rng):
    """The answer with one character changed to another digit."""
    i = int(rng.integers(len(answer)))
    digit = str((int(answer[i]) + int(rng.integers(1, 10))) % 10) if answer[i].isdigit() else str(rng.integers(10))
    return answer[:i] + digit + answer[i + 1:]


def candidate_answers(task, problem, rng, max_extra):
    """The answers a labeller is shown for one problem: right, a wrong one (the corpus's mistake where it
    applies, else a near-miss), another near-miss, and the right and the wrong one made longer."""
    right = task.answer(problem)
    wrong = task.mistaken_answer(problem) or near_miss(right, rng)
    extra = lambda: "".join(str(d) for d in rng.integers(10, size=int(rng.integers(1, max_extra + 1))))  # noqa: E731
    return list(dict.fromkeys([right, wrong, near_miss(right, rng), right + extra(), wrong + extra()]))


@dataclasses.dataclass
class Labeller:
    """A simulated person comparing two answers.

    Of two answers of different lengths it picks the longer one with probability
    length_bias (its bias). Otherwise it picks the one the task's verifier accepts,
    and then, with probability label_noise, changes its mind (its noise).
    """

    label_noise: float = 0.1
    length_bias: float = 0.7

    def choose(self, a, b, score_a, score_b, rng):
        """(chosen, rejected) of answers a, b with the verifier's scores (which differ: one is right)."""
        if len(a) != len(b) and rng.random() < self.length_bias:
            return (a, b) if len(a) > len(b) else (b, a)
        better, worse = (a, b) if score_a > score_b else (b, a)
        return (worse, better) if rng.random() < self.label_noise else (better, worse)


def draw_problems(task, rng, n, held_out):
    """Up to n distinct problems of the train or held-out split."""
    seen, out = set(), []
    for _ in range(200 * n):
        p = task.random_problem(rng)
        if task.is_held_out(p) != held_out or task.problem_id(p) in seen:
            continue
        seen.add(task.problem_id(p))
        out.append(p)
        if len(out) == n:
            break
    return out


def label_pairs(task, problems, labeller, rng, pairs_per_prompt=2, max_extra=2):
    """Preference pairs for problems: candidates, the verifier's 0/1 scores, the labeller's choices; answers the
    verifier scores the same (two wrong ones) are never paired.

    Returns records {"prompt", "chosen", "rejected", "kind", "verifier_agrees"}: kind "same_length" or
    "different_length"; verifier_agrees: the chosen answer is the right one.
    """
    rows, answers = [], []
    for p in problems:
        row = task.row(p)
        for c in candidate_answers(task, p, rng, max_extra):
            rows.append(row)
            answers.append(c)
    from mlx_rl.engine.evaluate import score_rows

    verifier = task.rewards.names[0]  # the task's 0/1 verifier (exact): is the answer right?
    scores = score_rows(task, rows, answers).per_reward[verifier] if rows else np.zeros(0)  # (C,) in one call
    records, start = [], 0
    while start < len(rows):
        end = start
        while end < len(rows) and rows[end]["prompt"] == rows[start]["prompt"]:
            end += 1
        cands = list(range(start, end))
        options = [(i, j) for a, i in enumerate(cands) for j in cands[a + 1:] if scores[i] != scores[j]]
        for k in rng.permutation(len(options))[:pairs_per_prompt]:
            i, j = options[k]
            chosen, rejected = labeller.choose(answers[i], answers[j], scores[i], scores[j], rng)
            better = answers[i] if scores[i] > scores[j] else answers[j]
            records.append({"prompt": rows[start]["prompt"], "chosen": chosen, "rejected": rejected,
                            "kind": "same_length" if len(chosen) == len(rejected) else "different_length",
                            "verifier_agrees": chosen == better})
        start = end
    return records


def labeller_stats(records):
    """The labeller's noise and bias as measured on its pairs (what its settings should be).

    noise: share of same-length pairs where it chose the wrong answer.
    bias: on different-length pairs where the shorter answer is the right one, it chose the longer with
    probability bias + (1 - bias) * noise; solved for bias.
    """
    same = [r for r in records if r["kind"] == "same_length"]
    shorter_better = [r for r in records if r["kind"] == "different_length"
                      and (len(r["chosen"]) < len(r["rejected"])) == r["verifier_agrees"]]
    noise = float(np.mean([not r["verifier_agrees"] for r in same])) if same else float("nan")
    longer = float(np.mean([len(r["chosen"]) > len(r["rejected"]) for r in shorter_better])) if shorter_better else float("nan")
    bias = (longer - noise) / (1 - noise) if noise < 1 else float("nan")
    return {"label_noise": noise, "length_bias": bias, "pairs": len(records), "same_length_pairs": len(same),
            "verifier_agrees": float(np.mean([r["verifier_agrees"] for r in records])) if records else float("nan")}


def labelled_splits(task, cfg):
    """Train and held-out pairs from the simulated labeller, reproducible from cfg.seed."""
    if not isinstance(task, BuiltinTask):
        raise MlxRlError("the simulated labeller works on the built-in tasks (it makes their answers); for your own "
                         "data give --pairs FILE")
    labeller = Labeller(cfg.label_noise, cfg.length_bias)
    out = {}
    for split, held_out, n in (("train", False, cfg.pair_prompts), ("valid", True, cfg.eval_prompts)):
        rng = np.random.default_rng([cfg.seed, 7, int(held_out)])
        problems = draw_problems(task, rng, n, held_out)
        out[split] = label_pairs(task, problems, labeller, rng, cfg.pairs_per_prompt, cfg.max_extra)
    return out


# --- the run ---------------------------------------------------------------------------


def load_pair_splits(cfg, task):
    """(train records, held-out records): from --pairs, or from the labeller (then written to RUN/pairs/)."""
    if cfg.pairs:
        data = load_pairs(cfg.pairs, seed=cfg.seed, valid_share=cfg.valid_share, columns=cfg.columns)
        if not data.valid:
            raise MlxRlError(f"--pairs {cfg.pairs}: no held-out pairs (add valid.jsonl, or a --valid-share above 0)")
        return data.train, data.valid
    splits = labelled_splits(task, cfg)
    return splits["train"], splits["valid"]


def head_arrays(head, mean=0.0, std=1.0):
    """What HEAD_FILE holds: the head's weights and the scale the RL chapters standardise rewards with."""
    return {**dict(tree_flatten(head.parameters())), "score_mean": mx.array(mean), "score_std": mx.array(std)}


def load_head(head, path):
    if not Path(path).exists():
        raise MlxRlError(f"{path} is missing: not a reward-model checkpoint (train one with `mlx-rl reward-model`)")
    arrays = mx.load(str(path))
    head.load_weights([(k, v) for k, v in arrays.items() if k.startswith("linear.")])
    return float(arrays["score_mean"].item()), float(arrays["score_std"].item())


def evaluate_pairs(rm, pairs, records, pad_id, bins, n_samples=8):
    """Held-out figures of the reward model: (metrics, samples, margins, all rewards)."""
    r_chosen, r_rejected = pair_rewards(rm, pairs, pad_id)
    margins = r_chosen - r_rejected  # (P,)
    agreed = (margins > 0) + 0.5 * (margins == 0)
    longer_first = np.array([len(r["chosen"]) > len(r["rejected"]) for r in records])
    different = np.array([len(r["chosen"]) != len(r["rejected"]) for r in records])
    _, error = calibration(margins, bins)
    metrics = {
        "eval/loss": float(np.mean(np.logaddexp(0.0, -margins))),  # -log sigmoid(margin)
        "eval/pair_accuracy": float(agreed.mean()),
        "eval/margin": float(margins.mean()),
        "eval/calibration_error": error,
    }
    if different.any():
        # of two answers of different lengths, how often the longer scores higher: the labeller's bias, learned
        scores_longer = np.where(longer_first, agreed, 1 - agreed)  # a tie counts half
        metrics["eval/prefers_longer"] = float(scores_longer[different].mean())
        metrics["eval/pair_accuracy_same_length"] = float(agreed[~different].mean()) if (~different).any() else float("nan")
        metrics["eval/pair_accuracy_different_length"] = float(agreed[different].mean())
    if records and "verifier_agrees" in records[0]:
        truth = np.array([r["verifier_agrees"] for r in records])  # the verifier's preference, not the label
        metrics["eval/verifier_agreement"] = float(np.where(truth, agreed, 1 - agreed).mean())
    samples = [{"prompt": r["prompt"], "completion": f"{r['chosen']} > {r['rejected']}", "reward": float(m),
                "reward_chosen": float(c), "reward_rejected": float(x)}
               for r, m, c, x in list(zip(records, margins, r_chosen, r_rejected))[:n_samples]]
    return metrics, samples, margins, np.concatenate([r_chosen, r_rejected])


def plot_calibration(rows, error, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0.5, 1], [0.5, 1], color="#999", lw=1, ls="--", label="calibrated")
    if rows:
        p, observed, count = (np.array([r[i] for r in rows]) for i in (2, 3, 4))
        ax.plot(p, observed, "o-", color="#4e79a7", label="reward model")
        for x, y, n in zip(p, observed, count):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="#555")
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("predicted P(its ranking is the labeller's)")
    ax.set_ylabel("observed share the labeller agreed")
    ax.set_title(f"{title}\nexpected calibration error {error:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg):
    resolve_policy_model(cfg)  # the body starts from the pretrained checkpoint: it already reads the task
    session = start("reward-model", cfg)
    tokenizer, world, run, timer = session.tokenizer, session.world, session.run, session.timer
    pad_id = tokenizer.pad_token_id or 0
    train_records, valid_records = load_pair_splits(cfg, session.task)
    if not train_records:
        raise MlxRlError("no training pairs")
    if run.writer and not cfg.pairs:
        (run.path / "pairs").mkdir(exist_ok=True)
        write_pairs(run.path / "pairs" / "train.jsonl", train_records)  # TRL's format: `--pairs RUN/pairs` reads it
        write_pairs(run.path / "pairs" / "valid.jsonl", valid_records)
    train_pairs = tokenize_pairs(train_records, tokenizer, cfg.chat_template)
    valid_pairs = tokenize_pairs(valid_records, tokenizer, cfg.chat_template)
    stats = labeller_stats(train_records) if not cfg.pairs else {}
    if stats and world.rank == 0:
        print(f"labeller: {stats['pairs']} training pairs, {len(valid_records)} held out; measured noise "
              f"{stats['label_noise']:.3f} (set {cfg.label_noise}), length bias {stats['length_bias']:.3f} (set "
              f"{cfg.length_bias}); the labels agree with the verifier on {stats['verifier_agrees']:.1%}")

    head = RewardHead(session.model.args.hidden_size)
    scale = {"mean": 0.0, "std": 1.0, "margins": np.zeros(0)}  # from the last evaluation, saved with the head
    if session.checkpoint is not None:
        scale["mean"], scale["std"] = load_head(head, session.checkpoint / HEAD_FILE)
    if not cfg.train_body:
        session.model.freeze()  # the head alone (with LoRA the adapters are frozen too)
    rm = RewardModel(session.model, head)
    mx.eval(rm.parameters())
    optimizer = session.optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.lr_schedule, name="reward_model")
    update = session.update_step(make_loss_fn(), optimizer, model=rm)
    size = min(cfg.batch_size, len(train_pairs))
    per_epoch = len(train_pairs) // size

    def step(i):
        with timer("data"):
            epoch, k = divmod(i, per_epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_pairs))  # reproducible on --resume
            batch = order[k * size : (k + 1) * size]
            idx = world.shard(batch)
            prompt_ids = [train_pairs.prompt_ids[j] for j in idx]
            tokens, last = sequence_batch(prompt_ids * 2, [train_pairs.chosen_ids[j] for j in idx]
                                          + [train_pairs.rejected_ids[j] for j in idx], pad_id)
        loss, metrics, grad_norm = update(tokens, last, mx.array(float(size)))
        return {"loss/bradley_terry": loss.item(), **world.reduce_metrics({k: v.item() for k, v in metrics.items()}),
                "optim/grad_norm": grad_norm.item(), "optim/lr": current_lr(optimizer), "rm/epoch": epoch,
                "perf/tokens": pair_tokens(train_pairs, batch)}

    def evaluate():
        with timer("eval"):
            metrics, samples, margins, rewards = evaluate_pairs(rm, valid_pairs, valid_records, pad_id,
                                                                cfg.calibration_bins)
        scale.update(mean=float(rewards.mean()), std=float(rewards.std()) or 1.0, margins=margins)
        return metrics, samples

    def details():
        rows, error = calibration(scale["margins"], cfg.calibration_bins)
        if run.writer:
            plot_calibration(rows, error, run.path / "plots" / "calibration.png",
                             f"Reward model calibration on {len(valid_records)} held-out pairs")
        return {"calibration": [dict(zip(("lo", "hi", "predicted", "observed", "pairs"), r)) for r in rows],
                "calibration_error": error, "labeller": stats, "pairs": {"train": len(train_pairs), "valid": len(valid_pairs)},
                "reward_scale": {"mean": scale["mean"], "std": scale["std"]}}

    return loop.run(session, step, steps=cfg.steps, evaluate=evaluate, details=details,
                    chapter_arrays=lambda: {HEAD_FILE: head_arrays(head, scale["mean"], scale["std"])},
                    signals={"loss": "loss/bradley_terry", "pair acc": "rm/accuracy", "held-out pair acc": "eval/pair_accuracy",
                             "prefers longer": "eval/prefers_longer"})


cli = command("reward-model", RewardModelConfig, train, help=__doc__.split("\n\n")[0])


# --- stage 1 alone: `mlx-rl label-pairs` writes the labeller's pairs as TRL JSONL ------------------


@dataclasses.dataclass
class LabelPairsConfig(TaskConfig, LabellerConfig):
    out: str = option("pairs", "where to write: a folder for train.jsonl and valid.jsonl (TRL's explicit-prompt format; an "
                                "existing file is kept unless --force)")
    seed: int = option(0, "random seed (the same seed gives the pairs `mlx-rl reward-model --task` makes)")
    eval_prompts: int = option(500, "held-out prompts for valid.jsonl", min=1)
    force: bool = option(False, "overwrite train.jsonl and valid.jsonl in --out if they exist")


def run_label_pairs(cfg):
    from mlx_rl.runs import check_out_file

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MlxRlError(f"--out {out} is a file: label-pairs writes a folder (train.jsonl and valid.jsonl)")
    for split in ("train", "valid"):
        check_out_file(out / f"{split}.jsonl", cfg.force)
    task = make_task(cfg)
    splits = labelled_splits(task, cfg)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        write_pairs(out / f"{split}.jsonl", records)
    stats = labeller_stats(splits["train"])
    print(f"wrote {len(splits['train'])} pairs to {out / 'train.jsonl'} and {len(splits['valid'])} held-out pairs to "
          f"{out / 'valid.jsonl'}; measured label noise {stats['label_noise']:.3f} (set {cfg.label_noise}), length "
          f"bias {stats['length_bias']:.3f} (set {cfg.length_bias}); labels agree with the verifier on "
          f"{stats['verifier_agrees']:.1%}")
    return stats


cli_label_pairs = command("label-pairs", LabelPairsConfig, run_label_pairs,
                          help="Stage 1 of RLHF: a simulated labeller compares answers; writes TRL-format pairs.")


# --- stage 3: the learned reward as a reward function for GRPO and PPO ----------------------------


def find_reward_model(path):
    """A reward-model run directory or its checkpoint -> the checkpoint directory."""
    path = Path(path)
    if (path / "checkpoint" / HEAD_FILE).exists():
        return path / "checkpoint"
    if (path / HEAD_FILE).exists():
        return path
    if not path.exists():
        raise MlxRlError(f"--reward-model {path}: no such directory")
    raise MlxRlError(f"--reward-model {path}: no {HEAD_FILE} there (train a reward model with `mlx-rl reward-model`)")


def load_reward_model(path):
    """(RewardModel, tokenizer, mean, std) from a reward-model checkpoint, frozen, for scoring."""
    from mlx_rl.engine.models import load_model

    ckpt = find_reward_model(path)
    adapter_config = ckpt / "adapters" / "adapter_config.json"
    if not any(ckpt.glob("model*.safetensors")) and adapter_config.exists():  # LoRA saved without --fuse
        base = json.loads(adapter_config.read_text()).get("model")
        lm, tokenizer, _ = load_model(base, adapter_path=str(ckpt / "adapters"))
    else:
        lm, tokenizer, _ = load_model(str(ckpt))
    head = RewardHead(lm.args.hidden_size)
    mean, std = load_head(head, ckpt / HEAD_FILE)
    rm = RewardModel(lm, head)
    rm.freeze()
    rm.eval()
    mx.eval(rm.parameters())
    return rm, tokenizer, mean, std


class LearnedReward:
    """A reward function with TRL's signature, fn(prompts, completions, **columns), backed by a reward model.

    Each completion is tokenised as the reward model was trained: the prompt's ids
    (BOS or chat template included) and the completion text's ids + EOS, each on
    its own (never the joined string). All rows are scored in batched forward
    passes, and the score is standardised with the scale saved beside the head.
    """

    def __init__(self, rm, tokenizer, mean=0.0, std=1.0, chat_template=False, name="rm"):
        self.rm, self.tokenizer, self.mean, self.std = rm, tokenizer, mean, std
        self.chat_template = chat_template
        self.__name__ = name

    def __call__(self, prompts, completions, **columns):
        from mlx_rl.data.rewards import completion_text
        from mlx_rl.engine.sampling import encode_prompts

        eos = self.tokenizer.eos_token_id
        prompt_ids = encode_prompts(self.tokenizer, [{"prompt": p} for p in prompts], self.chat_template)
        answer_ids = [self.tokenizer.encode(completion_text(c), add_special_tokens=False) + [eos] for c in completions]
        scores = score_sequences(self.rm, prompt_ids, answer_ids, self.tokenizer.pad_token_id or 0)
        return ((scores - self.mean) / self.std).tolist()


def attach_reward_model(session, cfg, max_new_tokens):
    """With --reward-model: the learned reward goes into task.training_rewards (alone, or beside the verifier
    with --verifier-weight) and into task.eval_rewards next to the verifier with weight 0, so held-out
    evaluation logs eval/reward_rm beside eval/accuracy. Evaluation then samples as many tokens as training,
    so it sees the longer answers the policy may learn. Returns the LearnedReward (None without --reward-model).
    """
    if not getattr(cfg, "reward_model", None):
        return None
    from mlx_rl.data.rewards import RewardSet, load_rewards

    task = session.task
    rm, tokenizer, mean, std = load_reward_model(cfg.reward_model)
    learned = LearnedReward(rm, tokenizer, mean, std, cfg.chat_template)
    rm_reward = load_rewards([learned], [cfg.reward_model_weight]).rewards[0]
    verifier = task.rewards.rewards

    def with_weight(r, w):
        return dataclasses.replace(r, weight=w)

    # the verifier first, so its first reward stays the accuracy (train/accuracy, eval/accuracy)
    task.training_rewards = RewardSet([with_weight(r, r.weight * cfg.verifier_weight) for r in verifier] + [rm_reward])
    task.eval_rewards = RewardSet(list(verifier) + [with_weight(rm_reward, 0.0)])
    task.max_new_tokens = max(task.max_new_tokens, max_new_tokens)
    if session.world.rank == 0:
        beside = f" + {cfg.verifier_weight:g} x ({task.rewards.describe()[len('reward = '):]})" if cfg.verifier_weight else ""
        print(f"reward = {cfg.reward_model_weight:g} x rm{beside}   (rm: the reward model {find_reward_model(cfg.reward_model)}, "
              f"standardised; held-out evaluation still reports the verifier)")
    return learned
