"""The data files people have (data/formats.py): Parquet, CSV, JSON arrays, save_to_disk folders, --columns."""

import json
import sys

import pytest

from mlx_rl.cli import main
from mlx_rl.config import MlxRlError
from mlx_rl.data import pairs
from mlx_rl.data.datasets import load_corpus, load_prompts

import datasets  # noqa: E402  (the test extra: pip install -e '.[test]')
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(3)]  # 30 rows


def error(fn, *args, **kwargs):
    with pytest.raises(MlxRlError) as e:
        fn(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text
    return text


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_every_format_reads_the_same_rows_as_jsonl(tmp_path, fmt):
    reference = load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS), seed=3)
    path = tmp_path / f"d.{fmt}"
    {"json": lambda: path.write_text(json.dumps(ROWS)), "csv": lambda: write_csv(path, ROWS),
     "parquet": lambda: write_parquet(path, ROWS)}[fmt]()
    data = load_prompts(path, seed=3)
    for split in ("train", "valid", "test"):
        assert [dict(r) for r in getattr(data, split)] == [dict(r) for r in getattr(reference, split)]
    assert data.columns == {"prompt", "answer"} and data.held_out
    where = data.train[1].where
    assert where.startswith(str(path)) and ("row" in where or ":" in where)


def test_save_to_disk_folder_splits_by_name(tmp_path):
    split = {"train": ROWS[:20], "validation": ROWS[20:26], "test": ROWS[26:]}
    dd = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in split.items()})
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_prompts(tmp_path / "ds")
    assert [dict(r) for r in data.train] == split["train"]
    assert [dict(r) for r in data.valid] == split["validation"] and not data.held_out
    assert [dict(r) for r in data.test] == split["test"]
    # one Dataset (no splits): train only, a share held out as for one file
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    one = load_prompts(tmp_path / "one", seed=3)
    reference = load_prompts(write_jsonl(tmp_path / "d.jsonl", ROWS), seed=3)
    assert [dict(r) for r in one.valid] == [dict(r) for r in reference.valid] and one.held_out
    # no train split: one line
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "notrain"))
    assert "no 'train' split (it has: test)" in error(load_prompts, tmp_path / "notrain")


def test_columns_rename_a_datasets_columns(tmp_path):
    theirs = [{"question": r["prompt"], "solution": r["answer"], "level": 1} for r in ROWS]
    path = write_parquet(tmp_path / "gsm.parquet", theirs)
    assert "missing key 'prompt' (the row has: question, solution, level)" in error(load_prompts, path)
    data = load_prompts(path, valid_share=0, columns="prompt=question,answer=solution")
    assert dict(data.train[0]) == {"prompt": ROWS[0]["prompt"], "answer": ROWS[0]["answer"], "level": 1}
    assert data.columns == {"prompt", "answer", "level"}
    got = error(load_prompts, path, columns="prompt=query")
    assert got.startswith(f"{path} row 1: no column 'query' (named by --columns prompt=query)")
    assert "is not NAME=COLUMN" in error(load_prompts, path, columns="prompt")
    assert "mapped to two names" in error(load_prompts, path, columns="prompt=question,answer=question")


def test_a_bad_row_says_where_in_every_format(tmp_path):
    rows = [{"prompt": "ok", "answer": "1"}, {"prompt": "", "answer": "2"}]
    assert error(load_prompts, write_parquet(tmp_path / "d.parquet", rows)) == \
        f"{tmp_path / 'd.parquet'} row 2: 'prompt' is empty"
    assert error(load_prompts, write_csv(tmp_path / "d.csv", rows)) == f"{tmp_path / 'd.csv'}:3: 'prompt' is empty"
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert error(load_prompts, tmp_path / "d.json") == f"{tmp_path / 'd.json'} row 2: 'prompt' is empty"
    (tmp_path / "obj.json").write_text(json.dumps({"rows": rows}))
    assert "holds one JSON array of rows, got a JSON object" in error(load_prompts, tmp_path / "obj.json")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "name the file .jsonl" in error(load_prompts, tmp_path / "lines.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in error(load_prompts, tmp_path / "broken.parquet")
    (tmp_path / "wide.csv").write_text("prompt,answer\nx,1,extra\n")
    assert "3 cells, but the header names 2 columns" in error(load_prompts, tmp_path / "wide.csv")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "none.parquet")
    assert error(load_prompts, tmp_path / "none.parquet") == f"{tmp_path / 'none.parquet'} is empty: it holds no rows"


def test_a_folder_of_parquet_and_csv_files(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_parquet(folder / "train.parquet", ROWS[:20])
    write_csv(folder / "validation.csv", ROWS[20:])
    data = load_prompts(folder)
    assert len(data.train) == 20 and [dict(r) for r in data.valid] == ROWS[20:] and not data.held_out


def test_corpus_and_pairs_in_parquet(tmp_path):
    corpus = load_corpus(write_parquet(tmp_path / "c.parquet", [{"text": "07+45=52"}, {"text": "ab"}]), valid_share=0)
    assert corpus.format == "text" and len(corpus.train) == 2
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert load_corpus(write_parquet(tmp_path / "m.parquet", chat), valid_share=0).format == "chat"
    theirs = [{"prompt": "3+8=", "good": "11", "bad": "12"}, {"prompt": "1+1=", "good": "2", "bad": "3"}]
    got = pairs.read_pairs(write_parquet(tmp_path / "p.parquet", theirs), columns="chosen=good,rejected=bad")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in got] == [("3+8=", "11", "12"), ("1+1=", "2", "3")]


def test_missing_pyarrow_is_one_line(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    assert error(load_prompts, path) == f"{path}: reading Parquet needs pyarrow: pip install 'mlx-rl[data]'"


def test_eval_and_grpo_read_parquet_and_save_to_disk_with_columns(tmp_path, micro_checkpoint, capsys):
    theirs = [{"question": r["prompt"], "solution": r["answer"]} for r in ROWS]
    path = write_parquet(tmp_path / "d.parquet", theirs)
    main(["eval", "--model", str(micro_checkpoint), "--data", str(path), "--columns", "prompt=question,answer=solution",
          "--reward", "exact", "--json", "--samples", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 3 and "eval/accuracy" in out  # 10% of 30 held out
    datasets.DatasetDict({"train": datasets.Dataset.from_list(theirs[:24]),
                          "validation": datasets.Dataset.from_list(theirs[24:])}).save_to_disk(str(tmp_path / "ds"))
    run = tmp_path / "run"
    main(["grpo", "--model", str(micro_checkpoint), "--data", str(tmp_path / "ds"), "--columns",
          "prompt=question,answer=solution", "--reward", "exact", "--steps", "1", "--prompts-per-step", "2",
          "--group-size", "2", "--max-new-tokens", "4", "--eval-prompts", "6", "--out", str(run)])
    config = json.loads((run / "config.json").read_text())
    assert config["columns"] == "prompt=question,answer=solution"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples if s["step"] == 0} <= {r["question"] for r in theirs[24:]}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--model", str(micro_checkpoint), "--data", str(path), "--columns", "prompt=query",
              "--reward", "exact", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no column 'query'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
