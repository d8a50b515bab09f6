"""Chapter "DPO": learn from preference pairs, with no reward model and no sampling in the loss.

What it teaches: a preference pair is a prompt with a preferred ("chosen") and
a worse ("rejected") answer. Direct Preference Optimization turns the RLHF
objective (maximise reward, stay near a reference model) into a classification
loss on such pairs. For a pair, with log-probs summed over the answer tokens,

    h     = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]
    loss  = -log sigmoid(beta * h)

so the policy raises the chosen answer and lowers the rejected one *relative
to the reference*; beta sets how far it may move. beta * [log pi - log ref] of
an answer is its "implicit reward", and the metrics report it for both sides.

Pairs come from a JSONL file ({"prompt", "chosen", "rejected"} per line, the
format preference data sets already use), or are built on-policy from the
task's reward: sample several answers per prompt from the starting model,
pair the best with the worst (`mlx-rl dpo-pairs`, or `mlx-rl dpo --task`).
On `addition` the pretrained model gets carry problems right about 20% of the
time at temperature 1, so 8 samples per prompt usually find a right answer to
pair with a wrong one; prompts where all samples score the same make no pair
and are skipped (and counted).

Tokenisation: training never re-tokenises sampled text. Pairs built here in
process keep the token ids that were sampled. Text pairs from a file are
tokenised as prompt ids (BOS or chat template included) + answer ids + EOS,
each part on its own and never as one concatenated string, so the boundary
between prompt and answer is exact even with BPE tokenizers. (With our
character tokenizer the two routes give the same ids.)

Why the default run has rounds and an NLL term: plain DPO on pairs built once
from the plateau collapses here. Only carry problems make pairs, DPO only
constrains the chosen-minus-rejected difference (the shared prefix cancels),
so the model learns "add a carry" everywhere and both answers' log-probs fall.
Two fixes from iterative RPO (Pang et al. 2024) make it reliable: on-policy
rounds (sample fresh pairs from the current policy, whose log-probs become the
round's reference, and train one pass on them) and a per-token NLL term on the
chosen answers (`rpo_alpha`). `--rounds 1 --rpo-alpha 0` is plain DPO.

Variants, each a small function: label smoothing (conservative DPO, for noisy
labels: assume a share `label_smoothing` of pairs is flipped) and IPO (a
squared loss that pulls h to 1 / (2 beta) instead of pushing it to infinity).

Deliberate simplifications: the reference log-probs are computed once per pair
before a round's first update (the reference never changes within a round, so
there is no second model in the step); pairs are the best vs the worst of one
prompt's samples; full fine-tuning by default; no truncation of long pairs;
the IPO loss uses summed (not length-averaged) log-probs, as in the paper.

Papers: Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model"; Azar et al. 2023, "A General Theoretical
Paradigm to Understand Learning from Human Preferences" (IPO); Mitchell 2023,
"A note on DPO with noisy preferences" (cDPO); Pang et al. 2024, "Iterative
Reasoning Preference Optimization" (rounds + NLL).
"""

import dataclasses
import json
import typing
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_rl.config import MlxRlError, command, option
from mlx_rl.data.pairs import Pairs, build_pairs, pair_batch, pair_tokens, read_pairs, tokenize_pairs, write_pairs
from mlx_rl.engine import loop
from mlx_rl.engine.logprobs import sequence_logprobs
from mlx_rl.engine.session import LLMConfig, MemoryConfig, resolve_policy_model, start
from mlx_rl.engine.update import current_lr
from mlx_rl.runs import atomic_write_json, read_json


@dataclasses.dataclass
class DPOConfig(LLMConfig, MemoryConfig):
    steps: int = option(0, "number of training steps at most (0: no limit; rounds x epochs decide)", min=0, resumable=True)
    resume: typing.Optional[str] = option(None, "continue a run directory from its last checkpoint (a finished run: "
                                          "extend it with a larger --rounds)")
    pairs: typing.Optional[str] = option(None, "preference pairs in TRL's formats, a JSONL file or any --data format; "
                                         "--columns renames its columns too (default: build pairs on-policy from the "
                                         "task and its reward)")
    rounds: int = option(6, "on-policy rounds: sample fresh pairs from the current policy, train on them (--pairs: one "
                         "round)", min=1, resumable=True)
    epochs: int = option(1, "passes over each batch of collected data (a round's pairs)", min=1)
    dpo_beta: float = option(0.1, "temperature of the DPO loss (its beta): how far the policy may move from the "
                             "reference", above=0.0, aliases=("beta",))
    loss_type: str = option("sigmoid", "loss: sigmoid (DPO) or ipo", choices=["sigmoid", "ipo"])
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO; sigmoid loss only)", min=0.0,
                                    max=0.5)
    rpo_alpha: float = option(1.0, "weight of the chosen answers' per-token NLL added to the loss (0: plain DPO)", min=0.0)
    batch_size: int = option(8, "training examples per step (preference pairs)", min=1)
    lr: float = option(5e-5, "learning rate (AdamW)", above=0.0, resumable=True)
    warmup: int = option(10, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = option("constant", "learning rate after warm-up: constant, or cosine decay to lr/20 over "
                              "--steps (which cosine then needs)", choices=["constant", "cosine"])
    pair_prompts: int = option(256, "training prompts to build preference pairs from (on-policy: per round, "
                                    "answers sampled from the policy)", min=1)
    samples_per_prompt: int = option(8, "answers sampled per prompt, ranked by the reward into pairs (on-policy)", min=2)
    pair_temperature: float = option(1.0, "sampling temperature of the answers made into pairs (on-policy)", above=0.0)
    eval_every: int = option(0, "evaluate on held-out data every N steps: greedy accuracy (0: only before training and "
                             "after each round, as always)", min=0, resumable=True)

    def validate(self):
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise MlxRlError("--label-smoothing applies to the sigmoid loss only")
        if self.lr_schedule == "cosine" and not self.steps:
            raise MlxRlError("--lr-schedule cosine decays over --steps: give --steps N (a DPO run's length is otherwise "
                             "decided by its rounds' pairs, unknown before they are sampled)")

    def more_to_do(self, state):
        """A finished DPO run has more to do when --rounds (or --steps, if it was the limit) was raised.
        (With --pairs there is one round: a run stopped by --steps mid-round has its batches left.)"""
        rounds = 1 if self.pairs else self.rounds
        rounds_left = state.get("chapter", {}).get("round", 0) < rounds
        return rounds_left and (not self.steps or self.steps > state["step"])


# --- the maths: pure functions of arrays ------------------------------------------


def sigmoid_loss(logits, beta, label_smoothing=0.0):
    """DPO: -log sigmoid(beta h); with smoothing eps, a share eps of labels is assumed flipped. (B,) -> (B,)"""
    return -(1 - label_smoothing) * nn.log_sigmoid(beta * logits) - label_smoothing * nn.log_sigmoid(-beta * logits)


def ipo_loss(logits, beta, label_smoothing=0.0):
    """IPO: regress h onto 1 / (2 beta), so the margin stops growing once it is large enough. (B,) -> (B,)"""
    return (logits - 1 / (2 * beta)) ** 2


LOSSES = {"sigmoid": sigmoid_loss, "ipo": ipo_loss}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """The DPO loss and its metrics from sequence log-probs, each (B,)."""
    chosen_logratio = policy_chosen - ref_chosen  # (B,) log pi/ref of the chosen answer
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    logits = chosen_logratio - rejected_logratio  # (B,) h
    losses = LOSSES[loss_type](logits, beta, label_smoothing)  # (B,)
    reward_chosen = beta * mx.stop_gradient(chosen_logratio)  # (B,) implicit rewards
    reward_rejected = beta * mx.stop_gradient(rejected_logratio)
    metrics = {
        "dpo/reward_chosen": reward_chosen.mean(),
        "dpo/reward_rejected": reward_rejected.mean(),
        "dpo/margin": (reward_chosen - reward_rejected).mean(),
        "dpo/accuracy": (reward_chosen > reward_rejected).astype(mx.float32).mean(),
        "dpo/logp_chosen": mx.stop_gradient(policy_chosen).mean(),
        "dpo/logp_rejected": mx.stop_gradient(policy_rejected).mean(),
    }
    return losses.mean(), metrics


def chosen_nll(policy_chosen, n_chosen_tokens):
    """Per-token negative log-likelihood of the chosen answers (the RPO term). (B,), () -> ()"""
    return -policy_chosen.sum() / mx.maximum(n_chosen_tokens, 1.0)


def make_loss_fn(beta, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0):
    """loss_fn(model, tokens (2B, T), mask (2B, T-1), ref_logps (2B,), n_pairs, n_chosen_tokens): chosen rows
    first, then rejected.

    n_pairs and n_chosen_tokens count the global batch: in a data-parallel run each rank's loss is its share.
    """

    def loss_fn(model, tokens, mask, ref_logps, n_pairs, n_chosen_tokens):
        logps = sequence_logprobs(model, tokens, mask)  # (2B,) completion tokens only
        B = logps.shape[0] // 2
        share = B / n_pairs  # 1 in a single process
        loss, metrics = dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta, loss_type, label_smoothing)
        loss, metrics = loss * share, {k: v * share for k, v in metrics.items()}
        metrics["loss/dpo"] = loss
        if rpo_alpha > 0:
            nll = chosen_nll(logps[:B], n_chosen_tokens)
            metrics["loss/nll"] = nll
            loss = loss + rpo_alpha * nll
        return loss, metrics

    return loss_fn


def split_pairs(arrays, rows):
    """Micro-batches for --micro-batch: `rows` // 2 pairs each, every one laid out as the full batch is (its
    chosen rows, then the same pairs' rejected rows), so the loss pairs them up the same way."""
    n = arrays[0].shape[0]
    B, size = n // 2, max(1, rows // 2)
    parts = []
    for begin in range(0, B, size):
        pairs = np.arange(begin, min(begin + size, B))
        idx = mx.array(np.concatenate([pairs, B + pairs]))
        parts.append(tuple(x[idx] if isinstance(x, mx.array) and x.ndim > 0 and x.shape[0] == n else x for x in arrays))
    return parts


# --- the reference log-probs of a round's pairs ---------------------------------------------


def compute_reference(model, pairs, pad_id=0, batch_size=256):
    """Fill in the reference log-probs: one batched pass per chunk, no gradient, before any update."""
    chosen, rejected = [], []
    for begin in range(0, len(pairs), batch_size):
        idx = np.arange(begin, min(begin + batch_size, len(pairs)))
        tokens, mask, _ = pair_batch(pairs, idx, pad_id)
        logps = np.array(mx.stop_gradient(sequence_logprobs(model, tokens, mask)))  # (2b,)
        chosen.append(logps[: len(idx)])
        rejected.append(logps[len(idx):])
    pairs.ref_chosen = np.concatenate(chosen).astype(np.float32)
    pairs.ref_rejected = np.concatenate(rejected).astype(np.float32)
    return pairs


# --- rounds --------------------------------------------------------------------------------------


def batch_order(n_pairs, batch_size, seed):
    """One epoch's batches: a shuffle reproducible from seed (for --resume), ragged end dropped (one shape to compile)."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    size = min(batch_size, n_pairs)
    return [order[i : i + size] for i in range(0, n_pairs - size + 1, size)]


def round_batches(n_pairs, cfg, round_index):
    return [b for epoch in range(cfg.epochs) for b in batch_order(n_pairs, cfg.batch_size, [cfg.seed, round_index, epoch])]


def prepare_pairs(cfg, session, round_index):
    """One round's pairs (from --pairs, or sampled from the current policy) with their reference log-probs.

    The reference is the policy as it is now, before this round's first update:
    its log-probs are computed once per pair and stored (RUN/pair_tokens.json,
    which --resume reads back).
    """
    model, tokenizer, task, run, timer = session.model, session.tokenizer, session.task, session.run, session.timer
    metrics = {}
    if cfg.pairs:
        pairs = tokenize_pairs(read_pairs(cfg.pairs, cfg.columns), tokenizer, cfg.chat_template)
        metrics["pairs/count"] = len(pairs)
    else:
        rows = task.train_rows(np.random.default_rng([cfg.seed * 1000 + round_index, 0]), cfg.pair_prompts, distinct=True)
        session.seed_step(session.step)  # the same sampling on --resume
        pairs, jsonl, metrics = build_pairs(model, tokenizer, task, rows, cfg.samples_per_prompt, cfg.pair_temperature,
                                            cfg.chat_template, timer, world=session.world)
        if run.writer:
            write_pairs(run.path / f"pairs-round{round_index}.jsonl", jsonl)
    if len(pairs):
        with timer("reference"):
            compute_reference(model, pairs, tokenizer.pad_token_id or 0)
    if run.writer:
        atomic_write_json(run.path / "pair_tokens.json", {"round": round_index, **pairs.to_json()})
    return pairs, metrics


# --- the run ----------------------------------------------------------------------------


def train(cfg):
    resolve_policy_model(cfg)
    if cfg.pairs:
        read_pairs(cfg.pairs, cfg.columns)  # a bad pair file stops here, in one line, before a model is loaded or a run is written
    session = start("dpo", cfg)
    tokenizer, world, run = session.tokenizer, session.world, session.run
    pad_id = tokenizer.pad_token_id or 0
    rounds = 1 if cfg.pairs else cfg.rounds
    optimizer = session.optimizer(cfg.lr, cfg.steps or 1000, cfg.warmup, cfg.weight_decay, cfg.lr_schedule)
    update = session.update_step(make_loss_fn(cfg.dpo_beta, cfg.loss_type, cfg.label_smoothing, cfg.rpo_alpha), optimizer,
                                 split=split_pairs, row_multiple=2)

    # The round in progress: its index, the step it started at, its pairs and their batches (saved for --resume).
    state = {"round": 0, "round_start": 0, "per_round": None, "round_done_at": None, **session.chapter_state,
             "pairs": None, "batches": []}
    if session.start_step > 0 and (run.path / "pair_tokens.json").exists():
        saved = read_json(run.path / "pair_tokens.json", "pair file")
        if saved.get("round") == state["round"] and state["round_start"] < session.start_step:
            state["pairs"] = Pairs.from_json(saved)
            state["batches"] = round_batches(len(state["pairs"]), cfg, state["round"])

    def start_round(i):
        """Prepare rounds until one has pairs (a round whose answers all scored the same is skipped)."""
        while state["round"] < rounds:
            pairs, metrics = prepare_pairs(cfg, session, state["round"])
            if len(pairs):
                batches = round_batches(len(pairs), cfg, state["round"])
                state.update(pairs=pairs, batches=batches, round_start=i, per_round=len(batches))
                return metrics
            print(f"round {state['round']}: no pairs (every prompt's {cfg.samples_per_prompt} answers scored the same); "
                  "skipping it. More --samples-per-prompt or a higher --pair-temperature find more.")
            state["round"] += 1
        raise MlxRlError("no preference pairs in any round: nothing to train on")

    def step(i):
        pair_metrics = start_round(i) if state["pairs"] is None else {}
        with session.timer("data"):
            idx = state["batches"][i - state["round_start"]]
            tokens, mask, ref = pair_batch(state["pairs"], world.shard(idx), pad_id)
            n_pairs = mx.array(float(len(idx)))
            n_chosen_tokens = mx.array(float(sum(len(state["pairs"].chosen_ids[j]) for j in idx)))
        loss, aux, grad_norm = update(tokens, mask, ref, n_pairs, n_chosen_tokens)
        row = {"loss/total": loss.item(), **world.reduce_metrics({k: v.item() for k, v in aux.items()}),
               **pair_metrics, "optim/grad_norm": grad_norm.item(), "optim/lr": current_lr(optimizer),
               "dpo/round": state["round"], "perf/tokens": pair_tokens(state["pairs"], idx)}
        if i + 1 - state["round_start"] >= len(state["batches"]):  # the round's last batch: on to the next
            state.update(round=state["round"] + 1, round_start=i + 1, pairs=None, batches=[], round_done_at=i + 1)
        return row

    def total():
        """Steps in all: known for the rounds done and the one in progress, estimated for the rest."""
        if state["round"] >= rounds:
            planned = state["round_start"]
        else:
            per_round = state["per_round"] or max(1, cfg.epochs * cfg.pair_prompts // (4 * cfg.batch_size))
            in_progress = len(state["batches"]) if state["pairs"] is not None else per_round
            planned = state["round_start"] + in_progress + per_round * (rounds - state["round"] - 1)
        return min(planned, cfg.steps) if cfg.steps else planned

    return loop.run(session, step, steps=total,
                    eval_when=lambda i: bool(cfg.eval_every and i % cfg.eval_every == 0) or state["round_done_at"] == i,
                    chapter_state=lambda: {k: state[k] for k in ("round", "round_start", "per_round", "round_done_at")},
                    signals={"round": "dpo/round", "loss": "loss/total", "margin": "dpo/margin",
                             "pair acc": "dpo/accuracy", "held-out acc": "eval/accuracy"})


cli = command("dpo", DPOConfig, train, help=__doc__.split("\n\n")[0])


# --- `mlx-rl dpo-pairs`: write on-policy pairs as JSONL -------------------------------------


@dataclasses.dataclass
class PairsConfig:
    out: str = option("pairs.jsonl", "where to write: the JSONL file of pairs (an existing file is kept unless --force)")
    model: typing.Optional[str] = option(None, "checkpoint to sample from (default: the newest pretrain run for the task)")
    task: str = option("addition", "built-in task whose reward ranks the answers (see `mlx-rl tasks`)")
    data: typing.Optional[str] = option(None, "your own data: prompts (JSONL, JSON, CSV, Parquet or a save_to_disk "
                                        "folder) instead of a built-in task; needs --reward")
    columns: typing.Optional[str] = option(None, "rename the data's columns to the ones mlx-rl reads, NAME=COLUMN, comma-separated: "
                                           "prompt=question,answer=solution")
    reward: typing.Tuple[str, ...] = option((), "reward: a built-in name or path/to/file.py:function that ranks the answers; repeat for several "
                                            "(default: the task's own)")
    reward_weights: typing.Tuple[float, ...] = option((), "weights of the --reward functions, comma-separated")
    digits: int = option(2, "addition: operand digits", min=1, max=6)
    sort_length: int = option(5, "sort: list length", min=2, max=12)
    seed: int = option(0, "random seed for prompts and sampling")
    pair_prompts: int = option(1024, "training prompts to build preference pairs from (answers sampled from --model)",
                               min=1)
    samples_per_prompt: int = option(8, "answers sampled per prompt, ranked by the reward into pairs", min=2)
    pair_temperature: float = option(1.0, "sampling temperature of the answers made into pairs", above=0.0)
    chat_template: bool = option(False, "wrap prompts in the tokenizer's chat template")
    force: bool = option(False, "overwrite --out if it exists (default: an existing file is an error)")


def run_dpo_pairs(cfg):
    from mlx_rl.data.tasks import make_task
    from mlx_rl.engine.models import load_model
    from mlx_rl.runs import check_out_file

    check_out_file(cfg.out, cfg.force)  # before anything is sampled
    task = make_task(cfg)
    probe = dataclasses.replace(DPOConfig(), model=cfg.model, task=cfg.task, data=cfg.data)
    resolve_policy_model(probe)  # --model defaults to the newest pretrain run
    model, tokenizer, _ = load_model(probe.model)
    mx.random.seed(cfg.seed)
    rows = task.train_rows(np.random.default_rng([cfg.seed, 0]), cfg.pair_prompts, distinct=True)
    _, jsonl, metrics = build_pairs(model, tokenizer, task, rows, cfg.samples_per_prompt, cfg.pair_temperature,
                                    cfg.chat_template)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    write_pairs(cfg.out, jsonl)
    print(f"wrote {len(jsonl)} pairs to {cfg.out} ({metrics['pairs/skipped_prompts']} of {len(rows)} prompts skipped: "
          f"all answers scored the same; sample accuracy {metrics.get('train/accuracy', float('nan')):.1%})")
    return metrics


cli_dpo_pairs = command("dpo-pairs", PairsConfig, run_dpo_pairs,
                        help="Build preference pairs on-policy: sample answers, rank them with the reward, write JSONL.")
