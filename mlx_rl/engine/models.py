"""Tiny language models that are ordinary mlx-lm checkpoints.

A new model is an mlx-lm architecture (Qwen3 by default) built from a small
config, with a character-level tokenizer made with the `tokenizers` library and
saved as standard tokenizer files. Everything goes through `mlx_lm.load`, so the
tiny model and a real Hub model are handled by the same code, and
`mlx_lm generate --model RUN/checkpoint` works on everything we save.
"""

import json
import string
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_rl.config import MlxRlError

# Sizes of the Qwen3-style model. "tiny" (about 1M parameters) is the default.
PRESETS = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32, intermediate_size=256),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=32, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=1024),
}

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
# The template prepends BOS, exactly as tokenizer.encode(prompt) does, so a chat-templated
# prompt and a raw one give the model the same tokens.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def write_char_tokenizer(directory, extra_chars=""):
    """Write tokenizer.json + tokenizer_config.json for a character-level vocabulary.

    The vocabulary is printable ASCII plus every character of `extra_chars` (a
    task's data), so a task with new characters (accents, arrows, CJK) just works.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = list(CHARS) + sorted(set(extra_chars) - set(CHARS))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char is a token
    tok.decoder = decoders.Fuse()  # join tokens with no spaces in between
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    save_tokenizer(tok, directory, CHAT_TEMPLATE)
    return len(vocab)


def save_tokenizer(tok, directory, chat_template, **extra_config):
    """Save a `tokenizers.Tokenizer` as tokenizer.json + tokenizer_config.json (what mlx_lm.load reads).

    The special tokens are <bos>, <eos>, <pad> and <unk>; extra_config adds keys.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        **extra_config,
        "chat_template": chat_template,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tiny_config(preset="tiny", vocab_size=None):
    if preset not in PRESETS:
        raise MlxRlError(f"unknown model preset '{preset}' (choose from {', '.join(PRESETS)})")
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        **PRESETS[preset],
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def new_tiny_model(preset="tiny", seed=0, extra_chars=""):
    """A freshly initialised tiny model and its tokenizer: returns (model, tokenizer, config)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_char_tokenizer(tmp, extra_chars)
        config = tiny_config(preset, vocab_size)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        from mlx_lm.utils import _get_classes, load_tokenizer

        model_class, args_class = _get_classes(config)
        mx.random.seed(seed)
        model = model_class(args_class.from_dict(config))
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(Path(tmp), eos_token_ids=config["eos_token_id"])
    return model, tokenizer, config


def load_model(name, adapter_path=None):
    """Load a checkpoint directory or hub name with mlx-lm: returns (model, tokenizer, config).

    Every way a checkpoint can be unusable is one line naming it: not a directory,
    no weights, no tokenizer files, a tokenizer with more ids than the model has
    embeddings. A quantized model on MLX's CPU backend gets a one-time warning.
    """
    from mlx_lm import load

    path = Path(name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise MlxRlError(f"--model {name} is not an mlx-lm checkpoint directory (no config.json)")
        if not any(path.glob("model*.safetensors")):
            raise MlxRlError(f"--model {name} has no model*.safetensors weights")
        if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")):
            raise MlxRlError(f"--model {name} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise MlxRlError(f"--model {name}: no such checkpoint directory")
    try:
        model, tokenizer, config = load(str(name), adapter_path=adapter_path, return_config=True)
    except Exception as e:  # mlx-lm and the hub raise many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxRlError(f"could not load --model {name}: {first}") from None
    check_vocabulary(name, model, tokenizer)
    warn_if_quantized_on_cpu(name, model)
    return model, tokenizer, config


def check_vocabulary(name, model, tokenizer):
    """Token ids past the embedding table would index garbage (MLX does not bounds-check a gather)."""
    embed = model.model.embed_tokens if hasattr(model, "model") and hasattr(model.model, "embed_tokens") else None
    if embed is None:
        return
    rows = embed.weight.shape[0]
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= rows:
        raise MlxRlError(f"--model {name}: its tokenizer has ids up to {largest} but the model has only {rows} "
                         "token embeddings (tokenizer and weights don't belong together)")


_warned_quantized = False


def warn_if_quantized_on_cpu(name, model):
    global _warned_quantized
    import mlx.core as mx
    import mlx.nn as nn

    if _warned_quantized or mx.default_device() != mx.cpu:
        return
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        _warned_quantized = True
        print(f"note: {name} is quantized; on MLX's CPU backend quantized matmuls are far slower than dense "
              "float32 (a 64-token forward of a 135M model on a 2-core machine: 4.3 s dense, 39 s 4-bit; "
              "docs/runs/quantized-cpu-forward). Use a dense copy "
              "(`mlx-rl import-gguf FILE --dequantize`, or `mlx_lm convert --dtype float32` without -q).",
              file=sys.stderr)


def get_model(name, preset="tiny", seed=0, extra_chars=""):
    """`--model` if given, else a new tiny model (its vocabulary covers extra_chars)."""
    if name:
        return load_model(name)
    return new_tiny_model(preset, seed, extra_chars)


def count_parameters(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def param_diff(a, b):
    """Largest absolute difference between two parameter trees (for tests and checks)."""
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    return max(mx.abs(fa[k] - fb[k]).max().item() for k in fa)



