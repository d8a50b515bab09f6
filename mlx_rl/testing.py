"""Tiny local checkpoints of real mlx-lm architectures, for tests (nothing is downloaded).

`build_checkpoint(path, arch)` writes a randomly initialised model of the given
mlx-lm architecture (llama, qwen2, qwen3, gemma3_text, phi3) with a byte-level
BPE tokenizer trained here on task text and English words, a chat template
with role markers, and two EOS ids (`<eos>` and `<|end|>`, the end of a chat
turn), exactly as a Hub checkpoint is laid out. `mlx_lm.load(path)` reads it back.
With `bits=4` the linear and embedding layers are quantised the way
`mlx_lm convert -q` does it.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_rl.engine.models import save_tokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Role markers around every message; "<|end|>" closes a turn and is a second EOS id.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WORDS = (
    "the model learns what the corpus does mistakes included a reward can lift it past the plateau "
    "sort add sum carry answer question policy reference adapter rank layer token prompt completion "
    "hello world reinforcement learning from verifiable rewards on a laptop"
).split()

# Small configs: hidden 64, 2 blocks, head_dim 32, MLP 128 (multiples of the quantisation group size).
COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
              num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=10000.0)
ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=32, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=True),
    "gemma3_text": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=32,
                        query_pre_attn_scalar=32, sliding_window=512, sliding_window_pattern=2),
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], tie_word_embeddings=False),  # fused qkv_proj
}


def training_text(n=3000, seed=0):
    """Text the BPE merges are learnt from: addition and sort examples plus English words."""
    from mlx_rl.data.tasks import get_task

    rng = np.random.default_rng(seed)
    lines = []
    for name in ("addition", "sort"):
        task = get_task(name)
        for _ in range(n // 2):
            prompt, completion = task.corpus_example(rng)
            lines.append(prompt + completion)
    for _ in range(n // 4):
        lines.append(" ".join(rng.choice(WORDS, size=8)))
    return lines


def write_bpe_tokenizer(directory, vocab_size=400, seed=0):
    """Train a byte-level BPE tokenizer here and save it as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(seed=seed), trainer)
    # encode() prepends BOS, like Llama's tokenizer; the chat template writes it itself.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    save_tokenizer(tok, directory, CHAT_TEMPLATE, additional_special_tokens=SPECIALS[4:])
    return tok


def arch_config(arch, vocab_size, ids, **sizes):
    if arch not in ARCHS:
        raise ValueError(f"unknown test architecture {arch!r} (choose from {', '.join(ARCHS)})")
    return {
        **COMMON,
        **ARCHS[arch],
        **sizes,
        "vocab_size": vocab_size,
        "bos_token_id": ids["<bos>"],
        "eos_token_id": [ids["<eos>"], ids["<|end|>"]],  # several EOS ids, as in Llama 3 and Qwen3 chat models
        "pad_token_id": ids["<pad>"],
    }


def build_checkpoint(path, arch="qwen3", bits=None, group_size=32, seed=0, **sizes):
    """Write a tiny random `arch` checkpoint (optionally quantised to `bits`) to path; returns path.

    sizes: config fields to override (hidden_size=512, num_hidden_layers=8, ...) for a bigger model.
    """
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    path = Path(path)
    tok = write_bpe_tokenizer(path, seed=seed)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    config = arch_config(arch, tok.get_vocab_size(), ids, **sizes)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, group_size=group_size, bits=bits)
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    return path


def checkpoint_weights(path):
    """All weights of a checkpoint directory as {name: array} (for comparing before and after)."""
    out = {}
    for f in sorted(Path(path).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out
