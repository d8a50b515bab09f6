"""`mlx-rl import-gguf`: turn a GGUF file (llama.cpp's format) into an mlx-lm checkpoint.

A GGUF file holds everything a model needs in one place: hyperparameters and
the tokenizer as key/value metadata, then the tensors, often quantized in
32-value blocks. `mx.load(path, return_metadata=True)` already reads it, so the
import is mostly bookkeeping. Four things differ from an mlx-lm (Hugging Face
layout) checkpoint, and each has its own function below:

1. Names. llama.cpp calls `model.layers.3.self_attn.q_proj` `blk.3.attn_q`
   (`hf_name`).
2. Rotary layout. For the llama architecture llama.cpp's converter permutes the
   rows of every head of W_q and W_k so that its RoPE can rotate neighbouring
   pairs (x0, x1), (x2, x3), ... instead of the two halves of the head.
   mlx-lm rotates halves, so we undo the permutation (`unpermute`). Skip this
   and the model still runs, but writes garbage. qwen2/qwen3 files are not
   permuted (llama.cpp runs them with the half-rotating "NeoX" RoPE).
3. Quantization. MLX reads Q4_0, Q4_1 and Q8_0 blocks as its own affine
   quantization, a (weight, scales, biases) triple with group size 32:
   w = scale * q + bias. We keep the triples or dequantize them (`convert_tensor`).
   Other block types (the K-quants, IQ*) cannot be read, and we say so.
4. The tokenizer is a token list in the metadata, not a tokenizer.json. We
   rebuild it with the `tokenizers` library (`gguf_tokenizer`): byte-level BPE
   from tokens + merges ("gpt2" files, SmolLM2, Llama 3, Qwen), or a
   SentencePiece-style BPE from tokens + scores ("llama" files, what
   `mlx_lm.gguf.convert_to_gguf` writes).

Quantized or dense? On MLX's CPU backend (Linux) a quantized matmul is several
to hundreds of times slower than a dense float32 one (docs/gguf-notes.md has
the figures), so with no GPU the default is to dequantize to float32. With a GPU
(Metal on macOS) the default keeps the quantized blocks: smaller and fast there.
`--dequantize` / `--keep-quantized` override the default.

Deliberate simplifications: little-endian GGUF v2/v3 only; architectures llama
(Llama 1/2/3 without Llama-3.1 RoPE scaling, SmolLM, Mistral 7B), qwen2 and
qwen3; no vision towers or MoE layers.
"""

import json
import os
import shutil
import struct
import time
from pathlib import Path

import click
import mlx.core as mx

from mlx_rl.config import MlxRlError

# ---------------------------------------------------------------------------
# Reading the header
# ---------------------------------------------------------------------------

# ggml tensor type ids (ggml.h) -> names, for error messages.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
FLOAT_TYPES = {"F32", "F16", "BF16"}
# Block types MLX loads as affine (weight, scales, biases) triples: type -> bits (group size 32).
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GROUP_SIZE = 32

# GGUF metadata value types with a fixed size (struct format); 8 is a string, 9 an array.
VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def _read(f, fmt):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)[0]


def _skip_string(f):
    f.seek(_read(f, "Q"), 1)


def _skip_value(f, value_type):
    if value_type in VALUE_FORMATS:
        f.seek(struct.calcsize(VALUE_FORMATS[value_type]), 1)
    elif value_type == STRING:
        _skip_string(f)
    elif value_type == ARRAY:
        item_type, count = _read(f, "I"), _read(f, "Q")
        if item_type in VALUE_FORMATS:
            f.seek(count * struct.calcsize(VALUE_FORMATS[item_type]), 1)
        else:  # strings (the vocabulary) or nested arrays: one at a time
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        raise ValueError(f"unknown metadata value type {value_type}")


def read_tensor_types(path):
    """{tensor name: ggml type name}, read from the GGUF header.

    mx.load reads the whole file, but it refuses all of it over one tensor type it
    cannot read, without saying which, so we walk the header first: magic, version,
    counts, the metadata (skipped), then one (name, dims, type, offset) per tensor.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MlxRlError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        try:
            version = _read(f, "I")
            if version not in (2, 3):
                raise MlxRlError(f"{path}: GGUF version {version} is not supported (only versions 2 and 3)")
            n_tensors, n_metadata = _read(f, "Q"), _read(f, "Q")
            for _ in range(n_metadata):
                _skip_string(f)  # the key
                _skip_value(f, _read(f, "I"))
            types = {}
            for _ in range(n_tensors):
                name = f.read(_read(f, "Q")).decode("utf-8")
                f.seek(8 * _read(f, "I"), 1)  # the dimensions
                type_id = _read(f, "I")
                f.seek(8, 1)  # the data offset
                types[name] = GGML_TYPES.get(type_id, f"type {type_id}")
        except (EOFError, ValueError, UnicodeDecodeError):
            raise MlxRlError(f"{path}: the GGUF header is truncated or corrupt") from None
    return types


def check_gguf(path):
    """{tensor name: ggml type} of the GGUF file at path, or a one-line error if we can't read it."""
    path = Path(path)
    if not path.exists():
        raise MlxRlError(f"no such file: {path}")
    if not path.is_file():
        raise MlxRlError(f"{path} is not a file")
    types = read_tensor_types(path)
    unreadable = {name: t for name, t in types.items() if t not in FLOAT_TYPES and t not in QUANT_BITS}
    if unreadable:
        name, t = next(iter(unreadable.items()))
        kinds = ", ".join(sorted(set(unreadable.values())))
        raise MlxRlError(
            f"{path.name}: tensor {name} has type {t} ({len(unreadable)} tensors of type {kinds}); this importer "
            f"reads F32, F16, BF16, Q4_0, Q4_1 and Q8_0 only (convert the model to one of those with llama.cpp)"
        )
    return types


def load_gguf(path):
    """(tensors, metadata) of a checked GGUF file, read by MLX."""
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError("[load_gguf] ..."): keep its first line
        raise MlxRlError(f"could not read {path}: {str(e).splitlines()[0]}") from None


def meta_value(metadata, key, default=KeyError):
    """A metadata value as plain Python: mx scalars -> int/float/bool, mx vectors -> lists."""
    if key not in metadata:
        if default is KeyError:
            raise MlxRlError(f"this GGUF file has no '{key}' in its metadata")
        return default
    v = metadata[key]
    if isinstance(v, mx.array):
        if v.ndim > 0:
            return v.tolist()
        v = v.item()
        # float32 values read back as 9.999999747378752e-06: keep the digits float32 holds
        return float(f"{v:.7g}") if isinstance(v, float) else v
    return v


# ---------------------------------------------------------------------------
# The model: config and weights
# ---------------------------------------------------------------------------

# GGUF architecture key -> mlx-lm model type and whether W_q / W_k rows were permuted for llama.cpp's RoPE.
ARCHITECTURES = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], permuted_qk=True),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], permuted_qk=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], permuted_qk=False),
}

# Names inside a block: llama.cpp -> mlx-lm (Hugging Face).
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(module):
    """'blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj' (None for a name we don't know)."""
    if module in TOP_NAMES:
        return TOP_NAMES[module]
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    return None


def model_config(metadata, tensors):
    """config.json for mlx-lm from the GGUF hyperparameters."""
    arch = meta_value(metadata, "general.architecture")
    if arch not in ARCHITECTURES:
        raise MlxRlError(f"unsupported architecture '{arch}' (this importer reads {', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in tensors:
        raise MlxRlError(f"this {arch} file has Llama-3.1-style RoPE frequency factors (rope_freqs), "
                         "which this importer does not convert yet")
    hp = lambda key, default=KeyError: meta_value(metadata, f"{arch}.{key}", default)  # noqa: E731
    heads = hp("attention.head_count")
    if isinstance(heads, list):
        raise MlxRlError(f"this {arch} file has a different head count per layer, which mlx-lm's {arch} cannot hold")
    hidden = hp("embedding_length")
    head_dim = hp("attention.key_length", hidden // heads)
    rope_dim = hp("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise MlxRlError(f"this file rotates {rope_dim} of {head_dim} dimensions per head (partial RoPE), "
                         f"which mlx-lm's {arch} cannot do")
    if "token_embd.weight" not in tensors:
        raise MlxRlError("this GGUF file has no token embedding (token_embd.weight): is it a model file?")
    vocab_size, _ = tensors["token_embd.weight"].shape  # (V, D) also when packed
    config = {
        "model_type": ARCHITECTURES[arch]["model_type"],
        "architectures": ARCHITECTURES[arch]["architectures"],
        "hidden_size": hidden,
        "num_hidden_layers": hp("block_count"),
        "intermediate_size": hp("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": hp("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": hp("attention.layer_norm_rms_epsilon"),
        "rope_theta": hp("rope.freq_base", 10000.0),
        "max_position_embeddings": hp("context_length", 4096),
        "vocab_size": vocab_size,
        # No output matrix: the output layer reuses the token embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":  # a few llama-family models have biases; mlx-lm's llama builds them when told
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    scaling = hp("rope.scaling.type", None)
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": hp("rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise MlxRlError(f"this file uses '{scaling}' RoPE scaling, which this importer does not convert")
    return config


def unpermute(w, n_heads):
    """Undo llama.cpp's per-head row permutation of W_q / W_k (or of their biases or quantization scales).

    llama.cpp's converter (and mlx_lm.gguf.permute_weights) views each head's rows
    as (2, half) -- the two halves that rotate together in mlx-lm -- and stores them
    transposed, as (half, 2), so rotated pairs sit side by side. The inverse views
    the stored rows as (half, 2) and transposes back. (Applying the forward
    permutation twice is not the identity.)
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (rows, ...)


def convert_tensor(parts, ggml_type, dequantize, dtype):
    """One module's GGUF tensors -> {suffix: array}, quantization {group_size, bits} or None.

    parts: what mx.load gave for this module: {"weight"} (+ "bias") for float
    tensors, {"weight", "scales", "biases"} for a Q4_0/Q4_1/Q8_0 one.
    """
    if "scales" not in parts:
        return {k: v.astype(dtype) for k, v in parts.items()}, None
    bits = QUANT_BITS[ggml_type]
    # The file's scales and offsets are float16. Dequantizing in float16 rounds
    # every weight (errors around 1e-3); in float32 it is exact.
    scales, biases = parts["scales"].astype(mx.float32), parts["biases"].astype(mx.float32)
    if dequantize:
        w = mx.dequantize(parts["weight"], scales, biases, group_size=GROUP_SIZE, bits=bits)  # (out, in)
        return {"weight": w.astype(dtype)}, None
    # Keep the packed weight; its scales and offsets take the checkpoint's dtype, so the
    # quantized matmul runs in that dtype (float16 ones are very slow on MLX's CPU backend).
    return ({"weight": parts["weight"], "scales": scales.astype(dtype), "biases": biases.astype(dtype)},
            {"group_size": GROUP_SIZE, "bits": bits})


def group_by_module(tensors):
    """{'blk.0.attn_q.weight': w, 'blk.0.attn_q.scales': s, ...} -> {'blk.0.attn_q': {'weight': w, 'scales': s}}."""
    modules = {}
    for name, value in tensors.items():
        module, _, suffix = name.rpartition(".")
        modules.setdefault(module, {})[suffix] = value
    return modules


def convert_weights(tensors, types, config, permuted_qk, dequantize, dtype, progress):
    """Yield (hf name, array) for every weight, and fill config["quantization"] for kept blocks."""
    modules = group_by_module(tensors)
    unknown = [m for m in modules if hf_name(m) is None]
    if unknown:
        raise MlxRlError(f"unexpected tensor '{unknown[0]}' for a {config['model_type']} model "
                         f"({len(unknown)} tensors with names this importer does not know)")
    quantized = {}
    for i, (module, parts) in enumerate(modules.items()):
        ggml_type = types.get(f"{module}.weight", "F32")
        arrays, quant = convert_tensor(parts, ggml_type, dequantize, dtype)
        if permuted_qk and module.endswith((".attn_q", ".attn_k")):
            heads = config["num_attention_heads"] if module.endswith(".attn_q") else config["num_key_value_heads"]
            arrays = {k: unpermute(v, heads) for k, v in arrays.items()}
        name = hf_name(module)
        if quant:
            quantized[name] = quant
        for suffix, array in arrays.items():
            yield f"{name}.{suffix}", array
        progress(i + 1, len(modules))
    if quantized:
        # The most common setting is the default; layers that differ (Q8_0 embeddings in
        # a Q4 file) get their own entry, which mlx-lm's loader looks up by module path.
        settings = [json.dumps(q, sort_keys=True) for q in quantized.values()]
        default = json.loads(max(set(settings), key=settings.count))
        config["quantization"] = {**default, **{n: q for n, q in quantized.items() if q != default}}
        config["quantization_config"] = config["quantization"]  # both keys, as mlx_lm.utils.save_config writes


def save_weights(out, weights, shard_bytes=2 << 30):
    """Write (name, array) pairs as model.safetensors (or shards of at most shard_bytes) + the index.

    The arrays arrive one at a time and each shard is written as soon as it is
    full, so a large model never has to be dense in memory all at once.
    Returns the total size in bytes.
    """
    shard, shard_size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        name = f"shard-{len(files):05d}.safetensors"
        mx.save_safetensors(str(out / name), shard, metadata={"format": "mlx"})
        files.append(name)
        weight_map.update({k: name for k in shard})

    for name, array in weights:
        mx.eval(array)
        if shard and shard_size + array.nbytes > shard_bytes:
            flush()
            shard, shard_size = {}, 0
        shard[name] = array
        shard_size += array.nbytes
        total += array.nbytes
    flush()
    # Final names, now that the number of shards is known.
    n = len(files)
    final = {f: "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    for f, name in final.items():
        (out / f).rename(out / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    return total


# ---------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of llama.cpp's pre-tokenizer types (tokenizer.ggml.pre), for byte-level BPE.
# "smollm" and "gpt-2" use the GPT-2 split that tokenizers' ByteLevel pre-tokenizer has built in.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": "gpt2",
    "smollm": "digits+gpt2",  # every digit on its own, then the GPT-2 split
    "starcoder": "digits+gpt2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
}


def byte_level_pre_tokenizer(pre):
    from tokenizers import Regex, pre_tokenizers

    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise MlxRlError(f"unsupported tokenizer pre-tokenizer type '{pre}' "
                         f"(this importer knows {', '.join(sorted(PRE_TOKENIZERS))})")
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        return gpt2
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT), behavior="isolated")
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def byte_level_bpe(metadata, tokens):
    """The "gpt2" tokenizer model: a byte-level BPE, its merges stored as 'a b' strings."""
    from tokenizers import Tokenizer, decoders, models

    merges = [tuple(m.split(" ")) for m in meta_value(metadata, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise MlxRlError("this GGUF file's tokenizer merges are not 'left right' pairs")
    pre = meta_value(metadata, "tokenizer.ggml.pre", "gpt-2")
    kind = PRE_TOKENIZERS.get(pre)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a few vocabularies repeat a token; the first id wins
    # Llama 3 (like llama.cpp for it) takes a whole pre-token that is in the vocabulary as it is.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=kind == "llama3"))
    tok.pre_tokenizer = byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok, kind == "llama3"


def spm_merges(tokens, scores, token_types):
    """BPE merges rebuilt from a SentencePiece-style vocabulary: every way to split a token in two known tokens.

    llama.cpp's SentencePiece tokenizer repeatedly merges the neighbouring pair whose
    concatenation is the highest-scoring token. A BPE whose merges are ranked by the
    merged token's score does the same. mlx-lm's GGUF exporter gives every token the
    same score (-1000), so ties are broken by id: BPE vocabularies are numbered in
    merge order, which is what makes the original ids come back.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = sorted((i for i, t in enumerate(token_types) if t == NORMAL), key=lambda i: (-scores[i], i))
    merges = []
    for i in ranked:
        piece = tokens[i]
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def sentencepiece_bpe(metadata, tokens, token_types):
    """The "llama" tokenizer model: SentencePiece pieces with scores, '▁' for a space, <0xNN> byte pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta_value(metadata, "tokenizer.ggml.scores", None) or [0.0] * len(tokens)
    unk_id = meta_value(metadata, "tokenizer.ggml.unknown_token_id", None)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    model = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, token_types), byte_fallback=True,
                       fuse_unk=True, unk_token=tokens[unk_id] if unk_id is not None else None)
    tok = Tokenizer(model)
    space_prefix = meta_value(metadata, "tokenizer.ggml.add_space_prefix", True)
    # No pre-splitting: the whole text is one piece with spaces as '▁', as in SentencePiece.
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    # This decoder is what mlx-lm recognises for its streaming SentencePiece detokenizer.
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def gguf_tokenizer(metadata):
    """(tokenizers.Tokenizer, tokenizer_config dict, eos ids, bos id) from the GGUF metadata."""
    from tokenizers import AddedToken, processors

    model = meta_value(metadata, "tokenizer.ggml.model", None)
    if model is None:
        raise MlxRlError("this GGUF file has no tokenizer (no tokenizer.ggml.model in its metadata)")
    tokens = meta_value(metadata, "tokenizer.ggml.tokens")
    token_types = meta_value(metadata, "tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens)
    if model == "gpt2":
        tok, llama3 = byte_level_bpe(metadata, tokens)
        add_bos_default = llama3
    elif model == "llama":
        tok = sentencepiece_bpe(metadata, tokens, token_types)
        add_bos_default = True
    else:
        raise MlxRlError(f"unsupported tokenizer model '{model}' (this importer reads 'gpt2' byte-level BPE "
                         "and 'llama' SentencePiece vocabularies)")

    # Control tokens (<|im_end|>, <s>) are special: matched whole in text, skipped when decoding.
    # User-defined ones are matched whole too, but decoded as text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, token_types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, token_types) if k == USER_DEFINED])

    ids = {role: meta_value(metadata, f"tokenizer.ggml.{key}_token_id", None)
           for role, key in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"),
                             ("eot", "eot"), ("eom", "eom")]}
    bos, eos = ids["bos"], ids["eos"]
    add_bos = meta_value(metadata, "tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
    add_eos = meta_value(metadata, "tokenizer.ggml.add_eos_token", False) and eos is not None
    if add_bos or add_eos:  # encode() adds <bos> / <eos> itself, as llama.cpp's tokenize does
        added = ([bos] if add_bos else []) + ([eos] if add_eos else [])
        single = ([tokens[bos]] if add_bos else []) + ["$A"] + ([tokens[eos]] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), special_tokens=[(tokens[i], i) for i in dict.fromkeys(added)])

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(add_bos), "add_eos_token": bool(add_eos)}
    for role in ("bos", "eos", "unk", "pad"):
        if ids[role] is not None and ids[role] < len(tokens):
            config[f"{role}_token"] = tokens[ids[role]]
    template = meta_value(metadata, "tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    # Generation stops at the end-of-sequence token and, for chat models that have
    # them, at end-of-turn / end-of-message tokens.
    eos_ids = list(dict.fromkeys(i for i in (eos, ids["eot"], ids["eom"]) if i is not None))
    return tok, config, eos_ids, bos


# ---------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def has_gpu():
    """True when MLX runs on a GPU (Metal on macOS, or CUDA), where quantized matmuls are fast."""
    return mx.default_device().type == mx.DeviceType.gpu


def import_gguf(path, out, dequantize=None, dtype=None, log=print):
    """Convert the GGUF file at path into an mlx-lm checkpoint directory out; returns a summary dict.

    dequantize: None picks by device (dense on CPU, quantized on a GPU).
    dtype: name in DTYPES for dense weights, norms and quantization scales;
    None means float32 on CPU and float16 on a GPU.
    """
    start = time.perf_counter()
    path, out = Path(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MlxRlError(f"--out {out} already exists and is not empty")
    if dtype is not None and dtype not in DTYPES:
        raise MlxRlError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")

    types = check_gguf(path)
    log(f"reading {path} ({path.stat().st_size / 1e6:.1f} MB) ...")
    tensors, metadata = load_gguf(path)
    config = model_config(metadata, tensors)
    arch = meta_value(metadata, "general.architecture")
    tokenizer, tokenizer_config, eos_ids, bos = gguf_tokenizer(metadata)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    config.update({"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids, "bos_token_id": bos})

    quant_types = sorted({t for t in types.values() if t in QUANT_BITS})
    if dequantize is None:
        dequantize = bool(quant_types) and not has_gpu()
        if dequantize:
            log(f"MLX runs on the CPU here, where quantized matmuls are much slower than dense float32 ones: "
                f"dequantizing {'/'.join(quant_types)} (pass --keep-quantized to keep the blocks)")
    dtype = dtype or ("float16" if has_gpu() else "float32")
    kept = quant_types if not dequantize else []
    log(f"{arch} model: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"vocab {config['vocab_size']}; tensors {'/'.join(sorted(set(types.values())))} -> "
        f"{dtype}{' + ' + '/'.join(kept) + ' kept' if kept else ''}")

    last = [0.0]

    def progress(done, total):
        if done == total or time.perf_counter() - last[0] > 2:
            last[0] = time.perf_counter()
            log(f"  converted {done}/{total} tensors")

    # Build the checkpoint beside --out and move it into place at the end, so a failed
    # import never leaves a half-written checkpoint under the name the user asked for.
    tmp = out.parent / f".{out.name}.import-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier import's, if one had this process id and was killed
        tmp.mkdir()
        weights = convert_weights(tensors, types, config, ARCHITECTURES[arch]["permuted_qk"],
                                  dequantize, DTYPES[dtype], progress)
        size = save_weights(tmp, weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        check_checkpoint(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError as e:  # disk full, no permission...
        raise MlxRlError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    seconds = time.perf_counter() - start
    log(f"wrote {out} ({size / 1e6:.0f} MB of weights) in {seconds:.1f} s")
    return {"out": str(out), "bytes": size, "seconds": seconds, "dequantized": dequantize, "dtype": dtype,
            "quantization": config.get("quantization")}


def check_checkpoint(path):
    """Build the mlx-lm model from config.json and load the weights strictly (lazily: nothing is computed)."""
    from mlx_lm.utils import load_model

    try:
        load_model(Path(path), lazy=True, strict=True)
    except Exception as e:  # a name or shape that mlx-lm's model does not have
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxRlError(f"the converted weights do not fit mlx-lm's model: {first}") from None


@click.command("import-gguf", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("file")
@click.option("--out", required=True, metavar="DIR", help="where to write: the checkpoint directory to create (must not exist, or be empty)")
@click.option("--dequantize/--keep-quantized", default=None,
              help="store Q4_0/Q4_1/Q8_0 tensors as dense weights, or keep them as MLX quantized blocks "
                   "(default: dense when MLX runs on the CPU, where quantized matmuls are slow; kept on a GPU)")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="dtype of dense weights, norms and quantization scales (default: float32 on CPU, float16 on a GPU)")
def cli(file, out, dequantize, dtype):
    """Convert a GGUF file (llama.cpp's format) into an mlx-lm checkpoint directory.

    Reads llama (Llama, SmolLM, Mistral), qwen2 and qwen3 files with F32/F16/BF16,
    Q4_0, Q4_1 and Q8_0 tensors. The result loads with `mlx_lm.load(DIR)` and runs
    with `mlx_lm generate --model DIR`.
    """
    import_gguf(file, out, dequantize=dequantize, dtype=dtype, log=lambda s: click.echo(s, err=True))
