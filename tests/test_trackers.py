"""--log-to tensorboard|wandb|trackio: what each tracker holds, read back with its own reader, equals the run's files."""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import pytest

from mlx_rl import api
from mlx_rl.cli import main
from mlx_rl.config import MlxRlError
from mlx_rl.engine import trackers
from mlx_rl.runs import read_jsonl

TINY_GRPO = ["--prompts-per-step", "2", "--group-size", "2", "--eval-prompts", "4", "--eval-every", "1", "--steps", "2"]


def numeric(row):
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None
            and not isinstance(v, bool) and math.isfinite(v)}


def test_scalars_and_sample_table():
    assert trackers.scalars({"step": 3, "reward/mean": 0.5, "eval/accuracy": None, "flag": True, "n": 2}) == \
        {"reward/mean": 0.5, "n": 2.0}
    columns, data = trackers.sample_table([{"prompt": "1+1=", "reward": 1.0},
                                           {"prompt": [{"role": "user", "content": "hi"}], "completion": "2"}])
    assert columns == ["prompt", "reward", "completion"]
    assert data == [["1+1=", 1.0, None], ['[{"role": "user", "content": "hi"}]', None, "2"]]
    assert "| prompt | reward | completion |" in trackers.markdown_table([{"prompt": "a|b", "reward": 1, "completion": "x"}])


def test_a_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MlxRlError) as e:
        trackers.check(["wandb"])
    assert str(e.value) == "--log-to wandb needs the wandb package: pip install 'mlx-rl[wandb]'"
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--model", str(tmp_path), "--log-to", "wandb", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pip install 'mlx-rl[wandb]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    with pytest.raises(MlxRlError, match="must be one of tensorboard, wandb, trackio"):
        api.config("grpo", log_to=("mlflow",))


def test_tensorboard_holds_the_metrics_config_and_samples(tmp_path, micro_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(["grpo", "--model", str(micro_checkpoint), "--out", str(out), "--log-to", "tensorboard", *TINY_GRPO])
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = read_jsonl(out / "metrics.jsonl")
    names = {k for r in rows for k in numeric(r)}
    assert set(events.Tags()["scalars"]) == names and "reward/mean" in names and "time/generate_s" in names
    for name in names:
        logged = {(r["step"], r[name]) for r in rows if name in numeric(r)}
        got = {(e.step, e.value) for e in events.Scalars(name)}
        assert {s for s, _ in got} == {s for s, _ in logged}, name
        for (s, v), (s2, v2) in zip(sorted(logged), sorted(got)):
            assert v2 == pytest.approx(v, rel=1e-6, abs=1e-6), name  # float32 in the event file
    config = events.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config.strip("`\n"))["group_size"] == 2
    logged = read_jsonl(out / "samples.jsonl")
    for split in ("eval", "train"):  # held-out samples at every evaluation, GRPO's group samples
        texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"samples/{split}")}
        rows = [r for r in logged if r.get("split", "eval") == split]
        assert set(texts) == {r["step"] for r in rows} and rows
        assert all(f"| {r['prompt']} | {r['completion']} |" in texts[r["step"]] for r in rows)
    main(["grpo", "--resume", str(out), "--steps", "3"])  # a resumed run adds its steps to the same folder
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]


def read_wandb_records(path):
    """The records of an offline W&B run file (run-ID.wandb): a LevelDB-style log of wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, pending = open(path, "rb").read(), 7, 32768, [], b""  # 7: the ":W&B" header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_the_metrics_config_and_samples(tmp_path, micro_checkpoint, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    main(["grpo", "--model", str(micro_checkpoint), "--out", str(out), "--log-to", "wandb", *TINY_GRPO])
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = read_wandb_records(path)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
    rows = read_jsonl(out / "metrics.jsonl")
    for row in rows:
        for name, value in numeric(row).items():
            assert history[row["step"]][name] == pytest.approx(value), name
    assert history[2]["samples/eval/_type"] == "table-file"  # the samples: a W&B table, its rows in the run folder
    files = next((out / "wandb").glob("offline-run-*")) / "files"
    table = json.loads((files / history[2]["samples/eval/path"]).read_text())
    at_2 = [s for s in read_jsonl(out / "samples.jsonl") if s["step"] == 2 and "split" not in s]
    assert [row[table["columns"].index("completion")] for row in table["data"]] == [s["completion"] for s in at_2]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["group_size"] == 2 and config["command"] == "grpo"
    assert run.display_name == "run" and run.run_id == json.loads((out / "trackers.json").read_text())["wandb_id"]


TRACKIO_SCRIPT = """
import json, sys
from mlx_rl import api
summary = api.grpo(model=sys.argv[1], out=sys.argv[2], log_to=("trackio",), prompts_per_step=2, group_size=2,
                   eval_prompts=4, eval_every=1, steps=2)
from trackio.sqlite_storage import SQLiteStorage
print("LOGS " + json.dumps({"logs": SQLiteStorage.get_logs("mlx-rl", run="run"),
                            "config": SQLiteStorage.get_run_config("mlx-rl", "run")}, default=str))
"""


def test_trackio_local_store_holds_the_metrics_and_config(tmp_path, micro_checkpoint):
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": os.getcwd()}
    out = tmp_path / "run"  # trackio reads TRACKIO_DIR when imported: a fresh process
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(micro_checkpoint), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOGS "))
    got = json.loads(line[5:])
    by_step = {}
    for log in got["logs"]:
        by_step.setdefault(log["step"], {}).update(log)
    for row in read_jsonl(out / "metrics.jsonl"):
        for name, value in numeric(row).items():
            assert by_step[row["step"]][name] == pytest.approx(value), name
    assert "samples/eval" in by_step[2] and "samples/train" in by_step[2]
    assert got["config"]["group_size"] == 2 and got["config"]["command"] == "grpo"
