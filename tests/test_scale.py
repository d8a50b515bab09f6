"""Memory at scale: chunked log-probs, activation checkpointing and micro-batches give the full pass's numbers."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.engine import lora
from mlx_rl.engine.logprobs import completion_batch, masked, reference_logprobs, sequence_logprobs, token_logprobs
from mlx_rl.engine.models import new_tiny_model

TOL = dict(atol=1e-5, rtol=1e-4)  # float32: the same sums in another order differ by ~1e-6


def make_model(tied=True, seed=0):
    """The micro model (vocabulary ~100), tied embeddings or its own lm_head."""
    from mlx_lm.utils import _get_classes

    model, tokenizer, config = new_tiny_model("micro", seed=seed)
    if tied:
        return model, tokenizer
    config = {**config, "tie_word_embeddings": False}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    untied = model_class(args_class.from_dict(config))
    mx.eval(untied.parameters())
    assert untied.lm_head is not None
    return untied, tokenizer


def grouped_batch(tokenizer, G=3, N=7, seed=0):
    """Three prompts of different lengths, each G times, completions of different lengths (right padding)."""
    prompt_ids = [tokenizer.encode(p) for p in ["12+34=", "1+2=", "sort:5391="] for _ in range(G)]
    rng = np.random.default_rng(seed)
    completion_ids = mx.array(rng.integers(4, 60, size=(len(prompt_ids), N)))
    lengths = rng.integers(1, N + 1, size=(len(prompt_ids), 1))
    completion_mask = mx.array((np.arange(N)[None, :] < lengths).astype(np.float32))
    tokens, mask = completion_batch(prompt_ids, completion_ids, completion_mask)
    return tokens, mask, min(len(p) for p in prompt_ids)


def assert_trees_close(a, b, tol=1e-5):
    """Every gradient within tol of the reference's, relative to that parameter's largest entry (LoRA's scale 20
    makes gradients of 20+, whose float32 rounding alone is ~1e-6)."""
    for (name, x), (_, y) in zip(tree_flatten(a), tree_flatten(b)):
        assert x.shape == y.shape, name
        x, y = np.array(x), np.array(y)
        assert np.abs(x - y).max() <= tol * max(np.abs(y).max(), 1.0), (name, np.abs(x - y).max(), np.abs(y).max())


def loss_and_grads(model, tokens, mask, weights, compile=False, **kwargs):
    """A masked loss that reads the log-probs AND the entropies, differentiated w.r.t. every trainable parameter."""

    def loss():
        logprobs, entropy = token_logprobs(model, tokens, 0.7, **kwargs)
        return (masked(logprobs, mask) * weights).sum() + 0.1 * masked(entropy, mask).sum(), (logprobs, entropy)

    fn = nn.value_and_grad(model, loss)
    if compile:
        fn = mx.compile(fn, inputs=model.state, outputs=model.state)
    (value, (logprobs, entropy)), grads = fn()
    mx.eval(value, logprobs, entropy, grads)
    return value, logprobs, entropy, grads


# --- 1. never the whole (B, T, V) logits --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", ["plain", "shared_prefix"])
@pytest.mark.parametrize("positions", [1, 5])  # positions per chunk: 1, or 5 (the last chunk a partial one)
def test_chunked_logprobs_entropies_and_gradients_equal_the_full_pass(tied, layout, positions):
    model, tokenizer = make_model(tied)
    V = model.args.vocab_size
    G = 3
    tokens, mask, shared_len = grouped_batch(tokenizer, G)
    kwargs = dict(group_size=G, shared_len=shared_len, skip=shared_len - 1) if layout == "shared_prefix" else {}
    weights = mx.random.normal(mask.shape, key=mx.random.key(1))
    full = loss_and_grads(model, tokens, mask, weights, chunk=0, **kwargs)
    for compile in (False, True) if positions == 5 else (False,):
        chunked = loss_and_grads(model, tokens, mask, weights, compile=compile, chunk=positions * V, **kwargs)
        np.testing.assert_allclose(chunked[0].item(), full[0].item(), **TOL)
        np.testing.assert_allclose(np.array(chunked[1]), np.array(full[1]), **TOL)  # log-probs, every position
        np.testing.assert_allclose(np.array(chunked[2]), np.array(full[2]), **TOL)  # entropies
        assert_trees_close(chunked[3], full[3])
    head = "lm_head" if not tied else "model.embed_tokens"
    assert np.abs(np.array(dict(tree_flatten(full[3]))[f"{head}.weight"])).max() > 0  # the head is trained too


def test_chunked_lora_gradients_and_the_reference_equal_the_full_pass():
    model, tokenizer = make_model(tied=True)
    lora.apply_lora(model, rank=4, scale=20.0)
    for _, m in lora.lora_modules(model):  # B starts at 0: make the adapters do something
        m.lora_b = mx.random.normal(m.lora_b.shape, scale=0.05, key=mx.random.key(3))
    V = model.args.vocab_size
    tokens, mask, _ = grouped_batch(tokenizer)
    weights = mx.random.normal(mask.shape, key=mx.random.key(2))
    full = loss_and_grads(model, tokens, mask, weights, chunk=0)
    chunked = loss_and_grads(model, tokens, mask, weights, chunk=3 * V)
    assert sorted(k for k, _ in tree_flatten(full[3])) and all("lora_" in k for k, _ in tree_flatten(full[3]))
    assert_trees_close(chunked[3], full[3])
    np.testing.assert_allclose(np.array(chunked[1]), np.array(full[1]), **TOL)
    base = lora.AdaptersOff(model)  # the reference of a LoRA run: adapters off, scored in chunks too
    ref_chunked = reference_logprobs(base, tokens, 0.7, chunk=3 * V)
    ref_full = reference_logprobs(base, tokens, 0.7, chunk=0)
    np.testing.assert_allclose(np.array(ref_chunked), np.array(ref_full), **TOL)
    assert np.abs(np.array(ref_full) - np.array(full[1])).max() > 1e-3  # and it is the base, not the policy


def test_dpo_sequence_logprobs_in_chunks_equal_the_full_pass():
    model, tokenizer = make_model(tied=False)
    tokens, mask, _ = grouped_batch(tokenizer, N=5)
    V = model.args.vocab_size

    def total(chunk):
        return nn.value_and_grad(model, lambda: sequence_logprobs(model, tokens, mask, chunk=chunk).sum())()

    (full, full_grads), (chunked, chunked_grads) = total(0), total(2 * V)
    np.testing.assert_allclose(chunked.item(), full.item(), **TOL)
    assert_trees_close(chunked_grads, full_grads)


def test_chunked_pass_never_holds_the_whole_logits():
    """The peak memory of a training pass falls by about the logits' size when they are scored in chunks."""
    from mlx_lm.utils import _get_classes

    _, _, config = new_tiny_model("micro")
    config = {**config, "vocab_size": 8192}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    tokens = mx.array(np.random.default_rng(0).integers(0, 8192, size=(8, 129)))
    mask = mx.ones((8, 128))
    weights = mx.ones((8, 128))
    logits_bytes = 8 * 128 * 8192 * 4  # 33.5 MB

    def peak(chunk):
        mx.clear_cache()
        mx.reset_peak_memory()
        loss_and_grads(model, tokens, mask, weights, chunk=chunk)
        return mx.get_peak_memory()

    full, chunked = peak(0), peak(2**16)
    assert full > 3 * logits_bytes  # the logits, their softmax and its gradient
    assert chunked < full - 2 * logits_bytes, (full / 1e6, chunked / 1e6)


@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_the_backward_scores_the_chunks_one_after_another(head):
    """With a real model's ratio of positions to chunk size (64 chunks here), the backward pass must not make every
    chunk's logits again at once: the training pass peaks far below the size of the whole logits (before the
    chunks were chained it held twice their size here: 541 MB). The head frozen, as under LoRA, and trained, as in
    a full fine-tune, where each chunk also adds a (V, H) gradient of the tied embeddings (it peaked at 417 MB
    before the backward added them up chunk by chunk)."""
    from mlx_lm.utils import _get_classes

    _, _, config = new_tiny_model("micro")
    config = {**config, "vocab_size": 32768, "num_hidden_layers": 1}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if head == "frozen":
        model.model.embed_tokens.freeze()
    mx.eval(model.parameters())
    tokens = mx.array(np.random.default_rng(0).integers(0, 32768, size=(8, 257)))
    mask, weights = mx.ones((8, 256)), mx.ones((8, 256))
    logits_bytes = 8 * 256 * 32768 * 4  # 268 MB
    mx.eval(tokens, mask, weights)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    loss_and_grads(model, tokens, mask, weights, chunk=2**20)  # 32 positions, 4 MB of logits, per chunk
    assert mx.get_peak_memory() - base < 0.5 * logits_bytes, (mx.get_peak_memory() - base) / 1e6


def test_chunked_scores_keep_a_bfloat16_model_in_bfloat16():
    """The chain between chunks adds a float32 zero: cast to the hidden states' dtype, so a bfloat16 model's head
    still multiplies in bfloat16 (a float32 input would make every chunk cast the (V, H) head to float32)."""
    from mlx_rl.engine.logprobs import after

    h = mx.ones((2, 3), dtype=mx.bfloat16)
    assert after(h, [mx.array([1.5], dtype=mx.float32)]).dtype == mx.bfloat16


# --- 2. activation checkpointing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "shared_prefix", "lora"])
def test_checkpointed_blocks_give_exactly_the_gradients_of_the_plain_model(layout):
    from mlx_rl.engine.memory import checkpoint_blocks, is_checkpointed

    G = 3
    plain, tokenizer = make_model(tied=False)
    model, _ = make_model(tied=False)
    if layout == "lora":
        for m in (plain, model):
            mx.random.seed(5)
            lora.apply_lora(m, rank=4)
            for _, layer in lora.lora_modules(m):
                layer.lora_b = mx.random.normal(layer.lora_b.shape, scale=0.05, key=mx.random.key(3))
    checkpoint_blocks(model)
    assert is_checkpointed(model) and not is_checkpointed(plain)  # the other instance is untouched
    tokens, mask, shared_len = grouped_batch(tokenizer, G)
    kwargs = dict(group_size=G, shared_len=shared_len, skip=shared_len - 1) if layout == "shared_prefix" else {}
    weights = mx.random.normal(mask.shape, key=mx.random.key(1))
    expected = loss_and_grads(plain, tokens, mask, weights, **kwargs)
    for compile in (False, True):
        got = loss_and_grads(model, tokens, mask, weights, compile=compile, **kwargs)
        np.testing.assert_allclose(np.array(got[1]), np.array(expected[1]), **TOL)
        assert_trees_close(got[3], expected[3])
    assert all(np.abs(np.array(g)).max() > 0 for _, g in tree_flatten(expected[3]))
    # and it still samples: a KV-cache pass is the plain model's
    from mlx_lm.models.cache import make_prompt_cache

    a, b = (m(tokens[:, :5], cache=make_prompt_cache(m)) for m in (plain, model))
    np.testing.assert_allclose(np.array(a), np.array(b), **TOL)


def test_checkpointed_blocks_hold_less_memory():
    from mlx_lm.utils import _get_classes

    from mlx_rl.engine.memory import checkpoint_blocks

    _, _, config = new_tiny_model("micro")
    config = {**config, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4}
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    plain = model_class(args_class.from_dict(config))
    mx.eval(plain.parameters())
    model = model_class(args_class.from_dict(config))
    model.update(plain.parameters())
    checkpoint_blocks(model)
    tokens = mx.array(np.random.default_rng(0).integers(0, config["vocab_size"], size=(8, 257)))
    mask, weights = mx.ones((8, 256)), mx.ones((8, 256))

    def peak(m):
        mx.clear_cache()
        mx.reset_peak_memory()
        loss_and_grads(m, tokens, mask, weights)
        return mx.get_peak_memory()

    assert peak(model) < 0.75 * peak(plain)  # 4 blocks: measured 0.66


# --- 3. micro-batches ----------------------------------------------------------------------------------------------


def one_sgd_step(model, loss_fn, batches, **micro):
    """What SGD at rate 0.01 changes (minus the gradients, scaled), after len(batches) updates; and the metrics."""
    import mlx.optimizers as optim

    from mlx_rl.engine.update import make_update

    before = dict(tree_flatten(model.trainable_parameters()))
    update = make_update(model, optim.SGD(learning_rate=0.01), loss_fn, max_grad_norm=0.0, compile=True, **micro)
    metrics = []
    for arrays in batches(metrics):
        metrics.append(update(*arrays)[1])
    after = dict(tree_flatten(model.trainable_parameters()))
    return {k: after[k] - before[k] for k in before}, metrics


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_grpo_micro_batches_give_the_full_batch_update(variant):
    from mlx_rl.chapters import grpo
    from mlx_rl.chapters import grpo_family as family

    G = 3
    _, tokenizer = make_model()
    tokens, mask, shared_len = grouped_batch(tokenizer, G)
    cfg = grpo.GRPOConfig(variant=variant, kl_coef=0.05, group_size=G, temperature=0.7)
    loss_fn = grpo.make_loss_fn(cfg, family.make_variant(cfg, 7))
    advantages = mx.random.normal((tokens.shape[0],), key=mx.random.key(4))
    ref = mx.random.normal(mask.shape, key=mx.random.key(5)) * 0.1 - 2.0
    counts = (mx.array(float(tokens.shape[0])), mask.sum(), shared_len)

    def batches(metrics):  # two epochs: the second reads the first's log-probs as the old policy's
        yield tokens, mask, advantages, mx.zeros(mask.shape), ref, mx.array(True), *counts
        yield tokens, mask, advantages, metrics[0]["logprobs"], ref, mx.array(False), *counts

    full, full_metrics = one_sgd_step(make_model()[0], loss_fn, batches)
    for micro_batch in (3, 4):  # 4 rows: rounded down to whole groups of 3
        delta, metrics = one_sgd_step(make_model()[0], loss_fn, batches, micro_batch=micro_batch, row_multiple=G)
        assert_trees_close(delta, full)
        for k, v in full_metrics[1].items():
            np.testing.assert_allclose(np.array(metrics[1][k]), np.array(v), err_msg=k, **TOL)
    assert any(np.abs(np.array(d)).max() > 1e-5 for d in full.values())


def test_ppo_micro_batches_give_the_full_batch_update():
    from mlx_rl.chapters import ppo

    _, tokenizer = make_model()
    tokens, mask, _ = grouped_batch(tokenizer)
    old = token_logprobs(make_model()[0], tokens)[0] + mx.random.normal(mask.shape, key=mx.random.key(6)) * 0.1
    advantages = mx.random.normal(mask.shape, key=mx.random.key(7))
    loss_fn = ppo.make_policy_loss(0.2, 1.0)

    def batches(metrics):
        yield tokens, mask, old, advantages, mask.sum()

    full, full_metrics = one_sgd_step(make_model()[0], loss_fn, batches)
    delta, metrics = one_sgd_step(make_model()[0], loss_fn, batches, micro_batch=2)  # 9 rows: 2+2+2+2+1
    assert_trees_close(delta, full)
    for k, v in full_metrics[0].items():
        np.testing.assert_allclose(np.array(metrics[0][k]), np.array(v), err_msg=k, **TOL)


def test_dpo_micro_batches_keep_pairs_together_and_give_the_full_batch_update():
    from mlx_rl.chapters import dpo

    _, tokenizer = make_model()
    tokens, mask, _ = grouped_batch(tokenizer, G=2, N=5)  # 6 rows: 3 chosen, then their 3 rejected
    B = tokens.shape[0] // 2
    ref = sequence_logprobs(make_model()[0], tokens, mask) + mx.random.normal((2 * B,), key=mx.random.key(8))
    loss_fn = dpo.make_loss_fn(0.1, rpo_alpha=0.5)

    def batches(metrics):
        yield tokens, mask, ref, mx.array(float(B)), mask[:B].sum()

    full, full_metrics = one_sgd_step(make_model()[0], loss_fn, batches)
    parts = dpo.split_pairs((tokens, mask, ref, 3.0), 2)
    assert len(parts) == 3 and all(p[0].shape[0] == 2 for p in parts)
    np.testing.assert_array_equal(np.array(parts[1][0]), np.array(tokens[mx.array([1, B + 1])]))  # pair 1 together
    delta, metrics = one_sgd_step(make_model()[0], loss_fn, batches, micro_batch=2, split=dpo.split_pairs,
                                  row_multiple=2)
    assert_trees_close(delta, full)
    for k, v in full_metrics[0].items():
        np.testing.assert_allclose(np.array(metrics[0][k]), np.array(v), err_msg=k, **TOL)


def test_auto_micro_batch_chooses_from_the_free_memory_and_says_so(monkeypatch, capsys):
    from mlx_rl.chapters import ppo
    from mlx_rl.engine import memory, session

    model, tokenizer = make_model()
    tokens, mask, _ = grouped_batch(tokenizer)
    per_row = memory.auto_micro_batch(model, 1, tokens.shape[1], available=0)[1] - 5 * 4 * memory.LOGITS_CHUNK
    assert per_row > 0
    monkeypatch.setattr(session, "available_memory_bytes", lambda: 2 * (5 * 4 * memory.LOGITS_CHUNK + 4 * per_row))
    assert memory.auto_micro_batch(model, 9, tokens.shape[1])[0] == 4  # half the memory holds 4 rows' activations
    assert memory.auto_micro_batch(model, 9, tokens.shape[1], multiple=3)[0] == 3  # whole groups
    # the checkpointed model keeps less per row, so more rows fit
    checkpointed = memory.activation_bytes_per_token(model.args, True) < memory.activation_bytes_per_token(model.args)
    assert checkpointed
    old = token_logprobs(model, tokens)[0]
    advantages = mx.random.normal(mask.shape, key=mx.random.key(7))
    loss_fn = ppo.make_policy_loss(0.2, 1.0)

    def batches(metrics):
        yield tokens, mask, old, advantages, mask.sum()

    full, _ = one_sgd_step(make_model()[0], loss_fn, batches)
    delta, _ = one_sgd_step(make_model()[0], loss_fn, batches, micro_batch=0)
    assert "micro-batch: 4 of 9 rows" in capsys.readouterr().out
    assert_trees_close(delta, full)


def test_the_memory_check_sizes_the_sampler_by_the_rows_sampled_at_once(monkeypatch):
    """GRPO's --sample-batch: the precheck's KV cache is of the rows the sampler decodes together, not the batch."""
    from mlx_rl.config import MlxRlError
    from mlx_rl.engine import session

    model, _ = make_model()
    # a large vocabulary: a row's sampling memory is mostly its one position of logits
    config = {"vocab_size": 4_000_000, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
    weights = 16 * sum(v.size for _, v in tree_flatten(model.parameters()))
    per_row = 4 * 2 * 8 * 10 + 8 * 4_000_000  # the KV cache of 10 tokens and one position's logits
    monkeypatch.setattr(session, "available_memory_bytes", lambda: weights + 20 * per_row)
    with pytest.raises(MlxRlError, match="sampling 64 rows x 10 tokens at once"):
        session.check_memory(model, config, 64, 10, "64 rows", micro_batch=1)
    session.check_memory(model, config, 64, 10, "64 rows", micro_batch=1, sample_rows=16)  # 16 rows fit
    with pytest.raises(MlxRlError, match="sampling 32 rows"):
        session.check_memory(model, config, 64, 10, "64 rows", micro_batch=1, sample_rows=32)


# --- the commands --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["grpo", "ppo", "dpo"])
def test_cli_runs_with_grad_checkpoint_and_micro_batches(tmp_path, micro_checkpoint, command, capsys):
    import json

    from mlx_rl.cli import main
    from mlx_rl.data.tasks import get_task

    out = tmp_path / "run"
    common = ["--model", str(micro_checkpoint), "--out", str(out), "--steps", "1", "--eval-prompts", "4",
              "--grad-checkpoint", "--lora-rank", "4"]
    # a reward that tells completions apart, so that the step has something to learn
    (tmp_path / "reward.py").write_text("def spread(prompts, completions, **columns):\n"
                                        "    return [float(sum(map(ord, c)) % 7) for c in completions]\n")
    reward = ["--reward", f"{tmp_path / 'reward.py'}:spread"]
    if command == "grpo":
        args = ["--prompts-per-step", "2", "--group-size", "4", "--micro-batch", "4", *reward]
    elif command == "ppo":
        args = ["--rollout-batch", "8", "--minibatch-size", "8", "--micro-batch", "3", "--value-warmup", "0", *reward]
    else:
        pairs = tmp_path / "pairs.jsonl"
        rows = get_task("addition").train_rows(np.random.default_rng(0), 4, distinct=True)
        pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["answer"], "rejected": "000"}) + "\n"
                                 for r in rows))
        args = ["--pairs", str(pairs), "--batch-size", "4", "--micro-batch", "0"]
    main([command, *common, *args])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["optim/grad_norm"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["grad_checkpoint"] is True and config["micro_batch"] == int(args[args.index("--micro-batch") + 1])
    if command == "dpo":  # 0: chosen, and said
        assert "micro-batch: " in capsys.readouterr().out


def test_bench_scale_builds_a_shaped_checkpoint_and_measures_a_step(tmp_path, monkeypatch):
    """benchmarks/bench_scale.py on a small shape: the checkpoint loads with mlx-lm (tokenizer of the model's
    vocabulary size), and a step is measured with and without the memory options."""
    import sys
    from pathlib import Path

    from mlx_rl.engine import logprobs

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_scale

    monkeypatch.setattr(logprobs, "LOGITS_CHUNK", logprobs.LOGITS_CHUNK)  # the "full" setting changes it: put back
    shape = {**bench_scale.MODELS["qwen3-0.6b"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 1000}
    monkeypatch.setitem(bench_scale.MODELS, "shaped", shape)
    model_dir = tmp_path / "shaped"
    n = bench_scale.build_checkpoint("shaped", model_dir)
    bench_scale.write_prompts(model_dir / "prompts.jsonl", 16)
    args = bench_scale.parse_args(["--prompts", "2", "--group-size", "2", "--prompt-tokens", "16", "--new-tokens", "4",
                                   "--warmup", "0"])
    data = str(model_dir / "prompts.jsonl")
    full = bench_scale.measure(str(model_dir), data, "full", args)
    small = bench_scale.measure(str(model_dir), data, "chunked+ckpt+micro4", args)
    assert n > 0 and full["logits_chunk"] == 0 and small["grad_checkpoint"] and small["micro_batch"] == 4
    for r in (full, small):
        assert r["completion_len"] == 4 and r["rows"] == 4 and r["peak_memory_gb"] > 0 and r["peak_rss_gb"] > 0
        assert {"generate", "reference", "forward_backward", "optimizer"} <= set(r["phase_s"])
    # a peer whose venv is missing is one line, not a crash of the whole benchmark
    missing = bench_scale.parse_args(["--trl-python", str(tmp_path / "no-python")])
    assert "not found" in bench_scale.run_peer(model_dir, data, "trl", missing)["error"]
