"""llama.cpp's side of bench_gguf_llamacpp.py: token ids and logits of a GGUF file, from llama-cpp-python.

Runs in a Python that has llama-cpp-python and numpy (not mlx-rl's dependencies):

    python3 -m venv /work/peers/llama
    CMAKE_BUILD_PARALLEL_LEVEL=1 /work/peers/llama/bin/pip install llama-cpp-python numpy   # builds llama.cpp

    /work/peers/llama/bin/python benchmarks/peers/llamacpp_logits.py --model M.gguf --job job.json --out out.npz

job.json: {"prompts": [text, ...], "texts": [text, ...], "speed_tokens": 32}. For each prompt,
out.npz holds ids_<i> (T,) and logits_<i> (T, V) at every position; for each text, tok_<i>,
its token ids (special tokens parsed, BOS/EOS as the model's metadata says). The last line
of stdout is a JSON summary (llama.cpp's version, greedy generation tokens/s).
"""

import argparse
import json
import time

import llama_cpp
import llama_cpp.llama_cpp as llama_c
import numpy as np
from llama_cpp import Llama

_default_model_params = llama_c.llama_model_default_params


def model_params_without_extra_buffers():
    """llama.cpp's default model parameters with use_extra_bufts off.

    Some VMs advertise AMX, and llama.cpp's AMX kernels (an "extra buffer type" for
    repacked weights) then die with SIGILL on a multi-token batch. llama-cpp-python
    0.3.36's Llama() swallows an unknown use_extra_bufts=... keyword without using it,
    so the flag has to be set in the parameters Llama() starts from.
    """
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


llama_c.llama_model_default_params = model_params_without_extra_buffers


def open_model(path, logits_all):
    return Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=2, logits_all=logits_all, verbose=False, seed=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    job = json.loads(open(args.job).read())

    llm = open_model(args.model, logits_all=True)
    arrays = {}
    for i, text in enumerate(job.get("texts", [])):
        # add_bos=True means "add the special tokens the model's metadata asks for", as llama.cpp's tools do
        arrays[f"tok_{i}"] = np.array(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), dtype=np.int64)
    for i, text in enumerate(job.get("prompts", [])):
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        arrays[f"ids_{i}"] = np.array(ids, dtype=np.int64)
        arrays[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
    np.savez(args.out, **arrays)

    summary = {"llama_cpp_python": llama_cpp.__version__}
    if job.get("speed_tokens") and job.get("prompts"):
        fast = open_model(args.model, logits_all=False)
        start = time.perf_counter()
        out = fast(job["prompts"][0], max_tokens=job["speed_tokens"], temperature=0.0)
        seconds = time.perf_counter() - start
        summary["generate_tokens"] = out["usage"]["completion_tokens"]
        summary["generate_s"] = seconds  # includes the prompt
        summary["prompt_tokens"] = out["usage"]["prompt_tokens"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
