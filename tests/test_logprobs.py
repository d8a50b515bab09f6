"""Teacher-forced log-probs and entropy: numpy references, padding, and where gradients go."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_rl.engine.logprobs import (
    completion_batch, masked_mean, reference_logprobs, sequence_logprobs, token_logprobs,
)
from mlx_rl.engine.models import new_tiny_model
from mlx_rl.engine.session import Reference

ATOL = 1e-5  # float32; the same sums in a different order differ by ~1e-6


@pytest.fixture(scope="module")
def micro():
    model, tokenizer, _ = new_tiny_model("micro", seed=0)
    return model, tokenizer


def a_batch(tokenizer):
    prompt_ids = [tokenizer.encode(p) for p in ["12+34=", "1+2=", "sort:5391="]]
    completion_ids = mx.array([[5, 6, 7, 2], [8, 2, 0, 0], [9, 10, 11, 12]])
    completion_mask = mx.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=mx.float32)
    return prompt_ids, completion_ids, completion_mask


def test_completion_batch_layout(micro):
    _, tokenizer = micro
    prompt_ids, completion_ids, completion_mask = a_batch(tokenizer)
    tokens, mask = completion_batch(prompt_ids, completion_ids, completion_mask)
    tokens, mask = np.array(tokens), np.array(mask)
    assert tokens.shape == (3, 11 + 4) and mask.shape == (3, 14)
    assert tokens[1, :5].tolist() == prompt_ids[1] and tokens[1, 5:7].tolist() == [8, 2]
    assert (tokens[1, 7:] == 0).all()  # right padding
    assert mask[1].tolist() == [0] * 4 + [1, 1] + [0] * 8  # targets 8 and EOS only
    assert mask.sum(axis=1).tolist() == [4, 2, 4]


def test_logprobs_and_entropy_match_numpy(micro):
    model, tokenizer = micro
    tokens, _ = completion_batch(*a_batch(tokenizer))
    for temperature in (1.0, 0.5):
        logprobs, entropy = token_logprobs(model, tokens, temperature)
        logits = np.array(model(tokens[:, :-1]), dtype=np.float64) / temperature  # (B, T-1, V)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        expected = np.take_along_axis(logp, np.array(tokens[:, 1:])[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(np.array(logprobs), expected, atol=ATOL)
        np.testing.assert_allclose(np.array(entropy), -(np.exp(logp) * logp).sum(-1), atol=ATOL)


def test_padding_changes_nothing(micro):
    """A sequence scored alone and inside a padded batch of longer and shorter rows: same numbers."""
    model, tokenizer = micro
    prompt_ids, completion_ids, completion_mask = a_batch(tokenizer)
    tokens, mask = completion_batch(prompt_ids, completion_ids, completion_mask)
    batch_lp, batch_ent = token_logprobs(model, tokens)
    batch_seq = sequence_logprobs(model, tokens, mask)
    for i in range(3):
        t1, m1 = completion_batch(prompt_ids[i : i + 1], completion_ids[i : i + 1], completion_mask[i : i + 1])
        lp1, ent1 = token_logprobs(model, t1)
        keep = np.array(mask[i]) > 0
        assert np.array(m1)[0].sum() == keep.sum()
        np.testing.assert_allclose(np.array(lp1)[0][np.array(m1)[0] > 0], np.array(batch_lp)[i][keep], atol=ATOL)
        np.testing.assert_allclose(np.array(ent1)[0][np.array(m1)[0] > 0], np.array(batch_ent)[i][keep], atol=ATOL)
        assert abs(sequence_logprobs(model, t1, m1).item() - batch_seq[i].item()) < ATOL


def test_masked_mean():
    x = mx.array([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = mx.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    np.testing.assert_allclose(np.array(masked_mean(x, mask, axis=1)), [1.5, 3.0])
    assert masked_mean(x, mx.zeros_like(mask)).item() == 0.0  # no division by zero


def test_gradients_reach_the_policy_not_the_reference(micro):
    model, tokenizer = micro
    reference = Reference(model).model  # the chapters' reference: the starting weights, frozen
    tokens, mask = completion_batch(*a_batch(tokenizer))
    ref_logprobs = reference_logprobs(reference, tokens)

    def loss_fn(policy):  # a KL-like penalty that mixes both
        logprobs, _ = token_logprobs(policy, tokens)
        return masked_mean((logprobs - ref_logprobs) ** 2 + logprobs, mask)

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    assert all(mx.abs(g).sum().item() > 0 for _, g in tree_flatten(grads))  # every policy weight gets one

    # The reference's weights get no gradient even when a loss is written in terms of them.
    assert tree_flatten(reference.trainable_parameters()) == []  # frozen: an optimizer would find nothing
    reference.unfreeze()
    ref_grads = nn.value_and_grad(reference, lambda m: masked_mean(reference_logprobs(m, tokens), mask))(reference)[1]
    assert all(mx.abs(g).sum().item() == 0 for _, g in tree_flatten(ref_grads))  # stop_gradient on its own


def test_reference_is_independent_of_policy_updates(micro):
    model, tokenizer = micro
    reference = Reference(model).model
    tokens, _ = completion_batch(*a_batch(tokenizer))
    before = np.array(reference_logprobs(reference, tokens))
    original = model.parameters()
    model.update(nn.utils.tree_map(lambda p: p * 1.5, model.parameters()))  # a policy update
    try:
        np.testing.assert_array_equal(np.array(reference_logprobs(reference, tokens)), before)
        assert np.abs(np.array(token_logprobs(model, tokens)[0]) - before).max() > 1e-3
    finally:
        model.update(original)


def grouped_batch(tokenizer, group_size=3):
    """Prompts of different lengths, each repeated group_size times (adjacent), with varied completions."""
    prompts = ["12+34=", "1+2=", "sort:5391="]
    prompt_ids = [tokenizer.encode(p) for p in prompts for _ in range(group_size)]
    rng = np.random.default_rng(0)
    completion_ids = mx.array(rng.integers(4, 60, size=(len(prompt_ids), 5)))
    completion_mask = mx.array((np.arange(5)[None, :] < rng.integers(1, 6, size=(len(prompt_ids), 1))).astype(np.float32))
    tokens, mask = completion_batch(prompt_ids, completion_ids, completion_mask)
    return tokens, mask, min(len(p) for p in prompt_ids)


@pytest.mark.parametrize("shared_len", [1, 5, 14])  # 5: the shortest prompt; 14: past it, clipped to the input
def test_shared_prefix_logprobs_and_gradients_match_the_plain_pass(micro, shared_len):
    model, tokenizer = micro
    G = 3
    tokens, mask, _ = grouped_batch(tokenizer, G)
    if shared_len == 14:  # every row of a group the same: the whole input can be shared
        tokens = mx.repeat(tokens[::G], G, axis=0)
    plain_lp, plain_ent = token_logprobs(model, tokens, 0.7)
    shared_lp, shared_ent = token_logprobs(model, tokens, 0.7, group_size=G, shared_len=shared_len)
    assert shared_lp.shape == plain_lp.shape == mask.shape
    assert np.allclose(shared_lp, plain_lp, atol=ATOL) and np.allclose(shared_ent, plain_ent, atol=ATOL)

    weights = mx.random.normal(mask.shape, key=mx.random.key(1))

    def loss(shared):
        kwargs = dict(group_size=G, shared_len=shared_len) if shared else {}
        return lambda: (token_logprobs(model, tokens, 0.7, **kwargs)[0] * weights).sum()

    plain_loss, plain_grads = nn.value_and_grad(model, loss(False))()
    shared_loss, shared_grads = mx.compile(nn.value_and_grad(model, loss(True)), inputs=model.state, outputs=model.state)()
    assert abs(plain_loss.item() - shared_loss.item()) < 1e-4
    for (name, a), (_, b) in zip(tree_flatten(plain_grads), tree_flatten(shared_grads)):
        assert np.abs(np.array(a)).max() > 0, name  # every parameter gets a gradient
        assert np.allclose(a, b, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("shared", [False, True])
def test_skipped_prompt_positions_change_nothing_the_mask_reads(micro, shared):
    """skip = S - 1 (what GRPO passes): the completion positions and the gradients of a masked loss are the full
    pass's; the skipped positions are 0. Skipping past the shared prefix (skip > S - 1) works too."""
    model, tokenizer = micro
    G = 3
    tokens, mask, shared_len = grouped_batch(tokenizer, G)
    layout = dict(group_size=G, shared_len=shared_len) if shared else {}
    plain_lp, plain_ent = token_logprobs(model, tokens, 0.7)
    for skip in (shared_len - 1, shared_len + 1):
        lp, ent = token_logprobs(model, tokens, 0.7, skip=skip, **layout)
        assert lp.shape == ent.shape == mask.shape
        assert np.allclose(lp[:, skip:], plain_lp[:, skip:], atol=ATOL)
        assert np.allclose(ent[:, skip:], plain_ent[:, skip:], atol=ATOL)
        assert not np.array(lp[:, :skip]).any() and not np.array(ent[:, :skip]).any()
    assert not np.array(mask[:, : shared_len - 1]).any()  # so GRPO's skip drops nothing the loss reads

    def loss(**kwargs):
        return lambda: masked_mean(token_logprobs(model, tokens, 0.7, **kwargs)[0], mask)

    plain_loss, plain_grads = nn.value_and_grad(model, loss())()
    skip_loss, skip_grads = nn.value_and_grad(model, loss(skip=shared_len - 1, **layout))()
    assert abs(plain_loss.item() - skip_loss.item()) < 1e-5
    for (name, a), (_, b) in zip(tree_flatten(plain_grads), tree_flatten(skip_grads)):
        assert np.allclose(a, b, atol=1e-5, rtol=1e-4), name
    ref = reference_logprobs(Reference(model).model, tokens, 0.7, skip=shared_len - 1, **layout)
    assert np.allclose(np.array(ref) * np.array(mask), np.array(plain_lp) * np.array(mask), atol=ATOL)
