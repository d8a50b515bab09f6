"""The TRL side of bench_real_model.py: seconds per GRPO step with PEFT LoRA on a real checkpoint (PyTorch, CPU).

Runs in the TRL venv (torch, transformers, trl, peft; not mlx-rl's dependencies). It loads the same
checkpoint directory mlx-rl trains (SmolLM2-135M-Instruct as imported by `mlx-rl import-gguf`: a llama
safetensors checkpoint with tokenizer.json, which transformers reads as LlamaForCausalLM), in float32, and
trains PEFT LoRA adapters of rank 8 on every linear layer of the blocks (`target_modules="all-linear"`, which
leaves out the tied output layer: the same 210 layers as mlx-rl's), alpha = 20 x rank (mlx-lm's scale 20),
dropout 0. Settings as bench_real_model.py's: 8 prompts x group 4 (per_device_train_batch_size counts
completions), 32 new tokens, temperature 1, top-p 1, no top-k, beta 0 (no reference model), one iteration per
batch, loss_type "grpo" (per-sequence mean, as mlx-rl's), clip 0.2, AdamW, gradient clipping at 1.0 (the
Trainer's default, as mlx-rl's), two torch threads, gradient checkpointing only with --gradient-checkpointing.
bench_scale.py also passes --beta 0.04 (with PEFT, TRL's reference is the same model with its adapters switched
off: no second copy) and --plain-prompts (its prompts are raw text). The prompts are otherwise the chat task's
train rows as chat messages, so TRL applies the same chat template (the same token ids: checked by
bench_real_model.py's notes). A step is timed from the trainer's step-begin to step-end callbacks:
generation, reward, the loss's forward and backward, the optimizer. Prints one JSON line.

    /work/peers/trl/bin/python benchmarks/peers/trl_grpo_lora_step.py --model models/SmolLM2-135M-Instruct \
        --data examples/smollm2/addition
"""

import argparse
import json
import resource
import statistics
import time

import torch
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from chat_task import make_reward, read_rows


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a folder with train.jsonl (prompt, answer rows)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0: the adapters-off reference pass)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--plain-prompts", action="store_true", help="prompts as raw text, no chat template")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rows = read_rows(args.data)
    dataset = Dataset.from_list([{"prompt": r["prompt"] if args.plain_prompts else [{"role": "user", "content": r["prompt"]}],
                                  "answer": r["answer"]} for r in rows])
    config = GRPOConfig(
        output_dir="/tmp/mlx-rl-peer-trl-lora", per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, beta=args.beta, num_iterations=1, loss_type="grpo", epsilon=0.2, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, max_grad_norm=1.0, use_cpu=True, bf16=False, gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no", report_to="none", logging_steps=1, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=args.lora_rank, lora_alpha=20 * args.lora_rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    reward = make_reward()
    reward.__name__ = "lenient_numeric_format"
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer, callbacks=[timer],
                          train_dataset=dataset, peft_config=lora)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    timed = timer.seconds[args.warmup:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    print(json.dumps({
        "peer": f"trl {trl.__version__} + peft, torch {torch.__version__}",
        "gradient_checkpointing": args.gradient_checkpointing, "beta": args.beta,
        "step_s_mean": statistics.mean(timed), "step_s_median": statistics.median(timed), "step_s_min": min(timed),
        "step_s": timed, "steps": len(timed), "trainable_parameters": trainable,
        "completion_len_mean": statistics.mean(lengths[args.warmup:]) if len(lengths) > args.warmup else None,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }))


if __name__ == "__main__":
    main()
