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


def load_pairs(path, seed=0, valid_share=0.0, min_valid=1):
    """Every split of a pairs file or folder; with valid_share > 0 and no valid.jsonl, a seeded share of the
    prompts is held out (pairs of one prompt stay together)."""
    return PairData(**load_splits(path, parse_pair, pair_key, seed, valid_share, min_valid, "pairs file"))


def read_pairs(path):
    """The train pairs of a file (all of them) or a folder (train.jsonl): [{"prompt", "chosen", "rejected", "where"}]."""
    return load_pairs(path).train


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
