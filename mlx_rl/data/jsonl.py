"""Data files read into train/valid/test splits, with one-line errors that name file:line.

Shared by prompt data (datasets.py), corpora (datasets.py) and preference pairs
(pairs.py). A data PATH is either one JSONL file or a folder holding
`train.jsonl` and optionally `valid.jsonl` and `test.jsonl` (mlx-lm's layout);
JSON arrays, CSV, Parquet and `datasets.save_to_disk` folders are read too,
and `--columns` renames a dataset's columns (formats.py). JSONL files are read
line by line, so a large file is never held as one string; blank lines are skipped.

When there is no `valid.jsonl`, a seeded share of the rows is held out for
validation. The split is by a hash of each row's *key* (its prompt, for
prompt data), not by position: rows with the same key always land on the same
side, so a prompt that appears twice in the file can't be trained on and
"held out" at once, and the split does not move when rows are reordered.
"""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from mlx_rl.config import MlxRlError
from mlx_rl.data.formats import Source, layout, parse_columns, rename

ROLES = ("system", "user", "assistant", "tool")


class Row(dict):
    """A data row: exactly the file's columns as a plain dict, plus `.where` ("file:line") for error messages."""

    def __init__(self, values, where):
        super().__init__(values)
        self.where = where


def kind(value):
    """A JSON value's type, in JSON's words (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def check_messages(value, key, where):
    """A list of chat messages: each an object with a string 'role' (system/user/assistant/tool) and 'content'."""
    if not isinstance(value, list):
        raise MlxRlError(f"{where}: '{key}' must be a list of messages, got {kind(value)}")
    if not value:
        raise MlxRlError(f"{where}: '{key}' is an empty list of messages")
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise MlxRlError(f"{where}: message {i} of '{key}' must be an object with 'role' and 'content', got {kind(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise MlxRlError(f"{where}: message {i} of '{key}' must have a string 'role', got {kind(role)}")
        if role not in ROLES:
            raise MlxRlError(f"{where}: message {i} of '{key}' has role {role!r} (expected {', '.join(ROLES[:-1])} or {ROLES[-1]})")
        if not isinstance(content, str):
            why = " (lists of content parts, as in multimodal data, are not supported)" if isinstance(content, list) else ""
            raise MlxRlError(f"{where}: message {i} of '{key}' must have a string 'content', got {kind(content)}{why}")


def read_rows(source, parse, columns=None):
    """[parse(obj, where) for each row of a file or split] (formats.py reads any format: JSONL line by line),
    with --columns renames applied first; the source must hold at least one row."""
    mapping = parse_columns(columns)
    rows = [parse(rename(obj, mapping, where), where) for obj, where in source.objects()]
    if not rows:
        raise MlxRlError(f"{source} is empty: it holds no rows")
    return rows


def read_jsonl(path, parse):
    """[parse(obj, where) for each non-blank line of a JSONL file], read line by line."""
    return read_rows(Source(path), parse)


def check_share(valid_share):
    if not (isinstance(valid_share, (int, float)) and 0 <= valid_share < 1):
        raise MlxRlError(f"the held-out share must be at least 0 and below 1, got {valid_share!r}")


def hold_out(rows, key, seed, valid_share, min_valid, source):
    """Split rows into (train, valid): about `valid_share` of them (at least `min_valid`) held out.

    Keys are ranked by a seeded hash (blake2b, the same in every process) and whole
    key groups are held out, lowest hash first, until enough rows are; rows keep
    their file order within each side.
    """
    if valid_share == 0:
        return list(rows), []
    want = max(min_valid, math.floor(valid_share * len(rows) + 0.5))
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(key(row), []).append(i)

    def rank(k):
        return hashlib.blake2b(f"{seed}\n{k}".encode(), digest_size=8).digest()

    held = set()
    for k in sorted(groups, key=rank):
        if len(held) >= want:
            break
        held.update(groups[k])
    if len(held) >= len(rows):
        why = f"{len(rows)} are too few to hold out {want}" if want >= len(rows) else "every row has the same prompt (or text)"
        raise MlxRlError(f"{source}: can't hold out rows for validation and keep some for training ({why}); "
                         "add rows, add a valid.jsonl, or set the held-out share to 0")
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@dataclasses.dataclass
class Splits:
    """The rows of a data PATH: train, valid (from valid.jsonl or held out) and test (test.jsonl or empty)."""

    train: list
    valid: list
    test: list
    source: str  # the PATH as given
    held_out: bool  # True when valid rows were held out of train, False when they came from valid.jsonl
    seed: int
    valid_share: float

    def describe(self):
        """One line: "data.jsonl: 900 train rows, 100 held out (10%, seed 0)"."""
        if self.held_out:
            text = f"{self.source}: {len(self.train)} train rows, {len(self.valid)} held out ({self.valid_share:.0%}, seed {self.seed})"
        elif self.valid:
            text = f"{self.source}: {len(self.train)} train rows (train.jsonl), {len(self.valid)} valid rows (valid.jsonl)"
        else:
            text = f"{self.source}: {len(self.train)} train rows, none held out"
        if self.test:
            text += f", {len(self.test)} test rows (test.jsonl)"
        return text


def load_splits(path, parse, key, seed, valid_share, min_valid, what, columns=None):
    """Read a file or folder (any format of formats.py) into Splits; `parse(obj, where) -> row` validates one row.
    columns: --columns renames ('prompt=question,answer=solution'), applied before `parse`."""
    check_share(valid_share)
    parse_columns(columns)  # a bad --columns: one line before any file is read
    files = layout(path, what)
    train = read_rows(files["train"], parse, columns)
    test = read_rows(files["test"], parse, columns) if files["test"] else []
    if files["valid"]:
        valid, held_out = read_rows(files["valid"], parse, columns), False
    else:
        train, valid = hold_out(train, key, seed, valid_share, min_valid, files["train"])
        held_out = valid_share > 0
    return dict(train=train, valid=valid, test=test, source=str(path), held_out=held_out, seed=seed, valid_share=valid_share)
