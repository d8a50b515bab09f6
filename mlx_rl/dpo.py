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
import math
import types
import typing
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_rl import train
from mlx_rl.config import MlxRlError, command, option
from mlx_rl.logprobs import completion_batch, sequence_logprobs
from mlx_rl.plots import plot_run
from mlx_rl.rollout import encode_prompts, generate
from mlx_rl.runs import PhaseTimer, Progress, atomic_write_json, atomic_write_text
from mlx_rl.tasks import get_task


@dataclasses.dataclass
class DPOConfig(train.LLMConfig):
    steps: int = option(0, "stop after this many steps in all (0: no limit; rounds x epochs decide)", min=0)
    pairs: typing.Optional[str] = option(None, "JSONL file of preference pairs (default: build pairs on-policy from --task)")
    rounds: int = option(6, "on-policy rounds: sample fresh pairs from the current policy, train on them (--pairs: one round)", min=1)
    epochs: int = option(1, "passes over each round's pairs", min=1)
    beta: float = option(0.1, "temperature of the DPO loss: how far the policy may move from the reference", above=0.0)
    loss_type: str = option("sigmoid", "loss: sigmoid (DPO) or ipo", choices=["sigmoid", "ipo"])
    label_smoothing: float = option(0.0, "assumed share of flipped labels (conservative DPO; sigmoid loss only)", min=0.0, max=0.5)
    rpo_alpha: float = option(1.0, "weight of the chosen answers' per-token NLL added to the loss (0: plain DPO)", min=0.0)
    batch_size: int = option(8, "preference pairs per step", min=1)
    lr: float = option(5e-5, "learning rate (AdamW)", above=0.0)
    warmup: int = option(10, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    pair_prompts: int = option(256, "on-policy pairs: training prompts per round to sample answers for", min=1)
    samples_per_prompt: int = option(8, "on-policy pairs: answers sampled per prompt", min=2)
    pair_temperature: float = option(1.0, "on-policy pairs: sampling temperature", above=0.0)
    eval_every: int = option(0, "also evaluate held-out greedy accuracy every N steps (0: before training and after each round)", min=0)

    def validate(self):
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise MlxRlError("--label-smoothing applies to the sigmoid loss only")


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


def chosen_nll(policy_chosen, chosen_lengths):
    """Per-token negative log-likelihood of the chosen answers (the RPO term). (B,), (B,) -> ()"""
    return -policy_chosen.sum() / mx.maximum(chosen_lengths.sum(), 1.0)


def make_loss_fn(beta, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.0):
    """loss_fn(model, tokens (2B, T), mask (2B, T-1), ref_logps (2B,)): chosen rows first, then rejected."""

    def loss_fn(model, tokens, mask, ref_logps):
        logps = sequence_logprobs(model, tokens, mask)  # (2B,) completion tokens only
        B = logps.shape[0] // 2
        loss, metrics = dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta, loss_type, label_smoothing)
        metrics["loss/dpo"] = loss
        if rpo_alpha > 0:
            nll = chosen_nll(logps[:B], mask[:B].sum(axis=1))
            metrics["loss/nll"] = nll
            loss = loss + rpo_alpha * nll
        return loss, metrics

    return loss_fn


# --- pairs: token ids plus their reference log-probs --------------------------------


@dataclasses.dataclass
class Pairs:
    prompt_ids: list  # (P,) lists of prompt ids, BOS / chat template included
    chosen_ids: list  # (P,) lists of answer ids, EOS included where the answer ended with it
    rejected_ids: list  # (P,)
    ref_chosen: np.ndarray = None  # (P,) reference sequence log-probs, filled once before training
    ref_rejected: np.ndarray = None

    def __len__(self):
        return len(self.prompt_ids)

    def to_json(self):
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data):
        pairs = cls(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
        if data.get("ref_chosen") is not None:
            pairs.ref_chosen = np.array(data["ref_chosen"], dtype=np.float32)
            pairs.ref_rejected = np.array(data["ref_rejected"], dtype=np.float32)
        return pairs


def pair_batch(pairs, idx, pad_id=0):
    """Pairs idx as one batch: tokens (2B, T), mask (2B, T-1), ref log-probs (2B,) or None; chosen rows first."""
    prompt_ids = [pairs.prompt_ids[i] for i in idx] * 2
    answers = [pairs.chosen_ids[i] for i in idx] + [pairs.rejected_ids[i] for i in idx]
    n = max(len(a) for a in answers)
    completion_ids = [a + [pad_id] * (n - len(a)) for a in answers]  # (2B, N)
    completion_mask = [[1] * len(a) + [0] * (n - len(a)) for a in answers]
    tokens, mask = completion_batch(prompt_ids, completion_ids, completion_mask, pad_id)
    ref = None
    if pairs.ref_chosen is not None:
        ref = mx.array(np.concatenate([pairs.ref_chosen[idx], pairs.ref_rejected[idx]]))
    return tokens, mask, ref


def compute_reference(model, pairs, pad_id=0, batch_size=256):
    """Fill in the reference log-probs: one batched pass per chunk, no gradient, before any update."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        idx = np.arange(start, min(start + batch_size, len(pairs)))
        tokens, mask, _ = pair_batch(pairs, idx, pad_id)
        logps = mx.stop_gradient(sequence_logprobs(model, tokens, mask))  # (2b,)
        logps = np.array(logps)
        chosen.append(logps[: len(idx)])
        rejected.append(logps[len(idx):])
    pairs.ref_chosen = np.concatenate(chosen).astype(np.float32)
    pairs.ref_rejected = np.concatenate(rejected).astype(np.float32)
    return pairs


# --- pairs from a JSONL file ------------------------------------------------------------


def check_messages(value, key, where):
    if not value:
        raise MlxRlError(f"{where}: '{key}' is an empty list of messages")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise MlxRlError(f"{where}: each message in '{key}' must be an object with string 'role' and 'content'")


def answer_text(value, key, where):
    """An answer is a string, or a list of messages whose last one is the assistant's."""
    if isinstance(value, list):
        check_messages(value, key, where)
        if value[-1]["role"] != "assistant":
            raise MlxRlError(f"{where}: the last message of '{key}' must have role 'assistant', got {value[-1]['role']!r}")
        value = value[-1]["content"]
    elif not isinstance(value, str):
        raise MlxRlError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise MlxRlError(f"{where}: '{key}' is empty")
    return value


def read_pairs(path):
    """Read a preference-pair JSONL file: a list of {"prompt": str | messages, "chosen": str, "rejected": str}.

    Extra keys are ignored; blank lines are skipped. Any bad line raises an
    MlxRlError naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise MlxRlError(f"pairs file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise MlxRlError(f"{where}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise MlxRlError(f"{where}: each line must be a JSON object with 'prompt', 'chosen' and 'rejected'")
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise MlxRlError(f"{where}: missing key '{key}'")
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            check_messages(prompt, "prompt", where)
        elif not isinstance(prompt, str):
            raise MlxRlError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        elif not prompt:
            raise MlxRlError(f"{where}: 'prompt' is empty")
        chosen = answer_text(obj["chosen"], "chosen", where)
        rejected = answer_text(obj["rejected"], "rejected", where)
        if chosen == rejected:
            raise MlxRlError(f"{where}: 'chosen' and 'rejected' are the same answer")
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where})
    if not records:
        raise MlxRlError(f"pairs file {path} holds no pairs")
    return records


def tokenize_pairs(records, tokenizer, chat_template=False):
    """Text pairs -> Pairs: prompt ids, then answer ids + EOS, tokenised separately (never the joined string)."""
    eos = tokenizer.eos_token_id
    pairs = Pairs([], [], [])
    for r in records:
        if isinstance(r["prompt"], list):
            if not getattr(tokenizer, "has_chat_template", False):
                raise MlxRlError(f"{r['where']}: 'prompt' is a list of messages but the model's tokenizer has no chat template")
            prompt_ids = list(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True))
        else:
            prompt_ids = encode_prompts(tokenizer, [r["prompt"]], chat_template)[0]
        pairs.prompt_ids.append(prompt_ids)
        pairs.chosen_ids.append(tokenizer.encode(r["chosen"], add_special_tokens=False) + [eos])
        pairs.rejected_ids.append(tokenizer.encode(r["rejected"], add_special_tokens=False) + [eos])
    return pairs


def write_pairs(path, rows):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- pairs built on-policy from the task reward ------------------------------------------


def build_pairs(model, tokenizer, task, prompts, samples_per_prompt, temperature=1.0, chat_template=False, timer=None, chunk=1024):
    """Sample answers, score them with the task reward, pair the best with the worst of each prompt.

    Returns (Pairs with the sampled token ids, JSONL rows, metrics). Prompts
    whose answers all score the same make no pair and are counted as skipped
    (so are the rare pairs with an empty answer, which the JSONL format can't hold).
    """
    timer = timer or PhaseTimer()
    k = samples_per_prompt
    pad_id = tokenizer.pad_token_id or 0
    rows = [p for p in prompts for _ in range(k)]  # (P * k,) each prompt k times in a row
    ids, masks, texts, prompt_ids = [], [], [], []
    with timer("generate"):
        for start in range(0, len(rows), chunk):
            r = generate(model, tokenizer, rows[start : start + chunk], task.max_new_tokens, temperature=temperature, chat_template=chat_template)
            n = r.completion_ids.shape[1]
            ids += [row + [pad_id] * (task.max_new_tokens - n) for row in np.array(r.completion_ids).tolist()]
            masks += [row + [0] * (task.max_new_tokens - n) for row in np.array(r.mask).astype(int).tolist()]
            texts += r.texts
            prompt_ids += r.prompt_ids
    with timer("reward"):
        rewards = np.array([task.reward(p, c) for p, c in zip(rows, texts)]).reshape(len(prompts), k)  # (P, k)
        correct = np.array([task.is_correct(p, c) for p, c in zip(rows, texts)]).reshape(len(prompts), k)
    pairs, jsonl = Pairs([], [], []), []
    for i, prompt in enumerate(prompts):
        best, worst = int(rewards[i].argmax()), int(rewards[i].argmin())
        b, w = i * k + best, i * k + worst
        if rewards[i, best] == rewards[i, worst]:
            continue  # no preference to learn from
        if not (texts[b].strip() and texts[w].strip()):
            continue  # an empty answer (EOS at once) can't be written as a pair; skip it
        pairs.prompt_ids.append(prompt_ids[b])
        pairs.chosen_ids.append(ids[b][: sum(masks[b])])  # the sampled ids, EOS included, never re-tokenised
        pairs.rejected_ids.append(ids[w][: sum(masks[w])])
        jsonl.append({"prompt": prompt, "chosen": texts[b], "rejected": texts[w],
                      "score_chosen": float(rewards[i, best]), "score_rejected": float(rewards[i, worst])})
    metrics = {
        "pairs/count": len(pairs),
        "pairs/skipped_prompts": len(prompts) - len(pairs),
        "pairs/chosen_correct": float(np.mean([r["score_chosen"] >= 1 for r in jsonl])) if jsonl else float("nan"),
        "train/accuracy": float(correct.mean()),  # of the temperature-`temperature` samples
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
    }
    return pairs, jsonl, metrics


# --- the run ----------------------------------------------------------------------------


def batch_order(n_pairs, batch_size, seed):
    """One epoch's batches: a shuffle reproducible from seed (for --resume), ragged end dropped (one shape to compile)."""
    order = np.random.default_rng(seed).permutation(n_pairs)
    size = min(batch_size, n_pairs)
    return [order[i : i + size] for i in range(0, n_pairs - size + 1, size)]


def round_batches(n_pairs, cfg, round_index):
    return [b for epoch in range(cfg.epochs) for b in batch_order(n_pairs, cfg.batch_size, [cfg.seed, round_index, epoch])]


def prepare_pairs(cfg, session, round_index, step, timer):
    """One round's pairs (from --pairs, or sampled from the current policy) with their reference log-probs.

    The reference is the policy as it is now, before this round's first update:
    its log-probs are computed once per pair and stored (RUN/pair_tokens.json,
    which --resume reads back).
    """
    model, tokenizer, task, run = session.model, session.tokenizer, session.task, session.run
    metrics = {}
    if cfg.pairs:
        pairs = tokenize_pairs(read_pairs(cfg.pairs), tokenizer, cfg.chat_template)
        metrics["pairs/count"] = len(pairs)
    else:
        prompts = task.prompts("train", cfg.pair_prompts, seed=cfg.seed * 1000 + round_index)
        pairs, rows, metrics = build_pairs(model, tokenizer, task, prompts, cfg.samples_per_prompt, cfg.pair_temperature, cfg.chat_template, timer)
        write_pairs(run.path / f"pairs-round{round_index}.jsonl", rows)
        if len(pairs) == 0:
            print(f"round {round_index}: no pairs (every prompt's {cfg.samples_per_prompt} answers scored the same); "
                  "skipping it. More --samples-per-prompt or a higher --pair-temperature find more.")
            return pairs, metrics
    with timer("reference"):
        compute_reference(model, pairs, tokenizer.pad_token_id or 0)
    atomic_write_json(run.path / "pair_tokens.json", {"round": round_index, "start_step": step, **pairs.to_json()})
    return pairs, metrics


def run_dpo(cfg):
    train.resolve_policy_model(cfg)
    session = train.start("dpo", cfg)
    model, tokenizer, task, run = session.model, session.tokenizer, session.task, session.run
    pad_id = tokenizer.pad_token_id or 0
    rounds = 1 if cfg.pairs else cfg.rounds
    timer = PhaseTimer()
    heldout = task.prompts("heldout", cfg.eval_prompts, seed=cfg.seed)
    optimizer = train.make_optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay)
    train.restore(session, optimizer)
    loss_fn = make_loss_fn(cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.rpo_alpha)
    if cfg.compile:  # one compiled graph for gradient + clipping + AdamW: the step is overhead-bound
        update = train.make_fused_update(model, optimizer, loss_fn, cfg.max_grad_norm)
    else:
        update = train.make_update(model, optimizer, loss_fn, cfg.max_grad_norm, compile=False)
    step = session.start_step
    before, metrics, row = {}, {}, {}
    progress = None

    with train.interruptible(session, lambda: (step, optimizer)):
        if step == 0:
            with timer("eval"):
                before, samples = train.evaluate(model, tokenizer, task, heldout, cfg.chat_template)
            run.log_samples(0, samples)
            run.log(0, {**before, **timer.pop()})
            print(f"held-out greedy accuracy before DPO {before['eval/accuracy']:.1%}")
            round_index, round_start, pairs = 0, 0, None
        else:  # --resume: carry on with the round the checkpoint is in
            before = {k: v for k, v in run.metrics()[0].items() if k.startswith("eval/")}
            saved = json.loads((run.path / "pair_tokens.json").read_text())
            round_index, round_start, pairs = saved["round"], saved["start_step"], Pairs.from_json(saved)
            if step >= round_start + len(round_batches(len(pairs), cfg, round_index)):
                round_index, round_start, pairs = round_index + 1, step, None
        metrics = dict(before)
        progress = Progress(rounds, round_index, every=1, desc="dpo rounds")

        while round_index < rounds and not (cfg.steps and step >= cfg.steps):
            pair_metrics = {}
            if pairs is None:
                train.step_seed(cfg, step)  # --resume samples the same pairs again
                pairs, pair_metrics = prepare_pairs(cfg, session, round_index, step, timer)
            batches = round_batches(len(pairs), cfg, round_index) if len(pairs) else []
            for i in range(step - round_start, len(batches)):
                with timer("data"):
                    tokens, mask, ref = pair_batch(pairs, batches[i], pad_id)
                loss, aux, grad_norm = update(tokens, mask, ref, timer=timer)
                step += 1
                last = i == len(batches) - 1 or step == cfg.steps
                row = {"loss/total": loss.item(), **{k: v.item() for k, v in aux.items()}, **pair_metrics,
                       "optim/grad_norm": grad_norm.item(), "optim/lr": train.current_lr(optimizer), "dpo/round": round_index}
                pair_metrics = {}  # logged with the round's first step
                if last or (cfg.eval_every and step % cfg.eval_every == 0):
                    with timer("eval"):
                        metrics, samples = train.evaluate(model, tokenizer, task, heldout, cfg.chat_template)
                    row.update(metrics)
                    run.log_samples(step, samples)
                    train.save(session, step, optimizer)
                row.update(timer.pop())
                row["perf/peak_memory_gb"] = train.peak_memory_gb()
                run.log(step, row)
                if last:
                    break
            round_index, round_start, pairs = round_index + 1, step, None
            progress.update(round_index, steps=step, loss=row["loss/total"], acc=metrics.get("eval/accuracy", float("nan")))
    progress.close()

    plot_run(run.path)
    summary = run.write_summary(
        steps=step, rounds=round_index, accuracy_before=before.get("eval/accuracy"),
        **metrics, checkpoint=str(run.checkpoint_dir),
    )
    print(f"held-out greedy accuracy {before.get('eval/accuracy', math.nan):.1%} -> {metrics['eval/accuracy']:.1%} "
          f"in {summary['wall_s']:.0f} s  ({run.path})")
    return summary


cli = command("dpo", DPOConfig, run_dpo, help=__doc__.split("\n\n")[0])


# --- `mlx-rl dpo-pairs`: write on-policy pairs as JSONL -------------------------------------


@dataclasses.dataclass
class PairsConfig:
    out: str = option("pairs.jsonl", "JSONL file to write")
    model: typing.Optional[str] = option(None, "checkpoint to sample from (default: the newest pretrain run for the task)")
    task: str = option("addition", "task whose reward ranks the answers (see `mlx-rl tasks`)")
    digits: int = option(2, "addition: operand digits", min=1, max=6)
    sort_length: int = option(5, "sort: list length", min=2, max=12)
    seed: int = option(0, "random seed for prompts and sampling")
    pair_prompts: int = option(1024, "training prompts to sample answers for", min=1)
    samples_per_prompt: int = option(8, "answers sampled per prompt", min=2)
    pair_temperature: float = option(1.0, "sampling temperature", above=0.0)
    chat_template: bool = option(False, "wrap prompts in the tokenizer's chat template")


def run_dpo_pairs(cfg):
    from mlx_rl.models import load_model

    probe = types.SimpleNamespace(model=cfg.model, resume=None, task=cfg.task)
    train.resolve_policy_model(probe)  # --model defaults to the newest pretrain run
    task = get_task(cfg.task, **{"addition": {"digits": cfg.digits}, "sort": {"length": cfg.sort_length}}.get(cfg.task, {}))
    model, tokenizer, _ = load_model(probe.model)
    mx.random.seed(cfg.seed)
    prompts = task.prompts("train", cfg.pair_prompts, seed=cfg.seed)
    _, rows, metrics = build_pairs(model, tokenizer, task, prompts, cfg.samples_per_prompt, cfg.pair_temperature, cfg.chat_template)
    write_pairs(cfg.out, rows)
    print(f"wrote {len(rows)} pairs to {cfg.out} ({metrics['pairs/skipped_prompts']} of {len(prompts)} prompts skipped: "
          f"all answers scored the same; sample accuracy {metrics['train/accuracy']:.1%})")
    return metrics


cli_dpo_pairs = command("dpo-pairs", PairsConfig, run_dpo_pairs, help="Build preference pairs on-policy: sample answers, rank them with the task reward, write JSONL.")
