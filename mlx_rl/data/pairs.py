"""DPO preference pairs from JSONL, in TRL's preference formats.

Each pair is read as {"prompt": str | messages, "chosen": str, "rejected": str,
"where": "file:line"} (plus "score_chosen" / "score_rejected" when the line
has them; other keys are ignored). Accepted lines:

  explicit prompt    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
  conversational     {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                      "chosen": [{"role": "assistant", "content": "It is blue."}],
                      "rejected": [{"role": "assistant", "content": "It is green."}]}
                     (chosen / rejected may also be plain strings)
  implicit prompt    {"chosen": [<user msg>, <assistant msg>], "rejected": [<user msg>, <assistant msg>]}
                     {"chosen": "The sky is blue.", "rejected": "The sky is green."}

Implicit prompts follow TRL's `extract_prompt`:
  - Conversations: the prompt is the messages both conversations start with;
    what follows must be one assistant message on each side. A string `prompt`
    next to conversational chosen / rejected repeats the conversation's user
    turn (as in several hub data sets) and is dropped, as TRL's
    `maybe_extract_prompt` does; a messages `prompt` comes before the shared ones.
  - Strings: the prompt is the longest common prefix, with two decisions of ours.
    It is cut back to the start of the word or number the answers differ in
    ("07+45=250" / "07+45=240" -> "07+45=" + "250" / "240", where TRL would
    cut after "07+45=2"), and whitespace at its end moves to the front of the
    answers ("The sky is" + " blue."), as TRL moves one space. A pair whose
    common prefix is then empty is an error: give an explicit prompt.

A PATH is a JSONL file or a folder with train.jsonl and an optional
valid.jsonl; `read_pairs` gives the train pairs, `load_pairs` every split.
Errors are one line naming file:line.
"""

import dataclasses
import json
import math
import os
from pathlib import Path

from mlx_rl.config import MlxRlError
from mlx_rl.data.jsonl import Splits, check_messages, kind, load_splits

SCORE_KEYS = ("score_chosen", "score_rejected")


@dataclasses.dataclass
class PairData(Splits):
    """Pairs by split: train, valid (valid.jsonl, or held out when valid_share > 0), test (test.jsonl)."""


def answer_text(value, key, where, explicit_prompt=True):
    """An answer: a string, or a list of one assistant message (its content)."""
    if isinstance(value, list):
        if value[-1]["role"] != "assistant":
            raise MlxRlError(f"{where}: the last message of '{key}' must have role 'assistant', got {value[-1]['role']!r}")
        if len(value) != 1:
            which = "with an explicit 'prompt'" if explicit_prompt else "after the messages they share"
            raise MlxRlError(f"{where}: '{key}' has {len(value)} messages; {which} it must be one assistant message")
        value = value[0]["content"]
    if not value.strip():
        raise MlxRlError(f"{where}: '{key}' is empty")
    return value


def split_common_prefix(chosen, rejected, where):
    """Implicit string prompt -> (prompt, chosen, rejected); see the module docstring."""
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1].isalnum():  # not inside the word or number the answers differ in
        n -= 1
    prompt = chosen[:n].rstrip()
    if not prompt:
        raise MlxRlError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no prompt text at their start; add a 'prompt'")
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def parse_pair(obj, where):
    if not isinstance(obj, dict):
        raise MlxRlError(f"{where}: each line must be a JSON object with 'chosen' and 'rejected' (and usually 'prompt'), got {kind(obj)}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise MlxRlError(f"{where}: missing key '{key}'")
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list):
            check_messages(value, key, where)
        elif not isinstance(value, str):
            raise MlxRlError(f"{where}: '{key}' must be a string or a list of messages, got {kind(value)}")
    if "prompt" in obj:
        if isinstance(prompt, list):
            check_messages(prompt, "prompt", where)
        elif not isinstance(prompt, str):
            raise MlxRlError(f"{where}: 'prompt' must be a string or a list of messages, got {kind(prompt)}")
        elif not prompt.strip():
            raise MlxRlError(f"{where}: 'prompt' is empty")

    if isinstance(chosen, list) and isinstance(rejected, list) and chosen[0] == rejected[0]:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == len(chosen) == len(rejected):
            raise MlxRlError(f"{where}: 'chosen' and 'rejected' are the same conversation")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if shared == len(value):
                raise MlxRlError(f"{where}: '{key}' has no message after the {shared} both conversations share")
        head = [dict(m) for m in prompt] if isinstance(prompt, list) else []
        prompt = head + [dict(m) for m in chosen[:shared]]
        chosen = answer_text(chosen[shared:], "chosen", where, explicit_prompt=False)
        rejected = answer_text(rejected[shared:], "rejected", where, explicit_prompt=False)
    elif prompt is None:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            what = "conversations with no message in common" if isinstance(chosen, list) and isinstance(rejected, list) else "a string and a list"
            raise MlxRlError(f"{where}: no 'prompt', and 'chosen' and 'rejected' are {what}, so the prompt is unknown; add a 'prompt'")
        if chosen == rejected:
            raise MlxRlError(f"{where}: 'chosen' and 'rejected' are the same answer")
        prompt, chosen, rejected = split_common_prefix(chosen, rejected, where)
        chosen, rejected = answer_text(chosen, "chosen", where), answer_text(rejected, "rejected", where)
    else:
        chosen, rejected = answer_text(chosen, "chosen", where), answer_text(rejected, "rejected", where)
    if chosen == rejected:
        raise MlxRlError(f"{where}: 'chosen' and 'rejected' are the same answer")
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where}
    for key in SCORE_KEYS:
        if key in obj:
            value = obj[key]
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise MlxRlError(f"{where}: '{key}' must be a finite number, got {kind(value)}")
            record[key] = value
    return record


def pair_key(record):
    return json.dumps(record["prompt"], sort_keys=True, ensure_ascii=False)


def load_pairs(path, seed=0, valid_share=0.0, min_valid=1, columns=None):
    """Every split of a pairs file or folder; with valid_share > 0 and no valid.jsonl, a seeded share of the
    prompts is held out (pairs of one prompt stay together)."""
    return PairData(**load_splits(path, parse_pair, pair_key, seed, valid_share, min_valid, "pairs file", columns))


def read_pairs(path, columns=None):
    """The train pairs of a file (all of them) or a folder (train.jsonl): [{"prompt", "chosen", "rejected", "where"}]."""
    return load_pairs(path, columns=columns).train


def write_pairs(path, rows):
    """Write pairs in TRL's explicit-prompt format, atomically (a temp file, then os.replace).

    A messages prompt gets chosen / rejected as one-assistant-message lists
    (TRL's conversational format); score_chosen / score_rejected are kept, other keys dropped.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # same folder, so os.replace is atomic; umask permissions
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                out = {"prompt": r["prompt"]}
                for key in ("chosen", "rejected"):
                    value = r[key]
                    out[key] = [{"role": "assistant", "content": value}] if isinstance(r["prompt"], list) and isinstance(value, str) else value
                out.update({k: r[k] for k in SCORE_KEYS if k in r})
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pair_tokens(pairs, idx):
    """Tokens of a batch of pairs as the training pass reads them: prompt + chosen, prompt + rejected."""
    return float(sum(2 * len(pairs.prompt_ids[j]) + len(pairs.chosen_ids[j]) + len(pairs.rejected_ids[j]) for j in idx))


# --- pairs as token ids, for training -------------------------------------------------------------
# Training never re-tokenises sampled text: pairs built on-policy keep the ids that were
# sampled. Text pairs from a file are tokenised as prompt ids (BOS or chat template
# included) + answer ids + EOS, each part on its own and never as one joined string, so
# the boundary between prompt and answer is exact even with BPE tokenizers.


@dataclasses.dataclass
class Pairs:
    prompt_ids: list  # (P,) lists of prompt ids, BOS / chat template included
    chosen_ids: list  # (P,) lists of answer ids, EOS included where the answer ended with it
    rejected_ids: list  # (P,)
    ref_chosen: "np.ndarray" = None  # (P,) reference sequence log-probs, filled once before training
    ref_rejected: "np.ndarray" = None

    def __len__(self):
        return len(self.prompt_ids)

    def to_json(self):
        return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data):
        import numpy as np

        pairs = cls(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
        if data.get("ref_chosen") is not None:
            pairs.ref_chosen = np.array(data["ref_chosen"], dtype=np.float32)
            pairs.ref_rejected = np.array(data["ref_rejected"], dtype=np.float32)
        return pairs


def tokenize_pairs(records, tokenizer, chat_template=False):
    """Text pairs -> Pairs: prompt ids, then answer ids + EOS, tokenised separately (never the joined string)."""
    from mlx_rl.engine.sampling import encode_prompts

    eos = tokenizer.eos_token_id
    pairs = Pairs([], [], [])
    for r in records:
        if isinstance(r["prompt"], list) and not getattr(tokenizer, "has_chat_template", False):
            raise MlxRlError(f"{r['where']}: 'prompt' is a list of messages but the model's tokenizer has no chat template")
        pairs.prompt_ids.append(encode_prompts(tokenizer, [{"prompt": r["prompt"]}], chat_template)[0])
        pairs.chosen_ids.append(tokenizer.encode(r["chosen"], add_special_tokens=False) + [eos])
        pairs.rejected_ids.append(tokenizer.encode(r["rejected"], add_special_tokens=False) + [eos])
    return pairs


def pair_batch(pairs, idx, pad_id=0):
    """Pairs idx as one batch: tokens (2B, T), mask (2B, T-1), ref log-probs (2B,) or None; chosen rows first."""
    import mlx.core as mx
    import numpy as np

    from mlx_rl.engine.logprobs import completion_batch

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


def build_pairs(model, tokenizer, task, rows, samples_per_prompt, temperature=1.0, chat_template=False, timer=None,
                chunk=1024, world=None):
    """On-policy pairs: sample answers, score them with the task's rewards, pair the best with the worst of each prompt.

    Returns (Pairs with the sampled token ids, JSONL rows for `write_pairs`, metrics).
    Prompts whose answers all score the same make no pair and are counted as skipped
    (so are the rare pairs with an empty answer, which the JSONL format can't hold).
    In a data-parallel run each rank samples its share of the prompts and every rank
    gets all the pairs.
    """
    import numpy as np

    from mlx_rl.engine.evaluate import score_rows
    from mlx_rl.engine.sampling import generate, row_keys
    from mlx_rl.runs import PhaseTimer

    timer = timer or PhaseTimer()
    k, N = samples_per_prompt, task.max_new_tokens
    pad_id = tokenizer.pad_token_id or 0
    mine = world.shard(rows) if world is not None else rows
    repeated = [r for r in mine for _ in range(k)]  # (P * k,) each prompt k times in a row
    keys = row_keys(len(rows) * k, world, rows_per_item=k)  # each answer its own random stream
    ids, masks, texts, prompt_ids = [], [], [], []
    with timer("generate"):
        for start in range(0, len(repeated), chunk):
            r = generate(model, tokenizer, repeated[start : start + chunk], N, temperature=temperature,
                         chat_template=chat_template, keys=keys[start : start + chunk])
            n = r.completion_ids.shape[1]
            ids += [row + [pad_id] * (N - n) for row in np.array(r.completion_ids).tolist()]
            masks += [row + [0] * (N - n) for row in np.array(r.mask).astype(int).tolist()]
            texts += r.texts
            prompt_ids += r.prompt_ids
    with timer("reward"):
        scores = score_rows(task, repeated, texts, training=True) if repeated else None
        rewards = scores.total.reshape(len(mine), k) if repeated else np.zeros((0, k))  # (P, k)
    pairs, jsonl, chosen_right = Pairs([], [], []), [], []
    verifier = (task.training_rewards or task.rewards).is_verifier() if repeated else False
    for i, row in enumerate(mine):
        best, worst = int(rewards[i].argmax()), int(rewards[i].argmin())
        b, w = i * k + best, i * k + worst
        if rewards[i, best] == rewards[i, worst]:
            continue  # no preference to learn from
        if not (texts[b].strip() and texts[w].strip()):
            continue  # an empty answer (EOS at once) can't be written as a pair; skip it
        if verifier:  # is the chosen answer one the first reward (a 0/1 verifier) accepts?
            chosen_right.append(float(scores.per_reward[scores.names[0]][b] >= 1))
        pairs.prompt_ids.append(prompt_ids[b])
        pairs.chosen_ids.append(ids[b][: sum(masks[b])])  # the sampled ids, EOS included, never re-tokenised
        pairs.rejected_ids.append(ids[w][: sum(masks[w])])
        jsonl.append({"prompt": row["prompt"], "chosen": texts[b], "rejected": texts[w],
                      "score_chosen": float(rewards[i, best]), "score_rejected": float(rewards[i, worst])})
    if world is not None and world.size > 1:  # every rank gets every rank's pairs, in rank order
        parts = world.all_json([pairs.to_json(), jsonl])
        pairs, jsonl = merge_pairs([(Pairs.from_json(p), rows) for p, rows in parts])
    right_sums = world.sum(np.array([sum(chosen_right), len(chosen_right)])) if world is not None else np.array(
        [sum(chosen_right), len(chosen_right)])
    chosen_correct = float(right_sums[0] / right_sums[1]) if verifier and right_sums[1] else float("nan")
    first = scores.per_reward[scores.names[0]] if repeated else np.zeros(0)
    accuracy_sums = np.array([np.nansum(first), np.isfinite(first).sum(), rewards.sum(), (rewards ** 2).sum(), rewards.size])
    if world is not None:
        accuracy_sums = world.sum(accuracy_sums)
    mean = accuracy_sums[2] / max(accuracy_sums[4], 1)
    metrics = {
        "pairs/count": len(pairs),
        "pairs/skipped_prompts": len(rows) - len(pairs),
        "pairs/chosen_correct": chosen_correct,
        "reward/mean": float(mean),
        "reward/std": float(np.sqrt(max(accuracy_sums[3] / max(accuracy_sums[4], 1) - mean ** 2, 0.0))),
    }
    if (task.training_rewards or task.rewards).is_verifier():
        metrics["train/accuracy"] = float(accuracy_sums[0] / max(accuracy_sums[1], 1))  # of the sampled answers
    return pairs, jsonl, metrics


def merge_pairs(parts):
    """Each rank's (Pairs, JSONL rows), in rank order -> one (Pairs, rows)."""
    pairs, rows = Pairs([], [], []), []
    for p, r in parts:
        pairs.prompt_ids += p.prompt_ids
        pairs.chosen_ids += p.chosen_ids
        pairs.rejected_ids += p.rejected_ids
        rows += r
    return pairs, rows
