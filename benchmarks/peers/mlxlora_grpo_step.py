"""The mlx-lm-lora side of bench_real_model.py: seconds per GRPO step of mlx-lm-lora's own trainer (MLX, CPU).

Runs in the mlx-lm-lora venv (mlx, mlx-lm, mlx-lm-lora; no mlx-rl). bench_real_model.py starts it with
Debian's OpenBLAS preloaded (LD_PRELOAD), as mlx-rl loads it into its own process: without it MLX's Linux
wheel multiplies matrices with a reference BLAS about 30x slower, and the comparison would be about BLAS.
(mlx-rl's other CPU-only change, a faster sigmoid for SwiGLU, is mlx-rl's own and is not given to the peer.)

It calls mlx-lm-lora's `train_grpo` (mlx_lm_lora/trainer/grpo_trainer.py, 5.10.2), its whole loop, on the
same checkpoint directory: the model loaded and given LoRA adapters by mlx-lm-lora's `from_pretrained` (mlx-lm's
LoRALinear on every linear layer of all 30 blocks, rank 8, scale 20 as mlx-rl's default, dropout 0), AdamW
(mlx-lm-lora's `--optimizer adamw`), and its GRPO at the same settings: batch_size 8 prompts x group_size 4, 32
new tokens, temperature 1, top-p 1, top-k 0 and min-p 0 (both off), beta 0 (no reference pass; ref_model=None;
bench_scale.py passes --beta 0.04, and then the checkpoint is loaded a second time as the frozen reference, as
mlx-lm-lora's train.py does for GRPO; and --plain-prompts: its prompts are raw text),
epsilon 0.2, loss "grpo" (per-sequence mean), token-level ratios, no gradient accumulation or checkpointing,
no validation, no end-of-answer token besides EOS. mlx-lm-lora's GRPO always makes one update per rollout
(its ratio is exactly 1). Its dataset rows are (prompt ids, answer ids, prompt, answer, type) tuples; the prompt
ids are the chat template applied to the user message alone, exactly as mlx-rl encodes them (mlx-lm-lora's
GRPODataset would add its own system prompt, so the rows are built here instead). The reward is chat_task.py's.

Each step is timed by mlx-lm-lora's own report at steps_per_report=1 (`iterations_per_second`: from the end
of the previous report to this one, so it includes the rollout, rewards, loss, backward, optimizer and the
step's mx.eval). Prints one JSON line.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 /work/peers/mlxlora/bin/python \
        benchmarks/peers/mlxlora_grpo_step.py --model models/SmolLM2-135M-Instruct --data examples/smollm2/addition
"""

import argparse
import contextlib
import io
import json
import resource
import statistics
import tempfile
from importlib.metadata import version

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo
from mlx_lm_lora.utils import from_pretrained

from chat_task import make_reward, read_rows


class Reports(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, train_info):
        self.reports.append(train_info)


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
    parser.add_argument("--beta", type=float, default=0.0,
                        help="KL coefficient; > 0 loads the reference model a second time, as mlx-lm-lora's CLI does")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--plain-prompts", action="store_true", help="prompts as raw text, no chat template")
    args = parser.parse_args()

    mx.random.seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # its loading messages: stdout carries only the JSON line
        model, tokenizer, _ = from_pretrained(args.model, lora_config={
            "rank": args.lora_rank, "scale": 20.0, "dropout": 0.0, "num_layers": -1})  # -1: every block
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    rows = read_rows(args.data)
    dataset = []
    for r in rows:
        if args.plain_prompts:
            ids = tokenizer.encode(r["prompt"])
        else:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        dataset.append((list(ids), tokenizer.encode(str(r["answer"])), r["prompt"], str(r["answer"]), r.get("kind")))
    ref_model = None
    if args.beta > 0:  # mlx-lm-lora's train.py, load_reference_model: the checkpoint loaded again, frozen
        from mlx_lm import load

        ref_model = load(args.model)[0].freeze()
    reward = make_reward()
    reward.__name__ = "lenient_numeric_format"

    def reward_fn(prompts, completions, answer, types=None, **kwargs):
        return reward(prompts, completions, answer)

    reward_fn.__name__ = "lenient_numeric_format"
    steps = args.warmup + args.steps
    reports = Reports()
    mx.reset_peak_memory()  # as bench_scale.py does for mlx-rl: the weights (both copies) count, loading's transients not
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        train_grpo(
            model=model, ref_model=ref_model, tokenizer=tokenizer, optimizer=optim.AdamW(learning_rate=args.lr),
            train_dataset=dataset, val_dataset=None, reward_funcs=[reward_fn],
            args=GRPOTrainingArgs(
                batch_size=args.prompts, iters=steps, group_size=args.group_size, beta=args.beta, epsilon=0.2,
                max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                grpo_loss_type="grpo", importance_sampling_level="token", steps_per_report=1,
                steps_per_eval=10**9, steps_per_save=10**9, adapter_file=f"{tmp}/adapters.safetensors",
                max_seq_length=2048, grad_checkpoint=args.grad_checkpoint, gradient_accumulation_steps=1),
            training_callback=reports, end_answer_token="",
        )
    timed = [1.0 / r["iterations_per_second"] for r in reports.reports[args.warmup:]]
    lengths = [r["train_average_generated_tokens"] for r in reports.reports[args.warmup:]]
    print(json.dumps({
        "peer": f"mlx-lm-lora {version('mlx-lm-lora')}, mlx {mx.__version__}",
        "grad_checkpoint": args.grad_checkpoint, "beta": args.beta,
        "step_s_mean": statistics.mean(timed), "step_s_median": statistics.median(timed), "step_s_min": min(timed),
        "step_s": timed, "steps": len(timed), "trainable_parameters": trainable,
        "completion_len_mean": statistics.mean(lengths), "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }))


if __name__ == "__main__":
    main()
