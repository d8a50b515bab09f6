"""Memory and speed of one GRPO + LoRA step on models with Qwen3-0.6B's and Qwen2.5-1.5B's exact dimensions.

Speed and memory don't depend on the weights, so each model is built here with random weights: mlx-lm's own
model class from the real model's config (hidden size, blocks, heads, vocabulary of 151,936, tied embeddings),
a synthetic `tokenizers` tokenizer of the same vocabulary size (characters, then filler tokens), saved as a
standard mlx-lm checkpoint directory in a temporary folder. Nothing is downloaded.

The step is `mlx-rl grpo --lora-rank 8 --kl-coef 0.04` on prompts of --prompt-tokens tokens: --prompts x
--group-size rows, --new-tokens sampled tokens each (a random model seldom samples EOS, so every completion
is that long), one epoch, the update compiled. Each setting runs in its own process (so its peak RSS is its
own), one step after one warm-up step unless --warmup 0, in turns in the same run:

    full          logits of the whole batch at once, no checkpointing, one forward/backward (the plain pass)
    chunked       log-probs, entropies and their gradients a chunk of positions at a time (logprobs.py)
    chunked+ckpt  and --grad-checkpoint: each block's activations recomputed in the backward
    ...+micro4    and --micro-batch 4: four rows (one group) per forward/backward, gradients added up
    chunked-eager chunked, with --no-compile (not run by default): what compiling the update holds in memory

For each: seconds per phase (time/*_s), tokens per second, MLX's peak memory (`mx.get_peak_memory`, reset
after the model is loaded, so it counts the weights and everything the step allocates) and the process's
peak RSS. `uptime` before and after each goes in the JSON.

Then the same step in the peers (`--peers`), each in its own venv and process, on the same checkpoint directory
and prompts: TRL + PEFT (peers/trl_grpo_lora_step.py; `trl+ckpt` with gradient checkpointing) and mlx-lm-lora
(peers/mlxlora_grpo_step.py; `mlx-lm-lora+ckpt` with its grad_checkpoint), LoRA rank 8 on every linear layer,
beta = --kl-coef, the prompts as raw text. Their venvs are /work/peers/trl (torch CPU, transformers, trl, peft,
datasets) and /work/peers/mlxlora (mlx-lm-lora); --trl-python and --mlxlora-python point elsewhere. A peer
killed by the out-of-memory killer is recorded as such. `--models smollm2-135m` measures the real SmolLM2
checkpoint that scripts/get_smollm2.sh makes.

    nice -n 19 .venv/bin/python benchmarks/bench_scale.py --json docs/runs/scale-cpu/summary.json
    nice -n 19 .venv/bin/python benchmarks/bench_scale.py --models qwen3-0.6b --settings full,chunked --warmup 0
    nice -n 5 .venv/bin/python benchmarks/bench_scale.py --models qwen3-0.6b --settings chunked+ckpt+micro4 \
        --peers trl+ckpt,mlx-lm-lora+ckpt,trl,mlx-lm-lora --prompts 8 --new-tokens 128 --warmup 0
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from peers import peer_process  # noqa: E402

# The real models' config.json, minus what does not change the compute (ids, dtype, generation settings).
MODELS = {
    "qwen3-0.6b": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
    },
    "micro": {  # for a quick check of the benchmark itself
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
    },
}
REAL = {"smollm2-135m": "models/SmolLM2-135M-Instruct"}  # real checkpoints (scripts/get_smollm2.sh)
PEERS = {  # name: (which venv, the script in peers/, its extra flags)
    "trl": ("trl", "trl_grpo_lora_step.py", []),
    "trl+ckpt": ("trl", "trl_grpo_lora_step.py", ["--gradient-checkpointing"]),
    "mlx-lm-lora": ("mlxlora", "mlxlora_grpo_step.py", []),
    "mlx-lm-lora+ckpt": ("mlxlora", "mlxlora_grpo_step.py", ["--grad-checkpoint"]),
}
SETTINGS = {  # logits chunk (None: the default), --grad-checkpoint, --micro-batch (None: the whole batch), compiled
    "full": (0, False, None, True),
    "chunked": (None, False, None, True),
    "chunked+ckpt": (None, True, None, True),
    "chunked+ckpt+micro4": (None, True, 4, True),
    "chunked-eager": (None, False, None, False),  # --no-compile: what compiling the update costs in memory
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-0.6b,qwen2.5-1.5b")
    parser.add_argument("--settings", default="full,chunked,chunked+ckpt,chunked+ckpt+micro4",
                        help=f"mlx-rl's settings to measure, of {', '.join(SETTINGS)} (or 'none')")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kl-coef", type=float, default=0.04)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"after mlx-rl's settings, the same step in: {', '.join(PEERS)} (or 'none')")
    parser.add_argument("--trl-python", default="/work/peers/trl/bin/python")
    parser.add_argument("--mlxlora-python", default="/work/peers/mlxlora/bin/python")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # MODEL_DIR:SETTING, one measurement
    return parser.parse_args(argv)


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --- a random-weight checkpoint with a real model's dimensions --------------------------------------------------


def write_tokenizer(directory, vocab_size):
    """A character-level tokenizer (mlx-rl's own) whose vocabulary is padded with filler tokens to vocab_size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from mlx_rl.engine.models import CHARS, CHAT_TEMPLATE, SPECIALS, save_tokenizer

    tokens = SPECIALS + list(CHARS)
    tokens += [f"<f{i}>" for i in range(vocab_size - len(tokens))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    save_tokenizer(tok, directory, CHAT_TEMPLATE)


def build_checkpoint(name, directory):
    """Random weights in mlx-lm's class for MODELS[name] (or a config dict), float32, with its config and tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = {**(MODELS[name] if isinstance(name, str) else name), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    n = sum(v.size for v in weights.values())
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(directory, config["vocab_size"])
    del model, weights
    mx.clear_cache()
    return n


def write_prompts(path, prompt_tokens, rows=64):
    """Prompts of prompt_tokens tokens (BOS + characters), an answer column for the reward."""
    import numpy as np

    rng = np.random.default_rng(0)
    chars = list("0123456789")  # one token a digit in every tokenizer here (SmolLM2's splits digits one by one)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": "".join(rng.choice(chars, prompt_tokens - 1)), "answer": "7"}) + "\n")


# --- one measurement, in its own process ------------------------------------------------------------------------


def measure(model_dir, data, setting, args):
    from mlx_rl.engine import speed

    speed.enable()
    import mlx.core as mx
    import numpy as np

    import bench_grpo_step
    from mlx_rl.chapters import grpo, grpo_family
    from mlx_rl.data.rewards import load_rewards
    from mlx_rl.engine import logprobs
    from mlx_rl.engine.lora import adapter_weights
    from mlx_rl.engine.session import start

    chunk, grad_checkpoint, micro_batch, compiled = SETTINGS[setting]
    if chunk is not None:
        logprobs.LOGITS_CHUNK = chunk
    B = args.prompts * args.group_size
    out = tempfile.mkdtemp(prefix="bench-scale-")
    cfg = grpo.GRPOConfig(model=model_dir, data=data, reward=("exact",),
                          lora_rank=args.lora_rank, prompts_per_step=args.prompts, group_size=args.group_size,
                          max_new_tokens=args.new_tokens, epochs=1, kl_coef=args.kl_coef, temperature=1.0, lr=1e-5,
                          pass_k=(), micro_batch=micro_batch or B, grad_checkpoint=grad_checkpoint, compile=compiled,
                          out=str(Path(out) / "run"))
    load_s = time.perf_counter()
    session = start("grpo", cfg)
    load_s = time.perf_counter() - load_s
    rng = np.random.default_rng(0)

    def tie_breaker(prompts, completions, **columns):  # every group carries signal: every step updates
        return (1e-3 * rng.random(len(completions))).tolist()

    session.task.rewards = load_rewards([tie_breaker], [1.0])
    variant = grpo_family.make_variant(cfg, args.new_tokens, answer_len=0)
    optimizer = session.optimizer(cfg.lr, cfg.steps)
    update = session.update_step(grpo.make_loss_fn(cfg, variant), optimizer, row_multiple=cfg.group_size)
    mx.reset_peak_memory()
    step_s, phases, lengths = bench_grpo_step.timed_steps(session, cfg, variant, update, args.new_tokens,
                                                          args.warmup, 1)
    phase = {k[len("time/"):-2]: v for k, v in phases[0].items()}
    T = args.prompt_tokens + args.new_tokens
    return {
        "setting": setting, "logits_chunk": logprobs.LOGITS_CHUNK, "grad_checkpoint": grad_checkpoint, "compiled": compiled,
        "micro_batch": micro_batch or B, "rows": B, "tokens_per_row": T,
        "step_s": step_s[0], "phase_s": phase, "load_s": load_s,
        "completion_len": lengths[0],
        "step_tok_s": B * lengths[0] / step_s[0],
        "generate_tok_s": B * lengths[0] / phase["generate"],
        "train_tok_s": B * T / phase["forward_backward"],
        "reference_tok_s": B * T / phase["reference"] if "reference" in phase else None,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "trainable_parameters": sum(v.size for v in adapter_weights(session.model).values()),
    }


def run_child(model_dir, data, setting, args):
    cmd = [sys.executable, __file__, "--child", f"{model_dir}:{data}:{setting}"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in (
            "prompts", "group_size", "prompt_tokens", "new_tokens", "kl_coef", "lora_rank", "warmup")]
    before = uptime()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    after = uptime()
    if done.returncode != 0:
        return {"setting": setting, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                f"exit {done.returncode}", "uptime_before": before, "uptime_after": after}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "uptime_before": before, "uptime_after": after}


def run_peer(model_dir, data, peer, args):
    """One peer's GRPO + LoRA step on the same checkpoint and prompts, in its own venv and process."""
    from mlx_rl.engine import blas

    venv, script, extra = PEERS[peer]
    python = args.trl_python if venv == "trl" else args.mlxlora_python
    peer_args = ["--model", Path(model_dir).resolve(), "--data", Path(data).resolve(), "--steps", 1,
                 "--warmup", args.warmup, "--prompts", args.prompts, "--group-size", args.group_size,
                 "--max-new-tokens", args.new_tokens, "--lr", "1e-5", "--lora-rank", args.lora_rank,
                 "--beta", args.kl_coef, "--plain-prompts", *extra]
    before = uptime()
    r, failure = peer_process.run_peer(python, HERE / "peers" / script, peer_args,
                                    openblas=blas.find_openblas() if venv == "mlxlora" else None,
                                       cwd=HERE / "peers")
    after = uptime()
    if failure is not None:
        failure.pop("stderr", None)
        return {"setting": peer, **failure, "uptime_before": before, "uptime_after": after}
    B = args.prompts * args.group_size
    return {"setting": peer, **r, "step_s": r["step_s"][0], "rows": B, "completion_len": r["completion_len_mean"],
            "step_tok_s": B * r["completion_len_mean"] / r["step_s"][0] if r["completion_len_mean"] else None,
            "uptime_before": before, "uptime_after": after}


def save(results, path):
    """Every figure so far to the --json file (if one was given)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")


def main():
    args = parse_args()
    if args.child:
        model_dir, data, setting = args.child.rsplit(":", 2)
        print(json.dumps(measure(model_dir, data, setting, args)))
        return
    import mlx.core as mx

    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
               "mlx": mx.__version__, "models": {}}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"GRPO + LoRA rank {args.lora_rank}, {args.prompts} prompts x {args.group_size}, {args.prompt_tokens} prompt "
          f"+ {args.new_tokens} new tokens, kl_coef {args.kl_coef}, one epoch; {args.warmup} warm-up step(s)", flush=True)
    for name in args.models.split(","):
        model_dir = Path(REAL[name]) if name in REAL else workdir / name
        if name in REAL and not model_dir.exists():
            print(f"{name}: {model_dir} not found (bash scripts/get_smollm2.sh makes it); skipped", flush=True)
            continue
        if not (model_dir / "model.safetensors").exists():
            n = build_checkpoint(name, model_dir)
        else:
            n = sum(v.size for v in mx.load(str(model_dir / "model.safetensors")).values())
        data = workdir / f"{name}-prompts.jsonl"
        write_prompts(data, args.prompt_tokens)
        config = json.loads((model_dir / "config.json").read_text())
        entry = results["models"][name] = {"config": config, "parameters": n, "runs": []}
        print(f"{name}: {n / 1e6:.0f}M parameters ({n * 4 / 1e9:.2f} GB float32) in {model_dir}", flush=True)
        for setting in [x for x in args.settings.split(",") if x and x != "none"]:
            r = run_child(model_dir, data, setting, args)
            entry["runs"].append(r)
            print("  " + json.dumps(r), flush=True)  # every figure in the log too, as soon as it is measured
            if "error" in r:
                print(f"  {setting:<20} failed: {r['error']}", flush=True)
                continue
            phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["phase_s"].items(), key=lambda kv: -kv[1]))
            print(f"  {setting:<20} {r['step_s']:7.1f} s/step [{phases}]  MLX peak {r['peak_memory_gb']:.2f} GB, "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB; train {r['train_tok_s']:.0f} tok/s; {r['uptime_after']}",
                  flush=True)
        for peer in [p for p in args.peers.split(",") if p and p != "none"]:
            r = run_peer(model_dir, data, peer, args)
            entry["runs"].append(r)
            print("  " + json.dumps(r), flush=True)
            if "error" in r:
                print(f"  {peer:<20} failed: {r['error']}", flush=True)
                continue
            mlx_peak = f"MLX peak {r['peak_memory_gb']:.2f} GB, " if "peak_memory_gb" in r else ""
            print(f"  {peer:<20} {r['step_s']:7.1f} s/step, completions {r['completion_len']:.0f} tokens, {mlx_peak}"
                  f"peak RSS {r['peak_rss_gb']:.2f} GB; {r['uptime_after']}", flush=True)
            save(results, args.json)  # a peer's run takes minutes: keep each as soon as it is measured
        save(results, args.json)  # after every model: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
