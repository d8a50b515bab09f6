"""The peer side of bench_vs_trl.py --step grpo: seconds per GRPO step in TRL (PyTorch, CPU) on the same model.

Runs in its own virtual environment with torch, transformers, trl, accelerate and datasets (not mlx-rl's
dependencies; see bench_vs_trl.py). It loads the checkpoint that `bench_grpo_step.py --save-model DIR`
wrote: the same random 1.06M-parameter Qwen3 model and character tokenizer, as a standard Hugging Face
directory. Settings as in the issue: 8 prompts x group 8 (per_device_train_batch_size counts completions), 8
new tokens, temperature 1, beta 0, one iteration per batch, full fine-tune, AdamW at lr 1e-4, two torch
threads, no gradient checkpointing. The reward is the addition task's (1 for the exact answer, plus 0.1 per
character in its right place). A step is timed from the trainer's step-begin to step-end callbacks, so it
includes generation, reward, the loss's forward and backward, and the optimizer. Prints one JSON line.

    .venv-peer/bin/python benchmarks/peers/trl_grpo_step.py --model /tmp/grpo-bench-model
"""

import argparse
import json
import random
import statistics
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def addition_rows(n, seed):
    """n (prompt, answer) pairs in mlx-rl's addition format: "07+45=" -> "250" (sum, units first)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append((f"{a:02d}+{b:02d}=", str(a + b).zfill(3)[::-1]))
    return rows


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint written by bench_grpo_step.py --save-model")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(2)
    rows = addition_rows(50 * (args.warmup + args.steps) * args.prompts, seed=0)
    answers = dict(rows)

    def reward(prompts, completions, **kwargs):  # mlx_rl.tasks.Task.reward: 1 if exact, plus 0.1 per right character
        out = []
        for prompt, completion in zip(prompts, completions):
            want, got = answers[prompt], completion.strip()
            out.append(float(got == want) + 0.1 * sum(x == y for x, y in zip(got, want)))
        return out

    config = GRPOConfig(
        output_dir="/tmp/mlx-rl-peer-trl", per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0,
        num_iterations=1, learning_rate=1e-4, max_steps=args.warmup + args.steps, use_cpu=True, bf16=False,
        gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=10**6,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), reward_funcs=reward,
        args=config, train_dataset=Dataset.from_list([{"prompt": p} for p, _ in rows]),
        processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[timer],
    )
    trainer.train()
    timed = timer.seconds[args.warmup:]
    print(json.dumps({
        "peer": f"trl {trl.__version__}, torch {torch.__version__}",
        "step_s_mean": statistics.mean(timed), "step_s_median": statistics.median(timed), "step_s_min": min(timed),
        "steps": len(timed),
    }))


if __name__ == "__main__":
    main()
