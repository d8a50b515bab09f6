"""bench_scale's shaped checkpoint: mlx_lm.load reads it back with the exact dimensions and vocabulary."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scale  # noqa: E402

TINY = {**bench_scale.MODELS["qwen3-0.6b"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300}


def test_shaped_checkpoint_loads_with_its_dimensions(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    n = bench_scale.build_checkpoint(TINY, tmp_path)
    model, tokenizer = load(str(tmp_path))
    assert model.args.hidden_size == 64 and len(model.layers) == 2
    assert model.model.embed_tokens.weight.shape == (300, 64)
    assert len(tokenizer.get_vocab()) == 300
    logits = model(mx.array([tokenizer.encode("1+2=")]))
    assert logits.shape[-1] == 300
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 300
    assert n == sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))


def test_shaped_checkpoint_config_and_tokenizer_read_by_transformers(tmp_path):
    import pytest

    transformers = pytest.importorskip("transformers", reason="transformers is not installed in this venv")
    bench_scale.build_checkpoint(TINY, tmp_path)
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == ("qwen3", 64, 2, 300)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert len(tok) == 300 and tok.decode(tok.encode("1+2=", add_special_tokens=False)) == "1+2="
