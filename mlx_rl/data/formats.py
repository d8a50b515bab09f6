"""The data files people already have: JSONL, JSON arrays, CSV, Parquet, and `datasets.save_to_disk` folders.

Every reader gives the same thing, a list of (object, where) pairs: the row as a dict of its
columns, and where it came from for error messages ("data.csv:7", "data.parquet row 7",
"ds/train row 7"). The row checks (datasets.py, pairs.py) then run on them unchanged, so a bad
row says the same one line whatever the file's format.

    data.jsonl               one JSON object per line (mlx-lm's and TRL's format)
    data.json                one JSON array of objects
    data.csv                 a header row, then one row per line (every value is text)
    data.parquet             a Parquet table (needs pyarrow: pip install 'mlx-rl[data]')
    folder/                  train.<ext>, optionally valid.<ext> (or validation.<ext>) and test.<ext>,
                             any of the formats above
    folder/ by save_to_disk  a Hugging Face DatasetDict (dataset_dict.json): its train, validation
                             (or valid) and test splits by name; or a single Dataset (state.json): train
                             only. Read with pyarrow alone; the `datasets` package is not needed.

`--columns prompt=question,answer=solution` renames a dataset's columns to the ones mlx-rl and
the rewards read: here the file's `question` becomes `prompt` and its `solution` becomes `answer`;
the other columns are kept as they are. A row without a column the mapping names is an error
naming the row.
"""

import csv
import json
from pathlib import Path

from mlx_rl.config import MlxRlError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "dev"), "test": ("test",)}


def parse_columns(spec):
    """'prompt=question,answer=solution' -> {"prompt": "question", "answer": "solution"} (the name mlx-rl reads:
    the dataset's column). None or '' -> {}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    mapping = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        target, sep, source = (s.strip() for s in part.partition("="))
        if not sep or not target or not source:
            raise MlxRlError(f"--columns: {part!r} is not NAME=COLUMN (e.g. --columns prompt=question,answer=solution)")
        if target in mapping:
            raise MlxRlError(f"--columns: '{target}' is mapped twice")
        mapping[target] = source
    sources = list(mapping.values())
    twice = next((s for s in sources if sources.count(s) > 1), None)
    if twice:
        raise MlxRlError(f"--columns: the column '{twice}' is mapped to two names")
    return mapping


def rename(obj, mapping, where):
    """The row with the mapped columns renamed (a non-object row is left for the row check to refuse)."""
    if not mapping or not isinstance(obj, dict):
        return obj
    missing = [s for s in mapping.values() if s not in obj]
    if missing:
        spec = ",".join(f"{t}={s}" for t, s in mapping.items())
        raise MlxRlError(f"{where}: no column '{missing[0]}' (named by --columns {spec}); the row has: "
                         f"{', '.join(map(str, obj)) or 'nothing'}")
    sources = set(mapping.values())
    out = {target: obj[source] for target, source in mapping.items()}
    out.update({k: v for k, v in obj.items() if k not in sources and k not in mapping})
    return out


def need_pyarrow(path, what):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MlxRlError(f"{path}: reading {what} needs pyarrow: pip install 'mlx-rl[data]'") from None


# --- one file -> [(object, where)] -------------------------------------------------------------


def read_jsonl_objects(path):
    """Line by line (a generator: a large file is never held whole, and the first bad line stops it)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MlxRlError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x})") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ("; JSONL holds one JSON object per line, not one JSON array (name a JSON array file .json)"
                        ) if number == 1 and line.lstrip().startswith("[") else ""
                raise MlxRlError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
            yield obj, where


def read_json_array(path):
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MlxRlError(f"{path}: not valid UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one JSON object per line is JSONL: name the file .jsonl)" if text.lstrip().startswith("{") else ""
        raise MlxRlError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}){hint}") from None
    if not isinstance(data, list):
        raise MlxRlError(f"{path}: a .json data file holds one JSON array of rows, got a JSON "
                         f"{'object' if isinstance(data, dict) else type(data).__name__}")
    return [(obj, f"{path} row {i}") for i, obj in enumerate(data, start=1)]


def read_csv(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:
                if None in row:  # more cells than the header has names
                    raise MlxRlError(f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells, but the header "
                                     f"names {len(reader.fieldnames)} columns")
                rows.append((dict(row), f"{path}:{reader.line_num}"))
    except UnicodeDecodeError:
        raise MlxRlError(f"{path}: not valid UTF-8") from None
    except csv.Error as e:
        raise MlxRlError(f"{path}: not valid CSV ({e})") from None
    return rows


def read_parquet(path):
    need_pyarrow(path, "Parquet")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise MlxRlError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return [(obj, f"{path} row {i}") for i, obj in enumerate(table.to_pylist(), start=1)]


def read_arrow_files(folder, files):
    """A save_to_disk split: its Arrow files (IPC streams) in order, as one list of rows."""
    need_pyarrow(folder, "a datasets folder")
    import pyarrow as pa

    rows = []
    for name in files:
        try:
            with pa.memory_map(str(folder / name)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except Exception as e:
            raise MlxRlError(f"{folder / name}: not a readable Arrow file ({str(e).splitlines()[0]})") from None
        rows.extend(table.to_pylist())
    return [(obj, f"{folder} row {i}") for i, obj in enumerate(rows, start=1)]


READERS = {".jsonl": read_jsonl_objects, ".json": read_json_array, ".csv": read_csv, ".parquet": read_parquet}


class Source:
    """One split's rows to read: a file (of any format), or a save_to_disk split folder."""

    def __init__(self, path, arrow_files=None):
        self.path, self.arrow_files = Path(path), arrow_files

    def objects(self):
        if self.arrow_files is not None:
            return read_arrow_files(self.path, self.arrow_files)
        return READERS.get(self.path.suffix.lower(), read_jsonl_objects)(self.path)  # any other name: JSONL

    def __str__(self):
        return str(self.path)


def saved_split(folder):
    """The Arrow files of a folder written by `Dataset.save_to_disk` (its state.json lists them)."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise MlxRlError(f"{folder}: its state.json is missing or damaged (is this a datasets.save_to_disk folder?)") from None
    return Source(folder, files)


def layout(path, what):
    """{"train": Source, "valid": Source | None, "test": Source | None} for a data PATH (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return {"train": Source(path), "valid": None, "test": None}
    if not path.is_dir():
        raise MlxRlError(f"{what} {path} does not exist")
    if (path / "dataset_dict.json").is_file():  # datasets.DatasetDict.save_to_disk
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise MlxRlError(f"{path}/dataset_dict.json is damaged (no list of splits)") from None
        found = {}
        for ours, names in SPLIT_NAMES.items():
            name = next((n for n in names if n in splits), None)
            found[ours] = saved_split(path / name) if name else None
        if found["train"] is None:
            raise MlxRlError(f"{what} {path}: the dataset has no 'train' split (it has: {', '.join(splits)})")
        return found
    if (path / "state.json").is_file():  # datasets.Dataset.save_to_disk: one split
        return {"train": saved_split(path), "valid": None, "test": None}
    found = {}
    for ours, names in SPLIT_NAMES.items():
        candidates = [path / f"{n}{suffix}" for suffix in SUFFIXES for n in names]
        found[ours] = next((Source(p) for p in candidates if p.is_file()), None)
    if found["train"] is None:
        raise MlxRlError(f"{what} folder {path} has no train.jsonl (a data folder holds train.jsonl, and optionally "
                         "valid.jsonl and test.jsonl; .json, .csv and .parquet files too; or it is a folder written "
                         "by datasets' save_to_disk)")
    return found
