"""Package plumbing: config and CLI errors, tasks, tiny checkpoints, run directories."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mlx_rl.chapters.pretrain import PretrainConfig
from mlx_rl.cli import main
from mlx_rl.config import MlxRlError, build
from mlx_rl.data.tasks import Addition, Sort, get_task


def run_cli(*args):
    """Run `mlx-rl` in a subprocess; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "mlx_rl", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


# --- BLAS -------------------------------------------------------------------------


def test_openblas_is_loaded_on_linux_when_installed():
    from mlx_rl.engine import blas  # conftest switched the speed-ups on, as the CLI does

    if not sys.platform.startswith("linux") or blas.find_openblas() is None:
        pytest.skip("OpenBLAS not installed here")
    assert blas.loaded_path == blas.find_openblas()
    maps = open("/proc/self/maps").read()
    assert "openblas" in maps


def test_openblas_can_be_turned_off():
    code = "from mlx_rl.engine import blas, speed; speed.enable(); print(blas.loaded_path)"
    import os

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "MLX_RL_OPENBLAS": "0"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "None"


def test_importing_the_package_switches_nothing_on():
    """`import mlx_rl` has no side effects: OpenBLAS and the fast SwiGLU wait for speed.enable()."""
    code = ("import sys, mlx_rl, mlx_rl.engine.blas as b; print(b.loaded_path, 'mlx.core' in sys.modules); "
            "import mlx_lm.models.activations, mlx_rl.engine.fastmath as f; print(f.installed)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["None", "False", "False"]


# --- tasks ------------------------------------------------------------------------


def test_addition_answer_is_reversed_sum_and_mistake_forgets_carry():
    t = Addition(digits=2)
    assert t.prompt((7, 45)) == "07+45="
    assert t.answer((7, 45)) == "250"  # 52 -> "052" -> units first
    assert t.mistaken_answer((7, 45)) == "240"  # 7+5 = 12: the carry is dropped -> 42
    assert t.mistaken_answer((12, 34)) is None  # no carry: no mistake to make
    assert t.mistaken_answer((50, 60)) == "010"  # tens carry dropped: 10 instead of 110


def addition_problem(prompt):
    """'07+45=' -> (7, 45), written here (the task has no parser: rows carry their answer)."""
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def task_reward(task, prompt, completion):
    """The task's own reward (task.rewards) of one completion: (total, exact)."""
    row = task.row(addition_problem(prompt))
    s = task.rewards.score([prompt], [completion], {"answer": [row["answer"]], "kind": [row["kind"]]})
    return float(s.total[0]), float(s.per_reward[s.names[0]][0])


def test_reward_parses_and_never_evaluates():
    t = Addition()
    assert task_reward(t, "07+45=", "250")[0] == pytest.approx(1.3)
    assert task_reward(t, "07+45=", "240")[0] == pytest.approx(0.2)
    assert task_reward(t, "07+45=", "__import__('os')")[0] == 0.0
    assert task_reward(t, "07+45=", "250")[1] == 1.0 and task_reward(t, "07+45=", "52")[1] == 0.0
    assert t.rewards.is_verifier()  # the first reward (exact) is 0/1: its mean is the accuracy


def test_train_and_heldout_prompts_are_disjoint_and_seeded():
    for task in (Addition(), Sort()):
        train = {r["prompt"] for r in task.train_rows(np.random.default_rng(0), 2000)}
        held = [r["prompt"] for r in task.heldout_rows(300, seed=0)]
        assert len(set(held)) == 300 and not train & set(held)
        assert held == [r["prompt"] for r in task.heldout_rows(300, seed=0)]
        assert held != [r["prompt"] for r in task.heldout_rows(300, seed=1)]
        distinct = [r["prompt"] for r in task.train_rows(np.random.default_rng(0), 300, distinct=True)]
        assert len(set(distinct)) == 300 and not set(distinct) & set(held)
        rng = np.random.default_rng(0)
        corpus = {task.corpus_example(rng)[0] for _ in range(2000)}
        assert not corpus & set(held)


def test_corpus_mistake_rate():
    t = Addition(mistake_rate=0.75)
    rng = np.random.default_rng(1)
    wrong = total = 0
    for _ in range(4000):
        prompt, completion = t.corpus_example(rng)
        problem = addition_problem(prompt)
        if t.mistaken_answer(problem) is not None:
            total += 1
            wrong += completion != t.answer(problem)
            assert completion in (t.answer(problem), t.mistaken_answer(problem))
        else:
            assert completion == t.answer(problem)  # no carry: nothing to get wrong
    assert abs(wrong / total - 0.75) < 0.03


def test_sort_task_and_mistake():
    t = Sort(length=5)
    assert t.answer((5, 3, 9, 1, 3)) == "13359"
    assert t.mistaken_answer((5, 3, 9, 1, 3)) == "1359"
    assert t.mistaken_answer((5, 3, 9, 1, 0)) is None  # no repeats: no mistake to make
    assert t.row((5, 3, 9, 1, 3)) == {"prompt": "sort:53913=", "answer": "13359", "kind": "repeats"}
    assert t.row((5, 3, 9, 1, 0))["kind"] == "distinct"
    assert Addition().row((7, 45))["kind"] == "carry" and Addition().row((12, 34))["kind"] == "no_carry"


def test_unknown_task_is_a_clear_error():
    with pytest.raises(MlxRlError, match="unknown task 'nope'"):
        get_task("nope")


# --- config -----------------------------------------------------------------------


def test_config_checks_types_and_bounds():
    assert build(PretrainConfig, {"steps": 5}, {"lr": 1e-4}).steps == 5
    with pytest.raises(MlxRlError, match="'steps'.*>= 1"):
        build(PretrainConfig, {}, {"steps": -1})
    with pytest.raises(MlxRlError, match="unknown setting 'stepz'"):
        build(PretrainConfig, {"stepz": 3})
    with pytest.raises(MlxRlError, match="'lr'.*must be float"):
        build(PretrainConfig, {"lr": "fast"})


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "--steps", "-1"], "'steps'"),
        (["pretrain", "--task", "nope"], "unknown task 'nope'"),
        (["pretrain", "--model", "/no/such/dir"], "no such checkpoint directory"),
        (["eval", "--model", "/no/such/dir"], "no such checkpoint directory"),
        (["pretrain", "--config", "/no/such.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message):
    code, out, err = run_cli(*args)
    assert code != 0
    assert "Traceback" not in err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_config_file_and_existing_run_dir_untouched(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{steps: 3")
    code, _, err = run_cli("pretrain", "--config", str(bad))
    assert code != 0 and "not valid JSON" in err and "Traceback" not in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    code, _, err = run_cli("pretrain", "--out", str(run), "--steps", "1")
    assert code != 0 and "already exists" in err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_model_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli("pretrain", "--model", str(tmp_path))
    assert code != 0 and "not an mlx-lm checkpoint" in err


# --- checkpoints and runs ---------------------------------------------------------


def test_checkpoint_loads_with_mlx_lm(micro_checkpoint):
    from mlx_lm import load

    model, tokenizer = load(str(micro_checkpoint))
    assert tokenizer.encode("07+45=")[0] == tokenizer.bos_token_id
    assert tokenizer.decode(tokenizer.encode("07+45=", add_special_tokens=False)) == "07+45="
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True) == tokenizer.encode("1+2=")


def test_checkpoint_swap_survives_a_kill(tmp_path, micro_model):
    """A crash between the two renames leaves checkpoint.old, which find_checkpoint uses."""
    import os

    from mlx_rl.engine.checkpoint import save_checkpoint
    from mlx_rl.runs import find_checkpoint

    model, tokenizer, config = micro_model
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer, config, {"step": 1})
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")  # as if killed mid-swap
    (tmp_path / ".checkpoint.tmp-1").mkdir()  # a half-written new one
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    save_checkpoint(tmp_path / "checkpoint", model, tokenizer, config, {"step": 2})
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert not (tmp_path / "checkpoint.old").exists()
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_pretrain_run_directory_layout(trained_micro):
    out, ckpt = trained_micro
    for name in ("config.json", "metrics.jsonl", "samples.jsonl", "summary.json"):
        assert (out / name).exists(), name
    assert list((out / "plots").glob("*.png"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(0, 151))  # step 0: the held-out eval before training
    assert "eval/accuracy" in rows[0] and "eval/accuracy_carry" in rows[0] and "loss/cross_entropy" not in rows[0]
    for key in ("loss/cross_entropy", "optim/lr", "perf/tokens_per_s", "perf/peak_memory_gb",
                "time/forward_backward_s", "time/optimizer_s", "wall_s"):
        assert key in rows[1], key
    assert "time/eval_s" in rows[-1] and "eval/accuracy" in rows[-1]
    # the loss really falls
    assert np.mean([r["loss/cross_entropy"] for r in rows[-20:]]) < 0.6 * np.mean([r["loss/cross_entropy"] for r in rows[1:6]])
    summary = json.loads((out / "summary.json").read_text())
    assert {"chapter", "status", "steps", "wall_s", "peak_memory_gb", "before", "after", "final", "phase_seconds",
            "checkpoint", "run", "details"} <= set(summary)
    assert summary["chapter"] == "pretrain" and summary["steps"] == 150
    assert summary["before"]["eval/accuracy"] == rows[0]["eval/accuracy"]
    assert summary["after"]["eval/accuracy"] == rows[-1]["eval/accuracy"]
    assert summary["final"]["loss/cross_entropy"] == rows[-1]["loss/cross_entropy"]
    assert {"forward_backward", "optimizer", "eval"} <= set(summary["phase_seconds"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 150 and {"wall_s", "numpy_rng", "chapter"} <= set(state)
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 150 and config["command"] == "pretrain"


def test_mlx_lm_generate_matches_mlx_rl_eval(trained_micro):
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    from mlx_rl.engine.evaluate import evaluate
    from mlx_rl.engine.models import load_model

    _, ckpt = trained_micro
    task = Addition()
    prompts = [r["prompt"] for r in task.heldout_rows(6, seed=0)]
    model, tokenizer, _ = load_model(str(ckpt))
    _, rows = evaluate(model, tokenizer, task, task.heldout_rows(6, seed=0), n_samples=6)
    assert [r["prompt"] for r in rows] == prompts
    m2, t2 = load(str(ckpt))
    for prompt, row in zip(prompts, rows):
        text = generate(m2, t2, prompt, max_tokens=task.max_new_tokens, sampler=make_sampler(0.0))
        assert text == row["completion"], prompt


def test_eval_command_json(trained_micro):
    _, ckpt = trained_micro
    code, out, err = run_cli("eval", "--model", str(ckpt), "--eval-prompts", "20", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["prompts"] == 20 and 0.0 <= data["eval/accuracy"] <= 1.0 and data["samples"]


def test_plot_overlays_runs(trained_micro, tmp_path):
    out, _ = trained_micro
    main(["plot", str(out), str(out), "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_run(tmp_path):
    """SIGINT mid-run saves a checkpoint; --resume then logs the same numbers as an uninterrupted run."""
    import os
    import signal
    import time

    args = ["pretrain", "--preset", "micro", "--steps", "40", "--eval-every", "10", "--eval-prompts", "20",
            "--warmup", "5", "--batch-size", "8"]
    main(args + ["--out", str(tmp_path / "whole")])

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_rl", *args, "--out", str(tmp_path / "cut")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 15:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "checkpoint saved" in err, err
    cut_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 14 <= cut_at < 40  # stopped mid-run (line 0 is step 0's eval)
    saved = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == cut_at and not saved["chapter"].get("finished")

    main(["pretrain", "--resume", str(tmp_path / "cut")])
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in cut] == [r["step"] for r in whole] == list(range(0, 41))
    for a, b in zip(whole, cut):
        for key in ("loss/cross_entropy", "optim/lr", "optim/grad_norm", "eval/accuracy"):
            assert a.get(key) == b.get(key), (a["step"], key)


@pytest.mark.parametrize("max_grad_norm", [1e-3, 0.0])  # clipping hard, and off
def test_compiled_update_matches_the_plain_one(max_grad_norm):
    """make_update(compile=True) compiles the gradient and the clip + AdamW step; the numbers stay the same."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_rl.chapters.pretrain import pretrain_loss
    from mlx_rl.engine.models import new_tiny_model
    from mlx_rl.engine.update import current_lr, make_optimizer, make_update
    from mlx_rl.runs import PhaseTimer

    tokens = mx.array(np.random.default_rng(0).integers(4, 60, size=(4, 12)))
    results = []
    for compile in (False, True):
        model, _, _ = new_tiny_model("micro", seed=0)
        optimizer = make_optimizer(1e-2, 10, warmup=3)
        timer = PhaseTimer()
        update = make_update(model, optimizer, pretrain_loss, max_grad_norm, compile=compile, timer=timer)
        mask = mx.ones((4, 11))
        norms = [update(tokens, mask, mask.sum())[2].item() for _ in range(3)]
        assert {"time/forward_backward_s", "time/optimizer_s"} <= set(timer.pop())
        results.append((norms, tree_flatten(model.parameters()), current_lr(optimizer)))
    (plain_norms, plain_params, plain_lr), (norms, params, lr) = results
    assert np.allclose(norms, plain_norms, rtol=1e-4) and lr == pytest.approx(plain_lr)
    for (name, a), (_, b) in zip(plain_params, params):
        assert np.allclose(a, b, atol=1e-5), name
