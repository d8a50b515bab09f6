"""Tiny language models that are ordinary mlx-lm checkpoints.

A new model is an mlx-lm architecture (Qwen3 by default) built from a small
config, with a character-level tokenizer made with the `tokenizers` library and
saved as standard tokenizer files. Everything goes through `mlx_lm.load`, so the
tiny model and a real Hub model are handled by the same code, and
`mlx_lm generate --model RUN/checkpoint` works on everything we save.
"""

import json
import string
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_rl.config import MlxRlError
from mlx_rl.runs import swap_in_checkpoint, temp_dir_beside

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


def write_char_tokenizer(directory):
    """Write tokenizer.json + tokenizer_config.json for a character-level vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
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


def new_tiny_model(preset="tiny", seed=0):
    """A freshly initialised tiny model and its tokenizer: returns (model, tokenizer, config)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_char_tokenizer(tmp)
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
    """Load a checkpoint directory or hub name with mlx-lm: returns (model, tokenizer, config)."""
    from mlx_lm import load

    path = Path(name)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise MlxRlError(f"--model {name} is not an mlx-lm checkpoint directory (no config.json)")
        if not any(path.glob("model*.safetensors")):
            raise MlxRlError(f"--model {name} has no model*.safetensors weights")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise MlxRlError(f"--model {name}: no such checkpoint directory")
    try:
        model, tokenizer, config = load(str(name), adapter_path=adapter_path, return_config=True)
    except Exception as e:  # mlx-lm and the hub raise many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxRlError(f"could not load --model {name}: {first}") from None
    return model, tokenizer, config


def get_model(name, preset="tiny", seed=0):
    """`--model` if given, else a new tiny model."""
    if name:
        return load_model(name)
    return new_tiny_model(preset, seed)


def count_parameters(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def save_checkpoint(path, model, tokenizer, config, trainer_state=None, optimizer=None, extra_arrays=None,
                    extra_files=None, save_weights=True):
    """Write an mlx-lm checkpoint atomically; optionally the state needed by --resume.

    trainer_state: a JSON-able dict (step, wall_s, numpy RNG state...). With an
    optimizer, its state goes to trainer_state.safetensors. (MLX's global RNG key
    can't be set back, so chapters that sample reseed it every step from
    (seed, step) instead: see train.step_seed.)
    extra_arrays: {file name: {name: array}}, more safetensors files written in
    the same atomic swap (e.g. PPO's value_head.safetensors); a name may hold a
    folder (LoRA writes adapters/adapters.safetensors).
    extra_files: {file name: text}, more text files in the same swap (adapters/adapter_config.json).
    save_weights=False leaves the model's weights out (a LoRA run saved without fusing).
    """
    from mlx_lm.utils import save_config, save_model

    tmp = temp_dir_beside(path)
    if save_weights:
        save_model(tmp, model)
    save_config(dict(config), config_path=tmp / "config.json")
    tokenizer.save_pretrained(str(tmp))
    if trainer_state is not None:
        arrays = {}
        if optimizer is not None:
            arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
        mx.save_safetensors(str(tmp / "trainer_state.safetensors"), arrays)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    for name, arrays in (extra_arrays or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp / name), arrays)
    for name, text in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    swap_in_checkpoint(tmp, path)


def restore_trainer_state(path, optimizer):
    """Load the optimizer state saved by save_checkpoint."""
    arrays = mx.load(str(Path(path) / "trainer_state.safetensors"))
    prefix = "optimizer."
    optimizer.state = tree_unflatten([(k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix)])


def param_diff(a, b):
    """Largest absolute difference between two parameter trees (for tests and checks)."""
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    return max(mx.abs(fa[k] - fb[k]).max().item() for k in fa)



