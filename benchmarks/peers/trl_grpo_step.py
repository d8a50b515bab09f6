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
import random

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trl_common import TRAINER_SETTINGS, StepTimer, addition_problem, load, train_and_report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint written by bench_grpo_step.py --save-model")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    rng = random.Random(0)
    rows = [addition_problem(rng) for _ in range(50 * (args.warmup + args.steps) * args.prompts)]
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
        num_iterations=1, max_steps=args.warmup + args.steps, **TRAINER_SETTINGS,
    )
    model, tokenizer = load(args.model)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer, callbacks=[timer],
                          train_dataset=Dataset.from_list([{"prompt": p} for p, _ in rows]))
    train_and_report(trainer, timer, args.warmup)


if __name__ == "__main__":
    main()
