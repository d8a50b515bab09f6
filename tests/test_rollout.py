"""Batched rollouts: shapes, masks, EOS, padding, top-p, and agreement with teacher forcing.

Tolerance: a sampled token's log-prob from the rollout (KV cache, one token at a
time) and from teacher forcing (one pass over the whole sequence) are the same
float32 maths in a different order; they agree to 1e-6..2e-6 here, and the
tests allow 1e-5.
"""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import _get_classes

from mlx_rl.engine.logprobs import completion_batch, token_logprobs, top_p_filter
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.data.datasets import prompt_messages, prompt_text
from mlx_rl.engine.sampling import (PaddedKVCache, batch_cache, concat_rollouts, distinct_rows, encode_prompts, generate,
                                    row_keys)

ATOL = 1e-5
PROMPTS = ["12+34=", "1+2=", "sort:5391=", "x", "12+34=", "1+2=", "12+34=", "hello"]


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, _ = new_tiny_model("micro", seed=0)
    return model, tokenizer


def arch_model(model_type, tokenizer, **extra):
    """A tiny random model of another mlx-lm architecture, sharing the char tokenizer."""
    config = dict(
        model_type=model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, intermediate_size=128, vocab_size=len(tokenizer.vocab), rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=512, **extra,
    )
    model_class, args_class = _get_classes(config)
    mx.random.seed(1)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def teacher_forced(model, rollout, temperature=1.0):
    """Teacher-forced log-probs of the rollout's completion tokens, laid out like rollout.logprobs."""
    tokens, mask = completion_batch(rollout.prompt_ids, rollout.completion_ids, rollout.mask)
    logprobs, _ = token_logprobs(model, tokens, temperature)
    return teacher_forced_from(np.array(logprobs), np.array(mask), rollout.logprobs.shape)


def teacher_forced_from(logprobs, mask, shape):
    """(B, T-1) training-layout log-probs -> the rollout's (B, N) layout."""
    out = np.zeros(shape, np.float32)
    for i in range(len(out)):
        picked = logprobs[i][mask[i] > 0]
        out[i, : len(picked)] = picked
    return out


def test_prompts_may_be_strings_or_dataset_rows(micro):
    """A row {"prompt", "system"} is encoded as the data module writes it: system + newline + prompt, or with
    the chat template the system and user messages; a messages prompt always goes through the template."""
    model, tokenizer = micro
    plain, with_system = {"prompt": "1+2=", "answer": "3"}, {"prompt": "1+2=", "system": "sum:"}
    chat = {"prompt": [{"role": "user", "content": "1+2="}]}
    ids = encode_prompts(tokenizer, ["1+2=", plain, with_system, chat])
    assert ids[0] == ids[1] == tokenizer.encode("1+2=")
    assert ids[2] == tokenizer.encode(prompt_text(with_system)) == tokenizer.encode("sum:\n1+2=")
    assert ids[3] == list(tokenizer.apply_chat_template(prompt_messages(chat), add_generation_prompt=True))
    templated = encode_prompts(tokenizer, [with_system], chat_template=True)[0]
    assert templated == list(tokenizer.apply_chat_template(prompt_messages(with_system), add_generation_prompt=True))
    r = generate(model, tokenizer, [plain, with_system], 3, temperature=0)
    assert r.prompts == [plain, with_system] and r.prompt_ids == ids[1:3]


def test_shapes_and_masks(micro):
    model, tokenizer = micro
    mx.random.seed(0)
    r = generate(model, tokenizer, PROMPTS, max_new_tokens=6)
    B = len(PROMPTS)
    assert r.completion_ids.shape == r.logprobs.shape == r.mask.shape == (B, 6)
    assert r.completion_ids.dtype == mx.int32 and r.mask.dtype == mx.float32
    assert r.prompt_ids[0] == tokenizer.encode(PROMPTS[0])
    assert len(r.finish_reasons) == len(r.texts) == B
    logprobs = np.array(r.logprobs)
    assert (logprobs <= 0).all() and (logprobs[np.array(r.mask) > 0] < 0).all()


def test_rows_stop_at_their_own_eos(micro):
    model, tokenizer = micro
    # Pretend a third of the vocabulary is EOS, so rows stop at different steps.
    eos = set(range(2, len(tokenizer.vocab), 3))
    tok = SimpleNamespace(pad_token_id=0, eos_token_ids=eos, encode=tokenizer.encode, decode=tokenizer.decode)
    mx.random.seed(3)
    r = generate(model, tok, PROMPTS * 4, max_new_tokens=8)
    ids, mask, logprobs = np.array(r.completion_ids), np.array(r.mask), np.array(r.logprobs)
    lengths = mask.sum(axis=1).astype(int)
    assert len(set(lengths)) > 2  # rows really did stop at different points
    for row, m, lp, n, reason in zip(ids, mask, logprobs, lengths, r.finish_reasons):
        assert (m[:n] == 1).all() and (m[n:] == 0).all()  # ones, then zeros
        assert (row[n:] == 0).all() and (lp[n:] == 0).all()  # pad and zero log-prob after the end
        assert all(int(t) not in eos for t in row[: n - 1])  # no EOS before the last token
        if reason == "stop":
            assert int(row[n - 1]) in eos
        else:
            assert n == ids.shape[1] and int(row[n - 1]) not in eos


def test_sampling_logprobs_equal_teacher_forced(micro):
    model, tokenizer = micro
    mx.random.seed(0)
    r = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0)
    np.testing.assert_allclose(np.array(r.logprobs), teacher_forced(model, r), atol=ATOL)


def test_temperature_logprobs_equal_teacher_forced(micro):
    model, tokenizer = micro
    mx.random.seed(1)
    r = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.7)
    np.testing.assert_allclose(np.array(r.logprobs), teacher_forced(model, r, temperature=0.7), atol=ATOL)


def test_top_p_logprobs_are_of_the_truncated_distribution(micro):
    model, tokenizer = micro
    mx.random.seed(2)
    top_p = 0.3
    r = generate(model, tokenizer, PROMPTS, max_new_tokens=5, top_p=top_p)
    tokens, mask = completion_batch(r.prompt_ids, r.completion_ids, r.mask)
    logits = np.array(model(tokens[:, :-1]).astype(mx.float32), dtype=np.float64)  # (B, T-1, V)
    targets, mask = np.array(tokens[:, 1:]), np.array(mask)
    got = np.array(r.logprobs)
    for i in range(len(PROMPTS)):
        for j, t in enumerate(np.nonzero(mask[i])[0]):
            logp = logits[i, t] - np.logaddexp.reduce(logits[i, t])
            order = np.argsort(-logp)
            before = np.cumsum(np.exp(logp[order])) - np.exp(logp[order])  # mass strictly above each token
            nucleus = order[before < top_p]
            assert targets[i, t] in nucleus
            expected = logp[targets[i, t]] - np.logaddexp.reduce(logp[nucleus])
            assert abs(got[i, j] - expected) < ATOL
    # training scores the sampled tokens under the same truncated distribution (logprobs.sampled_distribution)
    trained, _ = token_logprobs(model, tokens, 1.0, top_p=top_p)
    np.testing.assert_allclose(teacher_forced_from(np.array(trained), mask, got.shape), got, atol=ATOL)


def test_top_p_filter_matches_numpy():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    out = np.exp(np.array(top_p_filter(logprobs, 0.7)))
    np.testing.assert_allclose(out, [[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]], atol=1e-6)


class RecordingModel:
    """A model that records the rows of every call (mlx-lm's cache protocol reads its layers)."""

    def __init__(self, model):
        self.model, self.layers, self.rows = model, model.layers, []

    def __call__(self, tokens, cache=None):
        self.rows.append(tokens.shape[0])
        return self.model(tokens, cache=cache)


@pytest.mark.parametrize("model_type,prompts", [
    ("micro", PROMPTS * 3),  # left-padded prompts: PaddedKVCache with a mask
    ("llama", ["12+34=", "56+78=", "90+12="] * 8),  # no padding: the maskless fast path
    ("gemma3_text", PROMPTS * 3),  # sliding-window layers: mlx-lm's batched caches
])
def test_finished_rows_leave_the_batch_and_change_nothing(micro, model_type, prompts):
    """drop_finished: rows that reached EOS are left out of later decoding steps; every row's ids, mask and text
    are the same as decoding the whole batch to the end, and its log-probs to 1e-5."""
    model, tokenizer = micro
    if model_type != "micro":
        model = arch_model(model_type, tokenizer, **({"sliding_window": 4, "sliding_window_pattern": 2,
                                                      "query_pre_attn_scalar": 32} if model_type == "gemma3_text" else {}))
    # a third of the vocabulary is EOS, so rows stop at different steps (as in test_rows_stop_at_their_own_eos)
    tok = SimpleNamespace(pad_token_id=0, eos_token_ids=set(range(2, len(tokenizer.vocab), 3)),
                          encode=tokenizer.encode, decode=tokenizer.decode)
    mx.random.seed(3)
    keys = row_keys(len(prompts))
    runs = {}
    for drop in (True, False):
        recording = RecordingModel(model)
        runs[drop] = generate(recording, tok, prompts, 8, keys=keys, drop_finished=drop), recording.rows
    (dropped, calls), (whole, whole_calls) = runs[True], runs[False]
    assert len(set(np.array(whole.mask).sum(axis=1))) > 2  # rows stopped at different steps
    assert calls[1:] != whole_calls[1:] and min(calls[1:]) < len(prompts)  # later calls decoded fewer rows
    assert set(whole_calls[1:]) == {len(prompts)}
    assert np.array(dropped.completion_ids).tolist() == np.array(whole.completion_ids).tolist()
    np.testing.assert_array_equal(np.array(dropped.mask), np.array(whole.mask))
    np.testing.assert_allclose(np.array(dropped.logprobs), np.array(whole.logprobs), atol=ATOL)
    assert (dropped.texts, dropped.finish_reasons) == (whole.texts, whole.finish_reasons)


def test_padding_in_the_batch_changes_nothing(micro):
    """Greedy completions of each prompt alone equal those sampled inside a mixed-length batch."""
    model, tokenizer = micro
    batch = generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0)
    for i, p in enumerate(PROMPTS[:4]):
        alone = generate(model, tokenizer, [p], max_new_tokens=6, temperature=0)
        n = int(alone.mask.sum().item())
        assert np.array(alone.completion_ids)[0, :n].tolist() == np.array(batch.completion_ids)[i, :n].tolist()
        np.testing.assert_allclose(np.array(alone.logprobs)[0, :n], np.array(batch.logprobs)[i, :n], atol=ATOL)


def test_repeated_prompts_share_one_prefill_but_sample_independently(micro):
    model, tokenizer = micro
    distinct, rows = distinct_rows([[1, 5], [1, 6], [1, 5], [1, 5]])
    assert distinct == [[1, 5], [1, 6]] and rows == [0, 1, 0, 0]
    mx.random.seed(0)
    r = generate(model, tokenizer, ["12+34="] * 16, max_new_tokens=6)
    assert len({tuple(row) for row in np.array(r.completion_ids).tolist()}) > 8  # rows differ
    np.testing.assert_allclose(np.array(r.logprobs), teacher_forced(model, r), atol=ATOL)


def test_samples_follow_the_sampling_distribution(micro):
    """First tokens of 4000 rows of one prompt, each from its own key: their frequencies match
    softmax(logits / T) (a chi-square check over the tokens expected at least 10 times, the rest pooled)."""
    model, tokenizer = micro
    mx.random.seed(5)
    temperature, n = 0.5, 4000
    r = generate(model, tokenizer, ["12+34="] * n, max_new_tokens=1, temperature=temperature)
    logits = np.array(model(mx.array([tokenizer.encode("12+34=")]))[0, -1].astype(mx.float32), dtype=np.float64)
    p = np.exp(logits / temperature - np.logaddexp.reduce(logits / temperature))
    counts = np.bincount(np.array(r.completion_ids)[:, 0], minlength=len(p))
    big = n * p >= 10
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(n * p[big], n * p[~big].sum())
    chi2 = ((observed - expected) ** 2 / expected).sum()
    df = len(observed) - 1
    assert df >= 5  # enough distinct tokens for the check to mean something
    assert chi2 < df + 6 * np.sqrt(2 * df), (chi2, df)


def test_a_rows_sample_depends_on_its_key_not_on_the_rest_of_the_batch(micro):
    """Each row draws from its own key stream (sampling.row_keys): the same key gives the same completion
    alone or inside a batch, and a different key a different one."""
    model, tokenizer = micro
    prompts = ["12+34=", "56+78=", "90+12=", "34+56="] * 4  # same length: no padding, the same numbers
    mx.random.seed(0)
    keys = row_keys(len(prompts))
    assert keys.shape == (len(prompts), 2)
    batch = np.array(generate(model, tokenizer, prompts, 6, keys=keys).completion_ids)
    for i in (0, 5, 11):
        alone = np.array(generate(model, tokenizer, prompts[i : i + 1], 6, keys=keys[i : i + 1]).completion_ids)
        assert alone[0].tolist() == batch[i].tolist()
    shuffled = np.array(generate(model, tokenizer, prompts[::-1], 6, keys=keys[::-1]).completion_ids)
    assert shuffled[::-1].tolist() == batch.tolist()
    assert len({tuple(row) for row in batch[::4]}) > 1  # one prompt, four keys: not one completion


def test_a_batch_sampled_in_chunks_and_joined_is_the_whole_batch(micro):
    """GRPO's --sample-batch: chunks of rows, each with its rows' keys, joined by concat_rollouts, give the
    batch's ids, masks and texts exactly and its log-probs to 1e-5, including a chunk whose rows all stopped
    before the batch's longest (padded on joining)."""
    model, tokenizer = micro
    prompts = [p for p in ["12+34=", "5+6=", "1+2=", "sort:5391=", "x", "hello"] for _ in range(2)]
    mx.random.seed(5)
    keys = row_keys(len(prompts))
    whole = generate(model, tokenizer, prompts, 8, keys=keys)
    for size in (2, 4, 8):
        parts = [generate(model, tokenizer, prompts[i : i + size], 8, keys=keys[i : i + size])
                 for i in range(0, len(prompts), size)]
        if size == 2:
            assert min(p.completion_ids.shape[1] for p in parts) < whole.completion_ids.shape[1]  # padding is tested
        joined = concat_rollouts(parts, tokenizer.pad_token_id)
        assert np.array(joined.completion_ids).tolist() == np.array(whole.completion_ids).tolist()
        assert joined.completion_ids.dtype == mx.int32
        np.testing.assert_array_equal(np.array(joined.mask), np.array(whole.mask))
        np.testing.assert_allclose(np.array(joined.logprobs), np.array(whole.logprobs), atol=ATOL)
        assert (joined.texts, joined.finish_reasons, joined.prompt_ids) == (whole.texts, whole.finish_reasons,
                                                                             whole.prompt_ids)


def test_fixed_length_prompts_use_the_maskless_fast_path(micro):
    model, _ = micro
    cache = batch_cache(model, 10, [0, 0, 0])
    assert isinstance(cache[0], PaddedKVCache)
    assert cache[0].make_mask(1) is None and cache[0].make_mask(4) == "causal"
    assert batch_cache(model, 10, [0, 2, 1])[0].make_mask(1).shape == (3, 1, 1, 1)


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}),
    ("qwen2", {}),
    ("gemma3_text", {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 32}),
])
def test_other_architectures(micro, model_type, extra):
    _, tokenizer = micro
    model = arch_model(model_type, tokenizer, **extra)
    mx.random.seed(0)
    r = generate(model, tokenizer, PROMPTS, max_new_tokens=7)
    np.testing.assert_allclose(np.array(r.logprobs), teacher_forced(model, r), atol=ATOL)
