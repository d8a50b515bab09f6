"""Bring your own model: real mlx-lm architectures, BPE tokenizers, chat templates, LoRA, 4-bit bases.

Every checkpoint here is built locally (mlx_rl.testing): a tiny random model of
an mlx-lm architecture, a byte-level BPE tokenizer trained in the test, a chat
template with role markers and two EOS ids. Nothing is downloaded.

All of it is in the fast suite (about 10 s on an idle 2-core box, a minute
under heavy load; chapter plots are switched off): the checkpoints load; several
EOS ids stop sampling; LoRA's reference (adapters off) gives the base model's
log-probs bitwise, also on a 4-bit base; saved adapters load with mlx-lm's own
`load(adapter_path=...)` and `mlx_lm generate --adapter-path`; peak memory
against a second copy; --resume; one-line errors; and the CLI matrix, two steps
each: pretrain, GRPO, PPO and DPO on llama, qwen2, qwen3, gemma3_text and phi3,
with full weights and with LoRA, and with LoRA on each 4-bit base.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_rl
from mlx_rl.cli import main
from mlx_rl.data import tasks
from mlx_rl.engine import lora
from mlx_rl.engine.logprobs import completion_batch, token_logprobs
from mlx_rl.engine.session import Reference
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.testing import ARCHS, build_checkpoint, checkpoint_weights

CHAPTERS = ["pretrain", "grpo", "ppo", "dpo"]
RL_CHAPTERS = ["grpo", "ppo", "dpo"]

# Two steps with the smallest batches each chapter takes; the KL terms are on so the reference runs.
CHAPTER_ARGS = {
    "pretrain": ["--batch-size", "4"],
    "grpo": ["--group-size", "2", "--prompts-per-step", "2", "--beta", "0.04", "--pass-k", ""],  # no pass@k: it samples
    "ppo": ["--rollout-batch", "4", "--minibatch-size", "4", "--kl-coef", "0.05", "--value-warmup", "0"],
    "dpo": ["--batch-size", "2", "--pair-prompts", "6", "--samples-per-prompt", "2"],
}


def available(chapter):
    return (Path(mlx_rl.__file__).parent / "chapters" / f"{chapter}.py").exists()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(arch, bits=None) -> path of a tiny local checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("byo")
    built = {}

    def get(arch="qwen3", bits=None):
        key = (arch, bits)
        if key not in built:
            built[key] = build_checkpoint(root / f"{arch}-{bits or 'full'}", arch, bits=bits)
        return built[key]

    return get


def mlx_load(path, **kw):
    from mlx_lm import load

    return load(str(path), **kw)


def length_reward(completions, **kwargs):
    return [(len(c) % 4) / 3.0 for c in completions]


@pytest.fixture
def varied_reward(monkeypatch):
    """Random tiny models never earn the task's reward, so every group would carry zero signal:
    the built-in tasks reward the completion's length instead (deterministic, varies between samples)."""
    monkeypatch.setattr(tasks.BuiltinTask, "reward_specs", (length_reward,))
    monkeypatch.setattr(tasks.BuiltinTask, "reward_weights", (1.0,))


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Drawing PNGs is most of a two-step run's time and is tested elsewhere (the loop draws them at the end)."""
    import mlx_rl.plots

    monkeypatch.setattr(mlx_rl.plots, "plot_run", lambda *a, **k: None)


def run_chapter(tmp_path, chapter, model, *extra):
    out = tmp_path / f"{chapter}-run"
    main([chapter, "--model", str(model), "--out", str(out), "--steps", "2", "--eval-prompts", "2",
          "--eval-every", "0", "--no-compile", *CHAPTER_ARGS[chapter], *extra])
    return out


def check_full_run(out, base):
    """Full fine-tune: every weight tensor of the saved checkpoint moved away from the base."""
    before, after = checkpoint_weights(base), checkpoint_weights(out / "checkpoint")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if mx.array_equal(before[k], after[k]).item()]
    assert not unchanged, f"tensors that did not train: {unchanged}"


def check_lora_run(out, base, n_blocks=2, lora_layers=1, quantized=False):
    """LoRA: every adapter trained (B starts at 0), only in the last blocks; frozen weights untouched."""
    adapters = mx.load(str(out / "checkpoint" / "adapters" / "adapters.safetensors"))
    config = json.loads((out / "checkpoint" / "adapters" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == lora_layers
    assert config["lora_parameters"]["rank"] == 4 and config["lora_parameters"]["dropout"] == 0.0
    adapted = sorted({k.rsplit(".", 1)[0] for k in adapters})  # module paths, e.g. model.layers.1.mlp.up_proj
    assert adapted and all(k.startswith(f"model.layers.{n_blocks - 1}.") for k in adapted)
    for k, v in adapters.items():
        if k.endswith("lora_b"):
            assert mx.abs(v).max().item() > 0, f"adapter {k} did not train"
    # The fused checkpoint: the adapted layers changed, every other tensor is the base's, bit for bit.
    before, after = checkpoint_weights(base), checkpoint_weights(out / "checkpoint")
    assert before.keys() == after.keys()
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    assert all(any(k.startswith(m + ".") for m in adapted) for k in changed), changed
    if not quantized:  # re-quantising may round a small change away in some layers
        assert {k.rsplit(".", 1)[0] for k in changed} == set(adapted)
    else:
        assert changed


# --- checkpoints, tokenizers, chat templates, EOS ---------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_local_checkpoint_loads_with_mlx_lm(ckpt, arch):
    model, tokenizer, config = mlx_load(ckpt(arch), return_config=True)
    assert config["model_type"] == arch
    assert len(tokenizer.eos_token_ids) == 2  # <eos> and <|end|>
    assert tokenizer.vocab_size > 256  # byte-level BPE: 256 bytes + specials + learnt merges
    text = "07+45=250 sort:53913=13359 the reward"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "07+45="}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<bos><|user|>07+45=<|end|><|assistant|>"
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])


def test_quantized_checkpoint_loads(ckpt):
    import mlx.nn as nn

    model, _, config = mlx_load(ckpt("qwen3", 4), return_config=True)
    assert config["quantization"]["bits"] == 4
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


def test_every_eos_id_stops_sampling(ckpt):
    """Sampling stops at whichever of the tokenizer's EOS ids comes out (rollout.generate)."""
    import mlx.nn as nn

    from mlx_rl.engine.sampling import generate

    model, tokenizer = mlx_load(ckpt("llama"))

    class Forced(nn.Module):  # the model, but one token always wins
        def __init__(self, inner, token):
            super().__init__()
            self.inner, self.layers, self.token = inner, inner.layers, token

        def __call__(self, x, cache=None):
            logits = self.inner(x, cache=cache)
            return logits + 100.0 * (mx.arange(logits.shape[-1]) == self.token)

    for eos in sorted(tokenizer.eos_token_ids):
        r = generate(Forced(model, eos), tokenizer, ["07+45=", "sort:123="], 5, chat_template=True)
        assert r.finish_reasons == ["stop", "stop"] and r.mask.sum().item() == 2
        assert r.completion_ids[:, 0].tolist() == [eos, eos]


# --- LoRA: reference = adapters off, saved adapters, fused checkpoint --------------------


def lora_step(model, tokenizer, steps=1, compile=False):
    """Train the adapters a step on a fixed batch, so they are non-zero."""
    from mlx_rl.chapters.pretrain import pretrain_loss

    update = make_update(model, make_optimizer(1e-2, 10), pretrain_loss, compile=compile)
    prompts = [tokenizer.encode(p) for p in ["07+45=", "sort:53913=", "12+34="]]
    answers = [tokenizer.encode(a, add_special_tokens=False) for a in ["250", "13359", "640"]]
    n = max(map(len, answers))
    ids = [a + [0] * (n - len(a)) for a in answers]
    mask = [[1] * len(a) + [0] * (n - len(a)) for a in answers]
    tokens, loss_mask = completion_batch(prompts, ids, mask, 0)
    for _ in range(steps):
        update(tokens, loss_mask, loss_mask.sum())
    return tokens


@pytest.mark.parametrize("arch,bits,compile", [("qwen3", None, True), ("gemma3_text", None, False), ("llama", 4, False)])
def test_lora_reference_is_the_base_model_exactly(ckpt, arch, bits, compile):
    base, _ = mlx_load(ckpt(arch, bits))
    model, tokenizer = mlx_load(ckpt(arch, bits))
    lora.apply_lora(model, rank=4, num_layers=-1, scale=20.0)
    reference = Reference(model)
    assert reference.model.model is model  # the policy itself: no second copy of the weights
    tokens = lora_step(model, tokenizer, compile=compile)  # the compiled update step trains LoRA too
    assert all(mx.abs(m.lora_b).max().item() > 0 for _, m in lora.lora_modules(model))

    base_lp, _ = token_logprobs(base, tokens)
    ref_lp = reference.logprobs(tokens)
    policy_lp, _ = token_logprobs(model, tokens)
    assert mx.array_equal(ref_lp, base_lp).item()  # bitwise, not merely close
    assert mx.abs(policy_lp - base_lp).max().item() > 1e-3  # the adapters do change the policy
    assert mx.array_equal(token_logprobs(model, tokens)[0], policy_lp).item()  # and are back on afterwards


def test_full_finetune_reference_unchanged(ckpt):
    """Without LoRA, Reference is still a frozen model object of its own (the existing behaviour)."""
    model, _ = mlx_load(ckpt("qwen3"))
    reference = Reference(model)
    assert type(reference.model) is type(model) and reference.model is not model


def test_lora_peak_memory_below_a_second_copy(tmp_path):
    """Reference log-probs plus one update: adapters off vs. a second loaded copy of the base."""
    from mlx_lm.utils import get_total_parameters

    from mlx_rl.engine.logprobs import reference_logprobs

    path = build_checkpoint(tmp_path / "bigger", "qwen3", hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)

    def peak(second_copy):
        model, tokenizer = mlx_load(path)
        lora.apply_lora(model, rank=8, num_layers=-1, scale=20.0)
        tokens = lora_step(model, tokenizer)  # warm: compile and optimizer state exist before we measure
        mx.clear_cache()
        mx.reset_peak_memory()
        if second_copy:
            ref_model, _ = mlx_load(path)
            ref = reference_logprobs(ref_model, tokens)
        else:
            ref = Reference(model).logprobs(tokens)
        mx.eval(ref)
        lora_step(model, tokenizer)
        return mx.get_peak_memory(), get_total_parameters(model) * 4

    with_lora_reference, model_bytes = peak(False)
    with_copy, _ = peak(True)
    print(f"peak: adapters-off reference {with_lora_reference / 1e6:.1f} MB, second copy {with_copy / 1e6:.1f} MB, "
          f"model {model_bytes / 1e6:.1f} MB")
    assert with_copy - with_lora_reference > 0.8 * model_bytes


def test_saved_adapters_load_in_mlx_lm_and_fuse(tmp_path, ckpt):
    """What a LoRA run saves: mlx-lm's load(adapter_path=...) gives our model; the fused checkpoint matches it."""
    base = ckpt("qwen3")
    out = run_chapter(tmp_path, "pretrain", base, "--lora-rank", "4", "--lora-layers", "1")
    check_lora_run(out, base)
    tokens = mx.array([[1, 23, 30, 18, 36, 40, 41]])
    with_adapters, _ = mlx_load(base, adapter_path=str(out / "checkpoint" / "adapters"))  # what mlx_lm generate does
    ours, tokenizer = mlx_load(base)
    ours.freeze()
    lora.apply_lora(ours, rank=4, num_layers=1, scale=20.0)
    lora.load_adapter_weights(ours, out / "checkpoint" / "adapters")
    fused, _ = mlx_load(out / "checkpoint")
    a, b, c = (token_logprobs(m, tokens)[0] for m in (with_adapters, ours, fused))
    assert mx.array_equal(a, b).item()
    assert mx.allclose(a, c, atol=1e-5).item()
    # `mlx-rl eval --adapter-path` reads the same adapters
    main(["eval", "--model", str(base), "--adapter-path", str(out / "checkpoint" / "adapters"), "--eval-prompts", "2"])


def test_lora_resume_continues_the_adapters(tmp_path, ckpt):
    base = ckpt("llama")
    straight = run_chapter(tmp_path / "a", "pretrain", base, "--lora-rank", "4", "--steps", "3")
    first = run_chapter(tmp_path / "b", "pretrain", base, "--lora-rank", "4", "--steps", "2", "--no-fuse")
    assert not list((first / "checkpoint").glob("model*.safetensors"))  # --no-fuse: adapters only
    main(["pretrain", "--resume", str(first), "--steps", "3"])
    a = mx.load(str(straight / "checkpoint" / "adapters" / "adapters.safetensors"))
    b = mx.load(str(first / "checkpoint" / "adapters" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k


@pytest.mark.parametrize("chapter", RL_CHAPTERS)
def test_rl_resume_with_lora_on_4bit_base(tmp_path, ckpt, varied_reward, chapter):
    """--resume reloads the 4-bit base from --model, then the adapters; the KL reference still works."""
    if not available(chapter):
        pytest.skip(f"mlx_rl/{chapter}.py not written yet")
    out = run_chapter(tmp_path, chapter, ckpt("llama", 4), "--lora-rank", "4")
    saved = mx.load(str(out / "checkpoint" / "adapters" / "adapters.safetensors"))
    main([chapter, "--resume", str(out), "--steps", "3"])
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    resumed = mx.load(str(out / "checkpoint" / "adapters" / "adapters.safetensors"))
    assert any(not mx.array_equal(saved[k], resumed[k]).item() for k in saved)


# --- one-line errors ---------------------------------------------------------------------


def expect_error(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_hub_name_offline_is_one_line_error(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    expect_error(capsys, ["eval", "--model", "no-such-org/no-such-model-xyz", "--eval-prompts", "2"], "no-such-org/no-such-model-xyz")
    expect_error(capsys, ["pretrain", "--model", "no-such-org/no-such-model-xyz", "--out", str(tmp_path / "r")],
                 "no-such-org/no-such-model-xyz")


def test_user_errors(tmp_path, capsys, ckpt):
    expect_error(capsys, ["pretrain", "--model", str(ckpt("qwen3", 4)), "--out", str(tmp_path / "a")], "quantised", "--lora-rank")
    expect_error(capsys, ["pretrain", "--lora-rank", "4", "--out", str(tmp_path / "b")], "--model")
    expect_error(capsys, ["pretrain", "--model", str(ckpt("qwen3")), "--lora-rank", "4", "--lora-layers", "3",
                          "--out", str(tmp_path / "c")], "2 blocks")
    expect_error(capsys, ["pretrain", "--model", str(ckpt("qwen3")), "--lora-rank", "4", "--lora-keys", "mlp.nothing",
                          "--out", str(tmp_path / "d")], "mlp.nothing")
    no_template = tmp_path / "no-template"
    build_checkpoint(no_template, "llama")
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["pretrain", "--model", str(no_template), "--chat-template", "--out", str(tmp_path / "e")], "chat template")


# --- the chapter matrix, two steps each ---------------------------------------------------

# Every chapter x every architecture x {full weights, LoRA on the last block}, and LoRA on every 4-bit base.
MATRIX = [(c, arch, mode, None) for c in CHAPTERS for arch in ARCHS for mode in ("full", "lora")] + [
    (c, arch, "lora", 4) for c in CHAPTERS for arch in ARCHS
]


def matrix_case(tmp_path, ckpt, chapter, arch, mode, bits):
    if not available(chapter):
        pytest.skip(f"mlx_rl/{chapter}.py not written yet")
    base = ckpt(arch, bits)
    extra = ["--chat-template"]
    if mode == "lora":
        extra += ["--lora-rank", "4", "--lora-layers", "1"]
    out = run_chapter(tmp_path, chapter, base, *extra)
    assert json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perf/tokens_per_s"] > 0 for r in rows if r["step"] > 0)  # logged by every LLM chapter
    if mode == "lora":
        check_lora_run(out, base, quantized=bool(bits))
    else:
        check_full_run(out, base)
    assert mlx_load(out / "checkpoint")  # what later chapters start from


@pytest.mark.parametrize("chapter,arch,mode,bits", MATRIX)
def test_chapter_matrix(tmp_path, ckpt, varied_reward, chapter, arch, mode, bits):
    matrix_case(tmp_path, ckpt, chapter, arch, mode, bits)


def test_mlx_lm_generate_cli_with_adapters(tmp_path, ckpt):
    base = ckpt("qwen3")
    out = run_chapter(tmp_path, "pretrain", base, "--lora-rank", "4")
    for args in (["--model", str(base), "--adapter-path", str(out / "checkpoint" / "adapters")],
                 ["--model", str(out / "checkpoint")]):
        done = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", *args, "--prompt", "07+45=", "--max-tokens", "3"],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Generation:" in done.stdout


# --- the Qwen3-0.6B recipe of docs/byo.md, as written there ---------------------------------------------------------

BYO_PAGE = Path(__file__).resolve().parent.parent / "docs" / "byo.md"


def recipe_commands(name):
    """The `mlx-rl ...` commands of the recipe block marked `<!-- recipe: NAME ... -->` in docs/byo.md, as argv lists."""
    import shlex

    text = BYO_PAGE.read_text()
    assert f"<!-- recipe: {name}" in text, f"docs/byo.md has no recipe {name}"
    block = text.split(f"<!-- recipe: {name}", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("mlx-rl ")]


def run_recipe(tmp_path, model, extra=()):
    """Run the recipe's commands on `model` with local prompts and a reward that tells completions apart (a random
    model never writes the exact answer, and a step whose groups all score the same makes no update); the
    recipe's own options otherwise, then `extra`. Returns the run directories."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10, 40, 3) for b in range(5, 50, 7)))
    (tmp_path / "reward.py").write_text("def spread(prompts, completions, **columns):\n"
                                        "    return [float(sum(map(ord, c)) % 7) for c in completions]\n")
    outs = []
    for i, argv in enumerate(recipe_commands("qwen3-16gb")):
        swap = {"--model": str(model), "--data": str(data), "--out": str(tmp_path / f"run{i}"),
                "--reward": f"{tmp_path / 'reward.py'}:spread"}
        argv = [swap.get(argv[j - 1], a) if j else a for j, a in enumerate(argv)]
        main([*argv, *extra])
        outs.append(tmp_path / f"run{i}")
    return outs


def check_recipe_run(out, model):
    from mlx_lm import load as mlx_load

    config = json.loads((out / "config.json").read_text())
    assert config["grad_checkpoint"] is True and config["micro_batch"] == 4 and config["lora_rank"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["optim/grad_norm"] > 0
    mlx_load(str(model), adapter_path=str(out / "checkpoint" / "adapters"))  # the recipe's mlx_lm generate line
    return rows


def test_qwen3_recipe_runs_on_a_4bit_qwen3(tmp_path, ckpt):
    """The recipe at its own batch (8 prompts x 4, 128 new tokens), one step, on a tiny 4-bit Qwen3 checkpoint."""
    model = ckpt("qwen3", 4)
    (out,) = run_recipe(tmp_path, model, ["--steps", "1", "--eval-prompts", "2", "--pass-k", ""])
    check_recipe_run(out, model)
    assert json.loads((out / "config.json").read_text())["prompts_per_step"] == 8


@pytest.mark.slow
def test_qwen3_recipe_runs_on_a_qwen3_0_6b_shaped_checkpoint(tmp_path):
    """The recipe's options on a checkpoint with Qwen3-0.6B's exact dimensions (random float32 weights, a
    vocabulary of 151,936: bench_scale.py's), at a smaller batch so that the slow suite stays short:
    the memory options run on the real shape and the step peaks far below a 16 GB Mac's budget."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_scale

    model = tmp_path / "qwen3-0.6b"
    bench_scale.build_checkpoint("qwen3-0.6b", model)
    smaller = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "16"]
    (out,) = run_recipe(tmp_path, model, ["--steps", "1", "--eval-prompts", "2", "--pass-k", "", *smaller])
    rows = check_recipe_run(out, model)
    assert rows[-1]["perf/peak_memory_gb"] < 6.0
