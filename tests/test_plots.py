"""mlx-rl plot: what the figures show, checked on the matplotlib objects, and the files it writes.

Most tests write small synthetic run directories (config.json + metrics.jsonl) so they are fast and
say exactly what is in the data; the Ice Maze test uses a real, short run of the chapter.
"""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_rl import plots
from mlx_rl.cli import main
from mlx_rl.config import MlxRlError


def write_run(path, command, rows, config=None, samples=None, tail=""):
    """A run directory as the chapters write it; `tail` is appended raw to metrics.jsonl (torn lines)."""
    path.mkdir(parents=True)
    (path / "plots").mkdir()
    (path / "config.json").write_text(json.dumps({"command": command, "eval_prompts": 500, **(config or {})}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if samples is not None:
        (path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def grpo_rows(steps=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"step": 0, "wall_s": 0.5, "eval/accuracy": 0.26, "eval/accuracy_hard": 0.1, "time/eval_s": 0.4}]
    for s in range(1, steps + 1):
        row = {"step": s, "wall_s": 0.5 + s, "reward/mean": 0.5 + 0.05 * s + 0.01 * rng.standard_normal(),
               "train/accuracy": 0.2 + 0.02 * s, "policy/clipfrac": 0.01 + 0.001 * s,
               "policy/completion_len": 4.0, "grpo/skipped": 0.0, "loss/total": 1.0 / s,
               "time/generate_s": 0.2, "time/reference_s": 0.1, "time/forward_backward_s": 0.3 + 0.01 * s,
               "time/optimizer_s": 0.02}
        if s % 4 == 0:
            row.update({"eval/accuracy": 0.26 + 0.005 * s, "eval/accuracy_hard": 0.1 + 0.001 * s, "time/eval_s": 0.4})
        rows.append(row)
    return rows


GRPO_CONFIG = {"prompts_per_step": 4, "group_size": 2}


@pytest.fixture
def grpo_run(tmp_path):
    return write_run(tmp_path / "grpo-a", "grpo", grpo_rows(), GRPO_CONFIG)


def drawn_by_stem(run_paths, x="step", labels=None):
    drawn = plots.draw(plots.load_runs(run_paths, labels), x)
    return {d.stem: d for d in drawn}


def test_shares_are_drawn_on_the_unit_interval_and_other_metrics_autoscale(grpo_run):
    drawn = drawn_by_stem([grpo_run])
    try:
        ax = drawn["eval"].axes
        assert ax["eval/accuracy"].get_ylim() == (0.0, 1.0)  # 0.26 -> 0.32 must not fill the panel
        assert ax["eval/accuracy_hard"].get_ylim() == (0.0, 1.0)  # an eval split named later still counts
        assert drawn["train"].axes["train/accuracy"].get_ylim() == (0.0, 1.0)
        assert drawn["policy"].axes["policy/clipfrac"].get_ylim() == (0.0, 1.0)
        lo, hi = drawn["reward"].axes["reward/mean"].get_ylim()
        assert 0.4 < lo and hi < 1.3  # a reward is not a share: its own range
        # Every panel is titled in words and has a unit; the figure names chapter and run.
        assert ax["eval/accuracy"].get_title(loc="left") == "Held-out accuracy (greedy)"
        assert ax["eval/accuracy"].get_ylabel() == "share correct"
        assert drawn["eval"].title == "Held-out evaluation — GRPO · grpo-a"
        assert drawn["eval"].fig.get_suptitle() == drawn["eval"].title
        # The step-0 evaluation (the model before training) is the curve's first point.
        xs = ax["eval/accuracy"].lines[0].get_xdata()
        assert list(xs) == [0, 4, 8, 12]
    finally:
        plots.close_all(drawn.values())


def test_a_share_name_with_values_outside_0_1_is_not_forced_into_it(tmp_path):
    rows = [{"step": s, "wall_s": s, "custom/success_count": 3.0 * s} for s in range(1, 6)]
    drawn = drawn_by_stem([write_run(tmp_path / "r", "grpo", rows)])
    try:
        assert drawn["custom"].axes["custom/success_count"].get_ylim()[1] > 10
    finally:
        plots.close_all(drawn.values())


def test_constant_series_are_folded_into_a_note(grpo_run):
    drawn = drawn_by_stem([grpo_run])
    try:
        policy = drawn["policy"]
        assert "policy/completion_len" not in policy.axes and "policy/clipfrac" in policy.axes
        assert policy.constant == {"policy/completion_len": {"grpo-a": 4.0}}
        texts = [t.get_text() for t in policy.fig.texts]
        assert any("Constant over the run" in t and "policy/completion_len" in t and "= 4" in t for t in texts)
        # A group whose every series is constant is a figure with no panels, only the note.
        assert drawn["grpo"].fig.axes == [] and drawn["grpo"].constant == {"grpo/skipped": {"grpo-a": 0.0}}
        assert any("Step skipped: no group had signal (grpo/skipped) = 0.0%" in t.get_text() for t in drawn["grpo"].fig.texts)
    finally:
        plots.close_all(drawn.values())


def test_a_flat_evaluation_is_still_drawn(tmp_path):
    rows = [{"step": s, "wall_s": s, "eval/accuracy": 0.0, "reward/mean": 0.0} for s in range(4)]
    drawn = drawn_by_stem([write_run(tmp_path / "stuck", "grpo", rows)])
    try:
        assert drawn["eval"].axes["eval/accuracy"].get_ylim() == (0.0, 1.0) and not drawn["eval"].constant
        assert drawn["reward"].constant == {"reward/mean": {"stuck": 0.0}}
    finally:
        plots.close_all(drawn.values())


def test_cli_prints_the_files_and_the_constants(grpo_run, capsys):
    main(["plot", str(grpo_run)])
    out = capsys.readouterr().out.splitlines()
    assert str(grpo_run / "plots" / "eval.png") in out and str(grpo_run / "plots" / "grpo.png") in out
    assert all(Path(p).exists() for p in out if p.endswith(".png"))
    assert "constant, not drawn: grpo/skipped (grpo-a=0.0%)" in out


def dpo_rows():
    rounds = [0, 0, 0, 1, 1, 1, 2, 2]
    rows = [{"step": 0, "wall_s": 0.1, "eval/accuracy": 0.3}]
    for s, r in enumerate(rounds, 1):
        rows.append({"step": s, "wall_s": s, "dpo/round": r, "dpo/margin": 0.1 * (s % 3), "loss/dpo": 0.7 - 0.01 * s,
                     "dpo/reward_chosen": 0.01 * s, "dpo/reward_rejected": -0.01 * s, "time/update_s": 0.1})
    rows[-1]["eval/accuracy"] = 0.4
    return rows


def test_dpo_round_boundaries_are_drawn_in_every_panel(tmp_path):
    run = write_run(tmp_path / "dpo", "dpo", dpo_rows(), {"batch_size": 8})
    drawn = drawn_by_stem([run])
    try:
        # round 0 = steps 1-3, round 1 = 4-6, round 2 = 7-8: lines halfway between the rounds' edges
        assert drawn["dpo"].round_lines == {"dpo": [3.5, 6.5]}
        for d in (drawn["dpo"], drawn["loss"], drawn["eval"]):
            for ax in set(d.axes.values()):
                vertical = sorted({float(l.get_xdata()[0]) for l in ax.lines
                                   if len(set(l.get_xdata())) == 1 and l.get_linestyle() == "--"})
                assert vertical == [3.5, 6.5]
        assert "dpo/round" not in drawn["dpo"].axes  # the lines say it; no staircase panel
        first_panel = drawn["dpo"].fig.axes[0]
        assert [t.get_text() for t in first_panel.texts if "round" in t.get_text()] == [" round 2", " round 3"]
        # chosen and rejected share one panel, told apart in its legend
        ax = drawn["dpo"].axes["dpo/reward_chosen"]
        assert ax is drawn["dpo"].axes["dpo/reward_rejected"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chosen", "rejected"]
        # with --x samples, the lines move with the axis: 8 pairs per step
        drawn_s = drawn_by_stem([run], x="samples")
        assert drawn_s["dpo"].round_lines == {"dpo": [28.0, 52.0]}
        plots.close_all(drawn_s.values())
    finally:
        plots.close_all(drawn.values())


def test_overlay_without_out_goes_beside_the_first_run_with_labels_in_the_legend(tmp_path, capsys):
    a = write_run(tmp_path / "grpo-a", "grpo", grpo_rows(), GRPO_CONFIG)
    b = write_run(tmp_path / "grpo-b", "grpo", grpo_rows(seed=1), GRPO_CONFIG)
    main(["plot", str(a), str(b), "--labels", "tuned,control"])
    written = capsys.readouterr().out.split()
    folder = tmp_path / "compare-grpo-a-vs-grpo-b"
    assert written and all(p.startswith(str(folder)) for p in written if p.endswith(".png"))
    assert (folder / "reward.png").stat().st_size > 5000 and plots.is_generic_figure(folder / "reward.png")
    drawn = drawn_by_stem([a, b], labels=["tuned", "control"])
    try:
        legend = drawn["reward"].axes["reward/mean"].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == ["tuned", "control"]
        assert drawn["reward"].title.endswith("GRPO · tuned vs GRPO · control")
    finally:
        plots.close_all(drawn.values())
    with pytest.raises(MlxRlError, match="--labels names 1 runs but 2"):
        plots.plot_runs([a, b], labels=["only-one"])


def test_x_samples_comes_from_each_chapters_config(tmp_path):
    grpo = write_run(tmp_path / "g", "grpo", grpo_rows(), GRPO_CONFIG)
    dpo = write_run(tmp_path / "d", "dpo", dpo_rows(), {"batch_size": 8})
    other = write_run(tmp_path / "o", "mystery", [{"step": s, "wall_s": 2.0 * s, "reward/mean": s} for s in (1, 2, 3)])
    runs = plots.load_runs([grpo, dpo, other])
    assert [r.samples_per_step for r in runs] == [(8, "completions"), (8, "pairs"), (None, None)]
    # the default: steps of different chapters are not comparable, so they are overlaid by samples seen
    assert plots.resolve_x(runs, "auto") == "samples" and plots.resolve_x(runs[:1], "auto") == "step"
    drawn = {d.stem: d for d in plots.draw(runs, "samples")}
    try:
        lines = drawn["reward"].axes["reward/mean"].lines
        grpo_x = next(l for l in lines if l.get_label() == "g").get_xdata()
        assert list(grpo_x[:3]) == [8, 16, 24]
        other_x = next(l for l in lines if l.get_label() == "o").get_xdata()
        assert list(other_x) == [1, 2, 3]  # unknown chapter: falls back to step
        assert drawn["reward"].axes["reward/mean"].get_xlabel() == "samples seen (completions, pairs, steps)"
        assert runs[2].x_label("samples") == "step (samples per step unknown for mystery)"
    finally:
        plots.close_all(drawn.values())
    wall = {d.stem: d for d in plots.draw(runs[2:], "wall_s")}
    assert list(wall["reward"].axes["reward/mean"].lines[0].get_xdata()) == [2, 4, 6]
    plots.close_all(wall.values())


def test_time_is_one_stacked_chart_with_eval_apart(grpo_run):
    drawn = drawn_by_stem([grpo_run])
    try:
        t = drawn["time"]
        stack = t.axes["stack:grpo-a"]
        labels = [c.get_label() for c in stack.collections]
        assert sorted(labels) == ["forward backward", "generate", "optimizer", "reference"]  # eval is not stacked
        bars = [tick.get_text() for tick in t.axes["split"].get_yticklabels()]
        assert "eval" in bars and "generate" in bars
        assert any("not stacked: eval" in x.get_text() for x in t.fig.texts)
        # the bars are mean ms per step over steps 2..12, eval spread over them (3 evals x 400 ms / 11): the
        # evaluation before training (step 0) is not a step, as in `mlx-rl profile`
        table = plots.phase_table(plots.load_run(grpo_run).rows)
        assert table["generate"]["mean_s"] == pytest.approx(0.2)
        assert table["eval"]["mean_s"] == pytest.approx(3 * 0.4 / 11)
    finally:
        plots.close_all(drawn.values())


def test_empty_or_missing_metrics_is_one_clear_line(tmp_path, capsys):
    empty = write_run(tmp_path / "empty", "grpo", [])
    for target, message in [(empty, "has no metric rows yet"), (tmp_path / "nothing", "no such run directory")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["plot", str(target)])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_torn_last_line_is_skipped_and_said(tmp_path):
    run = write_run(tmp_path / "torn", "grpo", grpo_rows(), GRPO_CONFIG, tail='{"step": 13, "wall_s": 14.0, "rew')
    data = plots.load_run(run)
    assert data.bad_lines == 1 and data.rows[-1]["step"] == 12
    drawn = drawn_by_stem([run])
    try:
        assert any("skipped 1 malformed line" in t.get_text() for t in drawn["reward"].fig.texts)
        assert list(drawn["reward"].axes["reward/mean"].lines[-1].get_xdata())[-1] == 12
    finally:
        plots.close_all(drawn.values())


def test_icemaze_figure_survives_plot(tmp_path, capsys):
    """Ice Maze draws its own policy.png; the generic policy/ group (epsilon, entropy) must not replace it."""
    out = tmp_path / "ice"
    main(["icemaze", "--episodes", "200", "--eval-episodes", "50", "--out", str(out)])
    own = out / "plots" / "policy.png"
    before = hashlib.sha256(own.read_bytes()).hexdigest()
    capsys.readouterr()
    main(["plot", str(out)])
    printed = capsys.readouterr().out
    assert hashlib.sha256(own.read_bytes()).hexdigest() == before  # byte-identical: the chapter's figure
    assert not plots.is_generic_figure(own)
    assert plots.is_generic_figure(out / "plots" / "policy-curves.png")
    assert "policy.png was not drawn by mlx-rl plot, so it was kept: a chapter's own figure" in printed
    # Again: our own policy-curves.png is replaced in place, no policy-curves-2.png pile-up.
    main(["plot", str(out), "--x", "wall_s"])
    assert hashlib.sha256(own.read_bytes()).hexdigest() == before
    assert not (out / "plots" / "policy-curves-2.png").exists()
    for name in ("values.png", "training.png"):
        assert not plots.is_generic_figure(out / "plots" / name)


def test_generic_figures_replace_only_stamped_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not ours")
    assert plots.target_path(tmp_path, "a") == tmp_path / "a-curves.png"
    assert plots.target_path(tmp_path, "b") == tmp_path / "b.png"
    (tmp_path / "a-curves.png").write_bytes(b"someone else's too")
    assert plots.target_path(tmp_path, "a") == tmp_path / "a-curves-2.png"


def test_a_3000_step_run_is_downsampled_and_quick(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"step": s, "wall_s": 0.1 * s, "loss/cross_entropy": 3 * np.exp(-s / 500) + 0.1 * rng.random(),
             "optim/grad_norm": rng.random(), "optim/lr": 1e-3 * min(1, s / 100) * (1 - s / 4000),
             "perf/tokens_per_s": 2000 + 100 * rng.random(), "perf/peak_memory_gb": 0.02 + 1e-6 * s,
             "time/data_s": 0.004, "time/forward_backward_s": 0.05 + 0.01 * rng.random(), "time/optimizer_s": 0.004}
            for s in range(1, 3001)]
    for r in rows[::500]:
        r.update({"eval/accuracy": min(1.0, r["step"] / 3000), "time/eval_s": 0.5})
    run = write_run(tmp_path / "long", "pretrain", rows, {"batch_size": 32})
    start = time.perf_counter()
    drawn = drawn_by_stem([run])
    paths = [p for p, _ in plots.save(drawn.values(), run / "plots")]
    elapsed = time.perf_counter() - start
    assert {p.name for p in paths} == {"eval.png", "loss.png", "optim.png", "perf.png", "time.png"}
    try:
        for d in drawn.values():
            for ax in d.fig.axes:
                assert all(len(l.get_xdata()) <= plots.MAX_POINTS for l in ax.lines)
        # cross-entropy falls 3.1 -> 0.1: a log axis, or the last 2000 steps look flat
        assert drawn["loss"].axes["loss/cross_entropy"].get_yscale() == "log"
        assert drawn["optim"].axes["optim/grad_norm"].get_yscale() == "linear"
    finally:
        plots.close_all(drawn.values())
    assert elapsed < 30, f"plotting a 3000-step run took {elapsed:.1f}s"  # a few seconds on an idle laptop


def test_bucketing_keeps_the_mean_and_the_spikes():
    xs = np.arange(3000.0)
    ys = np.ones(3000)
    ys[1234] = 100.0
    bx, mean, lo, hi = plots.bucket(xs, ys, n=1000)
    assert len(bx) == 1000 and hi.max() == 100.0 and lo.min() == 1.0
    assert mean.mean() == pytest.approx(ys.mean())  # equal buckets of 3: the mean of means is the mean
