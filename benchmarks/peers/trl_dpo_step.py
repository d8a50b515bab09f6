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
import json
import random
import statistics
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


def addition_pairs(n, seed):
    """n {"prompt", "chosen", "rejected"} rows in mlx-rl's addition format."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        right = str(a + b).zfill(3)[::-1]
        wrong = right
        while wrong == right:
            wrong = "".join(str(rng.randrange(10)) for _ in right)
        rows.append({"prompt": f"{a:02d}+{b:02d}=", "chosen": right, "rejected": wrong})
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
    parser.add_argument("--model", required=True, help="checkpoint written by bench_dpo_step.py --save-model")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--with-reference", action="store_true", help="run the reference forward inside each step")
    args = parser.parse_args()

    torch.set_num_threads(2)
    config = DPOConfig(
        output_dir="/tmp/mlx-rl-peer-trl-dpo", per_device_train_batch_size=args.batch_size, beta=args.beta,
        loss_type="sigmoid", learning_rate=1e-4, max_steps=args.warmup + args.steps,
        precompute_ref_log_probs=not args.with_reference, use_cpu=True, bf16=False, gradient_checkpointing=False,
        save_strategy="no", report_to="none", logging_steps=10**6, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args=config,
        train_dataset=Dataset.from_list(addition_pairs(512, seed=0)),
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
