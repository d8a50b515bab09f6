"""The user's own data: prompt sets for GRPO / PPO / evaluation, and corpora for pretraining and fine-tuning.

Both read a JSONL file or an mlx-lm data folder (`train.jsonl`, optional
`valid.jsonl` and `test.jsonl`); see jsonl.py for the layout, the held-out
split and the error standard (one line naming file:line).

Prompt data, one row per line (TRL's "prompt-only" format, plain or conversational):

    {"prompt": "What is 3 + 8?", "answer": "11"}
    {"prompt": [{"role": "user", "content": "What is 3 + 8?"}], "answer": 11}
    {"system": "Answer with a number.", "prompt": "What is 3 + 8?", "answer": 11}

`prompt` is a string or a list of chat messages; `system` (optional) is a
string; every other column (answer, solution, ...) is kept as it is and handed
to the reward functions as a keyword argument (see rewards.py).

Corpus rows, one of mlx-lm's three formats (one format per corpus):

    {"text": "..."}                           loss on every token
    {"prompt": "...", "completion": "..."}    loss on the completion only
    {"messages": [{"role": ..., "content": ...}, ...]}   chat: loss on the assistant's turns

Decisions:
  - A null or empty `system` means no system message.
  - `prompt_text` (for models without a chat template) writes a system column
    before the prompt, on its own line: f"{system}\\n{prompt}".
  - A prompt/completion row may also be TRL's conversational prompt-completion
    (`prompt` a list of messages, `completion` one assistant message in a list).
  - A chat row must end with the assistant's message. `corpus_examples` gives
    (the messages before it, its content): the loss goes on the last assistant
    turn only. `chat_tokens` masks every assistant turn, given the tokenizer's
    chat template.
"""

import dataclasses
import json

from mlx_rl.config import MlxRlError
from mlx_rl.data.jsonl import ROLES, Row, Splits, check_messages, kind, load_splits

# ----------------------------------------------------------------------------- prompt data


@dataclasses.dataclass
class PromptData(Splits):
    """Prompt rows by split, and `columns`: the column names present in every row of every split."""

    columns: set = dataclasses.field(default_factory=set)


def parse_prompt_row(obj, where):
    if not isinstance(obj, dict):
        raise MlxRlError(f"{where}: each line must be a JSON object with a 'prompt', got {kind(obj)}")
    if "prompt" not in obj:
        hint = " (a row with 'messages' or 'text' is corpus data, for pretraining)" if {"messages", "text"} & obj.keys() else ""
        raise MlxRlError(f"{where}: missing key 'prompt' (the row has: {', '.join(obj) or 'nothing'}){hint}")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        check_messages(prompt, "prompt", where)
    elif not isinstance(prompt, str):
        raise MlxRlError(f"{where}: 'prompt' must be a string or a list of messages, got {kind(prompt)}")
    elif not prompt.strip():
        raise MlxRlError(f"{where}: 'prompt' is empty")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise MlxRlError(f"{where}: 'system' must be a string, got {kind(system)}")
    if system and isinstance(prompt, list) and prompt[0]["role"] == "system":
        raise MlxRlError(f"{where}: both a 'system' column and a system message in 'prompt'; keep one")
    return Row(obj, where)


def prompt_key(row):
    """What the held-out split groups rows by: the system text and the prompt (no JSON for plain strings: faster)."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return f"{row.get('system') or ''}\0{prompt}"
    return f"{row.get('system') or ''}\1" + json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def load_prompts(path, seed=0, valid_share=0.1, min_valid=1, columns=None):
    """Prompt rows from a data file or folder (formats.py); without valid.jsonl, a seeded share is held out.

    min_valid: the fewest rows held out when valid_share > 0. columns: --columns renames.
    """
    splits = load_splits(path, parse_prompt_row, prompt_key, seed, valid_share, min_valid, "prompt data", columns)
    rows = splits["train"] + splits["valid"] + splits["test"]
    columns = set(rows[0]).intersection(*rows[1:])
    return PromptData(**splits, columns=columns)


def needs_chat_template(row):
    """Is this row's prompt a list of messages (so it can only be tokenised with a chat template)?"""
    return isinstance(row["prompt"], list)


def prompt_messages(row):
    """The row as chat messages: the system message (when there is one), then the prompt's messages
    (or one user message for a string prompt)."""
    system = row.get("system")
    head = [{"role": "system", "content": system}] if system else []
    if isinstance(row["prompt"], list):
        return head + [dict(m) for m in row["prompt"]]
    return head + [{"role": "user", "content": row["prompt"]}]


def prompt_text(row):
    """The raw prompt for a model without a chat template: the string prompt, after the system column and
    a newline when there is one. A messages prompt raises MlxRlError (check needs_chat_template first)."""
    if needs_chat_template(row):
        where = getattr(row, "where", "a prompt row")
        raise MlxRlError(f"{where}: 'prompt' is a list of messages, which needs a chat template, and this model has none")
    system = row.get("system")
    return f"{system}\n{row['prompt']}" if system else row["prompt"]


def sample_rows(rows, rng, n):
    """n rows drawn uniformly with replacement by a numpy Generator: the same rng state draws the same rows."""
    if not rows:
        raise ValueError("sample_rows: no rows to draw from")
    return [rows[i] for i in rng.integers(len(rows), size=n)]


# ----------------------------------------------------------------------------- corpora

CORPUS_FORMATS = ("text", "completions", "chat")  # mlx-lm's TextDataset, CompletionsDataset, ChatDataset


@dataclasses.dataclass
class CorpusData(Splits):
    """Corpus rows by split, and `format`: "text", "completions" or "chat"."""

    format: str = "text"


def corpus_format(obj, where):
    """Which of mlx-lm's formats a row is in, validating it; mlx-lm's precedence: messages, prompt/completion, text."""
    if not isinstance(obj, dict):
        raise MlxRlError(f"{where}: each line must be a JSON object, got {kind(obj)}")
    if "messages" in obj:
        messages = obj["messages"]
        check_messages(messages, "messages", where)
        if messages[-1]["role"] != "assistant":
            raise MlxRlError(f"{where}: the last message of 'messages' must be the assistant's (the turn to learn), "
                             f"got role {messages[-1]['role']!r}")
        return "chat"
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise MlxRlError(f"{where}: a prompt/completion row needs both, and it has no '{key}'")
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, list):
            check_messages(prompt, "prompt", where)
        elif not isinstance(prompt, str):
            raise MlxRlError(f"{where}: 'prompt' must be a string or a list of messages, got {kind(prompt)}")
        if isinstance(completion, list):
            check_messages(completion, "completion", where)
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise MlxRlError(f"{where}: a 'completion' list must be one assistant message")
            completion = completion[0]["content"]
        elif not isinstance(completion, str):
            raise MlxRlError(f"{where}: 'completion' must be a string, got {kind(completion)}")
        if not completion.strip():
            raise MlxRlError(f"{where}: 'completion' is empty")
        return "completions"
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise MlxRlError(f"{where}: 'text' must be a string, got {kind(obj['text'])}")
        if not obj["text"].strip():
            raise MlxRlError(f"{where}: 'text' is empty")
        return "text"
    raise MlxRlError(f"{where}: a corpus row needs 'text', 'prompt' and 'completion', or 'messages' "
                     f"(the row has: {', '.join(obj) or 'nothing'})")


def corpus_key(row):
    if isinstance(row.get("text"), str) and "messages" not in row and "prompt" not in row:
        return "\0" + row["text"]
    return json.dumps({k: row.get(k) for k in ("prompt", "completion", "messages")}, sort_keys=True, ensure_ascii=False)


def load_corpus(path, seed=0, valid_share=0.1, min_valid=1, columns=None):
    """Corpus rows from a JSONL file or data folder, all in one of mlx-lm's formats; without valid.jsonl,
    a seeded share is held out."""
    first = {}

    def parse(obj, where):
        fmt = corpus_format(obj, where)
        if not first:
            first.update(format=fmt, where=where)
        elif fmt != first["format"]:
            raise MlxRlError(f"{where}: a '{fmt}' row, but the corpus's first row ({first['where']}) is a "
                             f"'{first['format']}' row; a corpus has one format")
        return Row(obj, where)

    splits = load_splits(path, parse, corpus_key, seed, valid_share, min_valid, "corpus", columns)
    return CorpusData(**splits, format=first["format"])


def corpus_examples(rows):
    """[(prompt_part, completion_part)] to tokenise, the loss going on the completion part:
    text rows give ("", text); prompt/completion rows (prompt, completion), the prompt a string or messages;
    chat rows (the messages before the last one, the last (assistant) message's content)."""
    out = []
    for row in rows:
        if "messages" in row:
            out.append(([dict(m) for m in row["messages"][:-1]], row["messages"][-1]["content"]))
        elif "prompt" in row:
            completion = row["completion"]
            out.append((row["prompt"], completion[0]["content"] if isinstance(completion, list) else completion))
        else:
            out.append(("", row["text"]))
    return out


def chat_tokens(messages, render, where="a chat row"):
    """(ids, mask) of a whole conversation, the mask 1 on every assistant turn's tokens, 0 elsewhere.

    render(messages, add_generation_prompt) -> token ids is the chat template, e.g.
    `lambda m, g: tokenizer.apply_chat_template(m, add_generation_prompt=g)`.
    An assistant turn is the tokens between the render of the messages before it
    (generation prompt included) and the render up to and including it. That
    needs a template whose renders of a conversation's beginnings are prefixes of
    the whole (most are; Qwen3's, which drops earlier turns' reasoning, is not):
    otherwise this raises MlxRlError, and the caller can fall back to the last
    assistant turn (corpus_examples).
    """
    ids = list(render(messages, False))
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = list(render(messages[:i], True)) if i else []
        upto = list(render(messages[: i + 1], False))
        if not (len(before) <= len(upto) <= len(ids) and ids[: len(upto)] == upto and upto[: len(before)] == before):
            raise MlxRlError(f"{where}: the chat template does not render message {i + 1} as a continuation of "
                             "the messages before it, so its tokens can't be masked turn by turn")
        mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
    return ids, mask


# ----------------------------------------------------------------------------- vocabulary


def charset(rows):
    """Every character in the rows' text, sorted, as one string: for a tiny model's character vocabulary.

    Walks every column: strings, numbers (as str() writes them), lists, and
    objects (a chat message contributes its content, not its role). The
    top-level "where" key that pair records carry is skipped.
    """
    chars = set()

    def walk(value):
        if isinstance(value, str):
            chars.update(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            chars.update(str(value))
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            if isinstance(value.get("role"), str) and value["role"] in ROLES and "content" in value:
                walk(value["content"])
            else:
                for v in value.values():
                    walk(v)

    for row in rows:
        for k, v in row.items():
            if k != "where":
                walk(v)
    return "".join(sorted(chars))
