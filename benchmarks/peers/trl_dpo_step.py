"""The peer side of bench_vs_trl.py --step dpo: seconds per DPO step in TRL (PyTorch, CPU) on the same model.

Runs in its own virtual environment with torch, transformers, trl, accelerate and datasets (see
bench_vs_trl.py). It loads the checkpoint that `bench_dpo_step.py --save-model DIR` wrote: the same random
1.06M-parameter Qwen3 model and character tokenizer. Settings as bench_dpo_step.py's: 8 addition pairs per step
("07+45=" -> the right sum, units first, vs random wrong digits, each ending in EOS), sigmoid DPO with beta 0.1,
full fine-tune, AdamW at lr 1e-4, two torch threads. The reference log-probs are computed once up front
(precompute_ref_log_probs), as mlx-rl does, unless --with-reference. A step is timed from the trainer's
step-begin to step-end callbacks. Prints one JSON line.

    .venv-peer/bin/python benchmarks/peers/trl_dpo_step.py --model /tmp/dpo-bench-model
"""

import argparse
import random

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trl_common import TRAINER_SETTINGS, StepTimer, addition_problem, load, train_and_report


def addition_pairs(n, seed):
    """n {"prompt", "chosen", "rejected"} rows: the right answer against random wrong digits."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, right = addition_problem(rng)
        wrong = right
        while wrong == right:
            wrong = "".join(str(rng.randrange(10)) for _ in right)
        rows.append({"prompt": prompt, "chosen": right, "rejected": wrong})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint written by bench_dpo_step.py --save-model")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--with-reference", action="store_true", help="run the reference forward inside each step")
    args = parser.parse_args()

    config = DPOConfig(
        output_dir="/tmp/mlx-rl-peer-trl-dpo", per_device_train_batch_size=args.batch_size, beta=args.beta,
        loss_type="sigmoid", max_steps=args.warmup + args.steps, precompute_ref_log_probs=not args.with_reference,
        **TRAINER_SETTINGS,
    )
    model, tokenizer = load(args.model)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[timer],
                         train_dataset=Dataset.from_list(addition_pairs(512, seed=0)))
    train_and_report(trainer, timer, args.warmup)


if __name__ == "__main__":
    main()
