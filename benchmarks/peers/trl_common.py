"""What the TRL peer benchmarks share: the addition problems, the trainer settings, timing and the report."""

import json
import statistics
import time

import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

# The same for every peer run: CPU, float32, full fine-tune, AdamW at lr 1e-4, no checkpointing or logging.
TRAINER_SETTINGS = dict(learning_rate=1e-4, use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
                        report_to="none", logging_steps=10**6, dataloader_num_workers=0, seed=0, disable_tqdm=True)


def addition_problem(rng):
    """One (prompt, answer) in mlx-rl's addition format: "07+45=" -> "250" (the sum, units first)."""
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a:02d}+{b:02d}=", str(a + b).zfill(3)[::-1]


def load(model_dir):
    """The checkpoint bench_*_step.py --save-model wrote, as transformers loads it: (model, tokenizer)."""
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


class StepTimer(TrainerCallback):
    """Seconds of each trainer step, from step-begin to step-end."""

    def __init__(self):
        self.seconds, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def train_and_report(trainer, timer, warmup):
    """Train, then print one JSON line with the step times after the first `warmup` steps."""
    trainer.train()
    timed = timer.seconds[warmup:]
    print(json.dumps({
        "peer": f"trl {trl.__version__}, torch {torch.__version__}",
        "step_s_mean": statistics.mean(timed), "step_s_median": statistics.median(timed), "step_s_min": min(timed),
        "steps": len(timed),
    }))
