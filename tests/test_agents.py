"""Agents: multi-turn episodes with environments and tools.

Only the model's tokens are trained (the gradient at the environment's positions is exactly 0); the sampler's
log-probs of a whole transcript equal a teacher-forced pass over it; a turn ends at a stop string; --max-turns
holds; the built-in environments follow the Ice Maze's dynamics and never eval the model's text; a user's
environment runs end to end through grpo, ppo and eval, and a broken one is one line; (slow) imitation
plateaus and GRPO gets past it on both built-in environments.
"""

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.chapters import grpo
from mlx_rl.chapters import grpo_family as family
from mlx_rl.chapters import ppo
from mlx_rl.config import MlxRlError
from mlx_rl.data import envs
from mlx_rl.engine.episodes import EnvSpec, ObservationFormat, play, transcript_tokens
from mlx_rl.engine.logprobs import completion_batch, token_logprobs
from mlx_rl.runs import read_jsonl

HERE = Path(__file__).resolve().parent
ECHO = str(HERE / "envs" / "echo_env.py") + ":make"


def echo_spec(max_turns=4, max_turn_tokens=6):
    module = envs.load_env(ECHO)
    return EnvSpec(module, "echo", max_turns=max_turns, max_turn_tokens=max_turn_tokens)


class ScriptedEnv:
    """An environment whose observations have different lengths per row and turn, never done."""

    stop = ()

    def __init__(self, row):
        self.k = row["episode_seed"] % 3
        self.turn = 0

    def reset(self):
        return "x" * self.k

    def step(self, text):
        self.turn += 1
        return "o" * (1 + (self.turn + self.k) % 3), 0.5, False


def layout(rollout):
    return completion_batch(rollout.prompt_ids, rollout.completion_ids, rollout.mask, 0, values=rollout.logprobs,
                            present=rollout.present)


# --- the rollout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_episode_logprobs_equal_a_teacher_forced_pass_over_the_whole_transcript(micro_model, temperature):
    model, tokenizer, _ = micro_model
    rows = [{"prompt": p} for p in ["12+34=", "5+6=", "12+34=", "999"]]
    mx.random.seed(4)
    r = play(model, tokenizer, rows, EnvSpec(ScriptedEnv, "scripted", max_turns=3, max_turn_tokens=4), temperature)
    tokens, mask, sampled = layout(r)
    teacher, _ = token_logprobs(model, tokens, temperature)
    np.testing.assert_allclose(np.array(teacher * mask), np.array(sampled), atol=2e-5)
    m, e = np.array(r.mask), np.array(r.env_mask)
    assert (m * e).sum() == 0 and e.sum() > 0 and m.sum() > 0  # every token is the model's or the env's, not both
    assert (r.episodes.turns == 3).all() and (np.array(r.finish_reasons) == "max_turns").all()
    # the environment's tokens are its observations tokenized once, in order
    for b in range(len(rows)):
        env_ids = np.array(r.completion_ids)[b][e[b] > 0].tolist()
        obs = "".join(s["text"] for s in r.episodes.transcripts[b][1:] if s["role"] == "env")
        assert env_ids == tokenizer.encode(obs, add_special_tokens=False)


def test_episodes_of_a_chat_model_use_its_template_and_stay_exact(tmp_path):
    from mlx_rl.engine.models import load_model
    from mlx_rl.testing import build_checkpoint

    path = build_checkpoint(tmp_path / "qwen3", "qwen3")
    model, tokenizer, _ = load_model(str(path))

    class Tool(ScriptedEnv):
        role = "tool"

    rows = [{"prompt": [{"role": "user", "content": "add 3 and 4"}]}, {"prompt": "sort 312", "system": "be brief"}]
    mx.random.seed(0)
    r = play(model, tokenizer, rows, EnvSpec(Tool, "tool", max_turns=3, max_turn_tokens=5), 1.0, chat_template=True)
    tokens, mask, sampled = layout(r)
    teacher, _ = token_logprobs(model, tokens, 1.0)
    np.testing.assert_allclose(np.array(teacher * mask), np.array(sampled), atol=2e-5)
    text = tokenizer.decode(np.array(tokens[0]).tolist())
    assert "<|tool|>o" in text and text.count("<|assistant|>") == 3  # each observation a tool message, then a turn


def test_a_transcript_fine_tuned_on_is_laid_out_as_the_episode_would_be(tmp_path):
    """SFT data with tool messages (transcript_tokens) and the RL rollout lay the same conversation out in the
    same tokens, so fine-tuning teaches exactly the layout the model then acts in; and that is what the
    tokenizer's own template renders for the whole conversation."""
    from mlx_rl.engine.models import load_model
    from mlx_rl.testing import build_checkpoint

    _, tokenizer, _ = load_model(str(build_checkpoint(tmp_path / "llama", "llama")))
    messages = [{"role": "system", "content": "calc"}, {"role": "user", "content": "12*34"},
                {"role": "assistant", "content": "<calc>12*34</calc>"}, {"role": "tool", "content": "[408]"},
                {"role": "assistant", "content": "408"}]
    ids, mask = transcript_tokens(tokenizer, messages)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "<calc>12*34</calc><|end|>408<|end|>"  # the assistant's turns and their EOS, nothing else


def test_a_turn_ends_at_the_stop_string(micro_model):
    model, tokenizer, _ = micro_model
    rows = [{"prompt": "12+34="}, {"prompt": "7+8="}]
    free = play(model, tokenizer, rows, EnvSpec(ScriptedEnv, "s", max_turns=1, max_turn_tokens=8), 0.0)
    first_turn = [t["text"] for t in (s[1] if s[0]["role"] == "env" else s[0] for s in free.episodes.transcripts)]
    stop = first_turn[0][2]  # a character the greedy model writes third

    class Stopping(ScriptedEnv):
        pass

    Stopping.stop = (stop,)
    seen = []

    class Recording(Stopping):
        def step(self, text):
            seen.append(text)
            return super().step(text)

    r = play(model, tokenizer, rows, EnvSpec(Recording, "s", max_turns=2, max_turn_tokens=8), 0.0)
    assert seen[0] == first_turn[0][: first_turn[0].index(stop) + 1]  # cut right after the stop string
    for text in seen:
        assert text.count(stop) <= 1 and (stop not in text or text.endswith(stop))
    lengths = np.array(r.mask).sum(axis=1)
    assert lengths[0] < 16  # the model stopped early, not at 2 x 8 tokens


def test_max_turns_holds_and_the_truncation_is_counted(micro_model):
    model, tokenizer, _ = micro_model
    rows = [{"prompt": "1+1="}] * 3
    r = play(model, tokenizer, rows, EnvSpec(ScriptedEnv, "never done", max_turns=2, max_turn_tokens=3), 1.0)
    assert (r.episodes.turns == 2).all() and r.episodes.truncated.all()
    assert (np.array(r.mask).sum(axis=1) <= 2 * 3).all()
    assert r.episodes.rewards.tolist() == [1.0, 1.0, 1.0]  # 0.5 per turn, summed


def test_episodes_do_not_depend_on_the_batch_they_are_in(micro_model):
    """Each row samples from its own key and seeds its environment from it: a row alone and the same row in a
    batch play the same episode (what makes two processes equal one)."""
    from mlx_rl.engine.sampling import row_keys

    model, tokenizer, _ = micro_model
    rows = [{"prompt": p, "answer": "1"} for p in ["12+34=", "5+6=", "99+1="]]
    spec = EnvSpec(ScriptedEnv, "scripted", max_turns=4, max_turn_tokens=6)
    for seed in range(6):  # rows whose turns end at different moments: one waits while another goes on
        mx.random.seed(seed)
        keys = row_keys(4)
        rows = [{"prompt": p} for p in ["12+34=", "5+6=", "99+1=", "7"]]
        whole = play(model, tokenizer, rows, spec, 1.0, keys=keys)
        for b in range(4):
            alone = play(model, tokenizer, rows[b : b + 1], spec, 1.0, keys=keys[b : b + 1])
            assert whole.texts[b] == alone.texts[0], (seed, b)


class CountingEnv(ScriptedEnv):
    """ScriptedEnv with a counter that only some rows report (the others count as 0)."""

    @property
    def info(self):
        return {"turns_seen": float(self.turn)} if self.k == 0 else {}


def test_episodes_sampled_in_chunks_are_the_whole_batch(micro_model):
    """GRPO's --sample-batch with an environment: a group's episodes per sampler call, joined, give the batch's
    transcripts, tokens, masks, outcomes and counters (log-probs to 1e-5)."""
    import types

    from mlx_rl.engine.sampling import row_keys

    model, tokenizer, _ = micro_model
    task = types.SimpleNamespace(env=EnvSpec(CountingEnv, "counting", max_turns=3, max_turn_tokens=5))
    session = types.SimpleNamespace(model=model, tokenizer=tokenizer, task=task, timer=lambda name: contextlib.nullcontext())
    rows = [{"prompt": p} for p in ["12+34=", "5+6=", "99+1=", "7"]]
    mx.random.seed(3)  # chunks of 2 rows: of different widths, and some without the counter
    keys = row_keys(len(rows) * 2)
    out = {n: grpo.rollout_batch(session, rows, grpo.GRPOConfig(group_size=2, sample_batch=n), 0, keys) for n in (0, 2, 6)}
    whole, _, scores = out[0]
    assert set(whole.episodes.info["turns_seen"]) > {0.0}  # some rows report the counter, some don't
    for n in (2, 6):
        r, _, s = out[n]
        assert r.texts == whole.texts and np.array(r.completion_ids).tolist() == np.array(whole.completion_ids).tolist()
        for name in ("mask", "env_mask"):
            np.testing.assert_array_equal(np.array(getattr(r, name)), np.array(getattr(whole, name)))
        np.testing.assert_allclose(np.array(r.logprobs), np.array(whole.logprobs), atol=1e-5)
        for name in ("rewards", "solved", "turns", "truncated", "turn_rewards"):
            np.testing.assert_array_equal(getattr(r.episodes, name), getattr(whole.episodes, name))
        assert r.episodes.info.keys() == whole.episodes.info.keys() and r.episodes.transcripts == whole.episodes.transcripts
        np.testing.assert_array_equal(r.episodes.info["turns_seen"], whole.episodes.info["turns_seen"])
        np.testing.assert_array_equal(s.total, scores.total)


# --- only the model's tokens are trained ----------------------------------------------------------------


class LogitsModel(nn.Module):
    """A 'model' whose logits are its parameters: the gradient of a loss with respect to the logits, directly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def __call__(self, inputs, cache=None):
        return self.logits[:, : inputs.shape[1]]


def episode_batch(micro_model, seed=0):
    model, tokenizer, _ = micro_model
    mx.random.seed(seed)
    rows = [{"prompt": "12+34="}] * 4 + [{"prompt": "5+6="}] * 4
    r = play(model, tokenizer, rows, EnvSpec(ScriptedEnv, "s", max_turns=3, max_turn_tokens=3), 1.0)
    tokens, mask, sampled = layout(r)
    env = completion_batch(r.prompt_ids, r.completion_ids, r.env_mask, 0)[1]  # (B, T-1) the env's positions
    return tokens, mask, env, sampled


@pytest.mark.parametrize("variant", list(family.VARIANTS))
def test_the_loss_has_exactly_zero_gradient_at_the_environments_positions(micro_model, variant):
    tokens, mask, env, _ = episode_batch(micro_model)
    V = micro_model[1].vocab_size
    rng = np.random.default_rng(0)
    logits = LogitsModel(mx.array(rng.normal(size=(tokens.shape[0], tokens.shape[1] - 1, V)).astype(np.float32)))
    cfg = grpo.GRPOConfig(variant=variant, kl_coef=0.1, group_size=4)
    loss_fn = grpo.make_loss_fn(cfg, family.make_variant(cfg, 12))
    advantages = mx.array(rng.normal(size=tokens.shape[0]).astype(np.float32))
    old = mx.array(rng.normal(size=mask.shape).astype(np.float32) * 0.01) + token_logprobs(logits, tokens)[0]
    ref = old + 0.05
    n_rows, n_tokens = mx.array(float(tokens.shape[0])), mask.sum()
    grads = nn.value_and_grad(logits, lambda *a: loss_fn(logits, *a))(
        tokens, mask, advantages, old, ref, mx.array(False), n_rows, n_tokens)[1]["logits"]  # (B, T-1, V)
    per_position = np.abs(np.array(grads)).sum(axis=-1)  # (B, T-1)
    assert per_position[np.array(env) > 0].max() == 0.0  # exactly: the environment's tokens are never trained
    assert per_position[np.array(mask) > 0].min() > 0.0  # every one of the model's tokens is


def test_ppo_trains_only_the_models_tokens_too(micro_model):
    tokens, mask, env, _ = episode_batch(micro_model, seed=1)
    V = micro_model[1].vocab_size
    rng = np.random.default_rng(1)
    logits = LogitsModel(mx.array(rng.normal(size=(tokens.shape[0], tokens.shape[1] - 1, V)).astype(np.float32)))
    loss_fn = ppo.make_policy_loss(0.2, 1.0)
    old = token_logprobs(logits, tokens)[0] + mx.array(rng.normal(size=mask.shape).astype(np.float32) * 0.01)
    advantages = mx.array(rng.normal(size=mask.shape).astype(np.float32))
    grads = nn.value_and_grad(logits, lambda *a: loss_fn(logits, *a))(tokens, mask, old, advantages, mask.sum())[1]
    per_position = np.abs(np.array(grads["logits"])).sum(axis=-1)
    assert per_position[np.array(env) > 0].max() == 0.0 and per_position[np.array(mask) > 0].min() > 0.0


# --- the built-in environments ----------------------------------------------------------------------------


def test_arithmetic_reads_expressions_and_never_runs_them():
    assert envs.arithmetic("37*45") == 1665 and envs.arithmetic("(1 + 2) * -3") == -9 and envs.arithmetic("8/2") == 4
    for bad in ["7/2", "1/0", "2**100", "__import__('os')", "1+", "", "9" * 80, "(1", "1e5"]:
        assert envs.arithmetic(bad) is None, bad
    env = envs.CalculatorEnv({"answer": "1665"})
    assert env.step("<calc>37*45</calc>") == ("[1665]", 0.0, False)
    assert env.step("<calc>os.system('x')</calc>") == ("[error]", 0.0, False)
    assert env.step("so it is 1665") == (None, 1.0, True) and env.solved
    assert env.info == {"tool_calls": 2, "tool_errors": 1}


def test_icemaze_as_text_follows_the_chapters_dynamics():
    from mlx_rl.chapters.icemaze import MAPS, IceMaze, one_hot_policy, success_probability, value_iteration

    task = envs.IceMazeTask("4x4", slippery=True, max_turns=100)
    maze = IceMaze(MAPS["4x4"], slippery=True)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    env = envs.IceMazeEnv(task.maze, 0, 0, 100)
    env.rng = rng_a
    env.reset()
    s = 0
    for move in "RRDDLURDRDDR":
        obs, reward, done = env.step(move)
        s, r, terminated = maze.step(s, "LDRU".index(move), rng_b)
        assert (done, reward) == (terminated, r) and (done or obs == f"{s // 4}{s % 4}:")
        if done:
            break
    # the best success within 100 moves from S: about 74% on slippery 4x4, FrozenLake's figure, and what chapter 1's
    # value-iteration policy achieves within the same 100 moves (the finite-horizon optimum can only be as good)
    best = task.optimal_success([task.row(task.maze.start)])
    policy = value_iteration(*maze.tables(), gamma=0.99)[2]
    stationary = success_probability(IceMaze(MAPS["4x4"], slippery=True, max_steps=100), one_hot_policy(policy))
    assert stationary - 1e-9 <= best <= stationary + 0.01 and 0.70 < best < 0.78
    assert envs.IceMazeTask("4x4").optimal_success(envs.IceMazeTask("4x4").heldout_rows(500, 0)) == 1.0
    assert envs.parse_move(" right\n") == 2 and envs.parse_move("R") == 2 and envs.parse_move("jump") is None


def test_the_corpora_train_only_the_behaviours_turns(micro_model):
    from mlx_rl.chapters.pretrain import corpus_batch
    from mlx_rl.engine.models import new_tiny_model

    for task in (envs.IceMazeTask(), envs.CalculatorTask()):
        _, tokenizer, _ = new_tiny_model("micro", 0, task.chars())
        tokens, mask = corpus_batch(task, tokenizer, np.random.default_rng(0), 16)
        for b in range(16):
            ids = np.array(tokens[b]).tolist()
            trained = "".join(tokenizer.decode([t]) for t, m in zip(ids[1:], np.array(mask[b])) if m)
            untrained = "".join(tokenizer.decode([t]) for t, m in zip(ids[1:], np.array(mask[b])) if not m)
            if task.name == "icemaze":
                assert set(trained) <= set("LDRU<eos>") and ":" in untrained
            else:
                assert "[" not in trained and ("<calc>" in trained) == ("[" in untrained)


# --- a user's environment through the CLI -------------------------------------------------------------------


def run_cli(args, expect=0):
    p = subprocess.run([sys.executable, "-m", "mlx_rl", *args], capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    if expect is not None:
        assert p.returncode == expect, out[-3000:]
    return out


@pytest.fixture(scope="module")
def prompt_rows():
    return HERE / "envs" / "echo_data"  # train.jsonl and valid.jsonl of {"prompt": "12+12=", "answer": "24"}


SMALL = ["--steps", "2", "--eval-every", "0", "--eval-prompts", "6", "--pass-k", ""]


@pytest.mark.parametrize("chapter", ["grpo", "ppo"])
def test_a_users_environment_runs_end_to_end(tmp_path, micro_checkpoint, prompt_rows, chapter):
    sizes = ["--prompts-per-step", "4", "--group-size", "4"] if chapter == "grpo" else [
        "--rollout-batch", "8", "--minibatch-size", "4", "--value-warmup", "0"]
    out = tmp_path / chapter
    run_cli([chapter, "--model", str(micro_checkpoint), "--env", ECHO, "--data", str(prompt_rows), *sizes, *SMALL,
             "--out", str(out)])
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows[-1]["env/turns"] >= 1 and 0 < rows[-1]["policy/env_token_frac"] < 1 and "env/echoes" in rows[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert "eval/accuracy" in summary["before"] and "eval/turns" in summary["after"]
    sample = read_jsonl(out / "samples.jsonl")[0]
    assert sample["transcript"][0] == {"role": "env", "text": "go:"} and "\u27e6go:\u27e7" in sample["completion"]
    text = run_cli(["eval", "--model", str(out / "checkpoint"), "--env", ECHO, "--data", str(prompt_rows),
                    "--eval-prompts", "3", "--json"])
    result = json.loads(text.strip().splitlines()[-1])
    assert result["prompts"] == 3 and "eval/accuracy" in result and result["samples"][0]["transcript"]


def broken(tmp_path, body, name="env.py"):
    path = tmp_path / name
    path.write_text(body)
    return f"{path}:make"


@pytest.mark.parametrize("case, body, words", [
    ("syntax", "def make(row) return 1\n", "failed to import"),
    ("missing function", "def build(row):\n    return None\n", "has no function 'make'"),
    ("factory raises", "def make(row):\n    raise KeyError('level')\n", "make(row) raised at reset of row 0"),
    ("no step", "class E:\n    def reset(self):\n        return ''\ndef make(row):\n    return E()\n", "no step() method"),
    ("reset not a str", "class E:\n    def reset(self):\n        return 3\n    def step(self, t):\n        return None, 0, True\n"
     "def make(row):\n    return E()\n", "returned int, expected a str"),
])
def test_a_broken_environment_is_one_line_before_any_model_loads(tmp_path, prompt_rows, case, body, words):
    out = tmp_path / "run"
    text = run_cli(["grpo", "--model", "no/such/model", "--env", broken(tmp_path, body), "--data", str(prompt_rows),
                    "--out", str(out)], expect=2)
    lines = [l for l in text.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in text, text
    assert not out.exists()


def test_a_step_that_breaks_the_protocol_midrun_is_one_line_and_the_run_stays_resumable(tmp_path, micro_checkpoint,
                                                                                      prompt_rows):
    env_file = tmp_path / "env.py"
    good = (HERE / "envs" / "echo_env.py").read_text()
    env_file.write_text(good)
    out = tmp_path / "run"
    args = ["grpo", "--model", str(micro_checkpoint), "--env", f"{env_file}:make", "--data", str(prompt_rows),
            "--prompts-per-step", "2", "--group-size", "2", *SMALL, "--save-every", "1"]
    run_cli([*args, "--out", str(out)])  # two good steps
    before = {p.name: p.read_bytes() for p in [out / "metrics.jsonl", out / "checkpoint" / "trainer_state.json"]}
    env_file.write_text(good.replace("return None, reward + float(self.solved), True", "return reward"))
    text = run_cli(["grpo", "--resume", str(out), "--steps", "3"], expect=2)
    assert re.search(r"environment .*env\.py:make: step\(\) at turn 2 of row \d+ .*returned float; expected "
                     r"\(observation: str \| None, reward: float, done: bool\)", text), text
    assert "Traceback" not in text
    assert before == {p.name: p.read_bytes() for p in [out / "metrics.jsonl", out / "checkpoint" / "trainer_state.json"]}
    env_file.write_text(good)
    run_cli(["grpo", "--resume", str(out), "--steps", "3"])  # fixed: it goes on from where it stopped
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]


def test_options_that_make_no_sense_with_an_environment_are_one_line(tmp_path, prompt_rows):
    text = run_cli(["grpo", "--model", "x", "--task", "icemaze", "--reward", "exact"], expect=2)
    assert "the environment gives the reward" in text
    text = run_cli(["pretrain", "--env", ECHO, "--data", str(prompt_rows)], expect=2)
    assert "no corpus of its own" in text


def test_resume_of_an_episode_run_is_bit_for_bit(tmp_path, micro_checkpoint, prompt_rows):
    args = ["grpo", "--env", ECHO, "--data", str(prompt_rows), "--model", str(micro_checkpoint), "--prompts-per-step",
            "4", "--group-size", "4", "--eval-every", "0", "--eval-prompts", "4", "--pass-k", "", "--lr", "1e-3"]
    run_cli([*args, "--steps", "3", "--out", str(tmp_path / "straight")])
    run_cli([*args, "--steps", "2", "--save-every", "1", "--out", str(tmp_path / "resumed")])
    run_cli(["grpo", "--resume", str(tmp_path / "resumed"), "--steps", "3"])
    a, b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    trained = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "wall", "eval/"))}  # noqa: E731
                            for r in rows]
    assert trained(a) == trained(b) and a[1]["grpo/skipped"] == 0.0  # (updates were taken)
    from mlx_rl.testing import checkpoint_weights

    wa, wb = checkpoint_weights(tmp_path / "straight" / "checkpoint"), checkpoint_weights(tmp_path / "resumed" / "checkpoint")
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)


def test_lora_on_an_episode_task_changes_the_adapters(tmp_path, micro_checkpoint, prompt_rows):
    out = tmp_path / "lora"
    run_cli(["grpo", "--env", ECHO, "--data", str(prompt_rows), "--model", str(micro_checkpoint), "--lora-rank", "4",
             "--lr", "1e-2",
             "--prompts-per-step", "4", "--group-size", "4", "--steps", "1", "--eval-every", "0", "--eval-prompts", "4",
             "--pass-k", "", "--out", str(out)])
    adapters = mx.load(str(out / "checkpoint" / "adapters" / "adapters.safetensors"))
    b_mats = [v for k, v in adapters.items() if k.endswith("lora_b")]
    assert b_mats and max(float(mx.abs(v).max()) for v in b_mats) > 0  # LoRA B starts at zero: it moved


# --- learning (slow) ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task, pretrain_steps", [("icemaze", 300), ("calculator", 1200)])
def test_grpo_gets_past_the_imitation_plateau(tmp_path, task, pretrain_steps):
    pt, rl = tmp_path / "pt", tmp_path / "grpo"
    run_cli(["pretrain", "--task", task, "--steps", str(pretrain_steps), "--eval-every", "0", "--eval-prompts", "200",
             "--out", str(pt)])
    run_cli(["grpo", "--task", task, "--model", str(pt / "checkpoint"), "--steps", "12", "--eval-every", "0",
             "--eval-prompts", "200", "--pass-k", "", "--out", str(rl)])
    summary = json.loads((rl / "summary.json").read_text())
    before, after = summary["before"]["eval/accuracy"], summary["after"]["eval/accuracy"]
    assert before < 0.7 and after >= before + 0.25 and after >= 0.85, (before, after)
