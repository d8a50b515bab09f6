"""Chapter "Pretraining": train a tiny language model from scratch on a laptop.

What it teaches: a language model is trained by imitation (next-token
cross-entropy on a corpus), and it learns whatever the corpus does, mistakes
included. The task corpora here carry a systematic mistake (addition forgets
most carries), so the model's greedy accuracy settles on a plateau that more
imitation cannot lift. The RL chapters start from this checkpoint and use a
reward to get past it.

Deliberate simplifications: the corpus is generated on the fly (no data set),
the loss covers the answer tokens only (the prompts are random operands with
nothing to learn), a constant learning rate after a short warm-up.

The model is an ordinary mlx-lm checkpoint: `mlx_lm generate --model RUN/checkpoint --prompt 07+45=`.
"""

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from mlx_rl import train
from mlx_rl.config import command, option
from mlx_rl.logprobs import completion_batch
from mlx_rl.plots import plot_run
from mlx_rl.rollout import encode_prompts
from mlx_rl.runs import PhaseTimer, Progress


@dataclasses.dataclass
class PretrainConfig(train.LLMConfig):
    steps: int = option(3000, "number of training steps", min=1)
    batch_size: int = option(32, "corpus examples per step", min=1)
    lr: float = option(1e-3, "peak learning rate (AdamW)", above=0.0)
    warmup: int = option(100, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = option("cosine", "learning rate after warm-up: constant, or cosine decay to lr/20", choices=["constant", "cosine"])
    time_limit: float = option(0.0, "stop after this many seconds of training (0: no limit)", min=0.0)
    loss_on_prompt: bool = option(False, "also train on the prompt tokens (they are random operands)")
    eval_every: int = option(500, "evaluate held-out greedy accuracy every N steps (0: only at the end)", min=0)


def corpus_batch(task, tokenizer, rng, batch_size, chat_template=False):
    """A batch of corpus text as (tokens (B, T), mask (B, T-1)) of the answer tokens, EOS included."""
    pairs = [task.corpus_example(rng) for _ in range(batch_size)]
    prompt_ids = encode_prompts(tokenizer, [p for p, _ in pairs], chat_template)
    answers = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for _, c in pairs]
    n = max(len(a) for a in answers)
    pad = tokenizer.pad_token_id or 0
    completion_ids = [a + [pad] * (n - len(a)) for a in answers]
    completion_mask = [[1] * len(a) + [0] * (n - len(a)) for a in answers]
    return completion_batch(prompt_ids, completion_ids, completion_mask, pad)


def pretrain_loss(model, tokens, mask):
    """Mean next-token cross-entropy over the positions in mask."""
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:])  # (B, T-1)
    ntokens = mask.sum()
    return (ce * mask).sum() / ntokens, {"ntokens": ntokens}


def run_pretrain(cfg):
    session = train.start("pretrain", cfg)
    model, tokenizer, task, run = session.model, session.tokenizer, session.task, session.run
    optimizer = train.make_optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.lr_schedule)
    train.restore(session, optimizer)
    update = train.make_update(model, optimizer, pretrain_loss, cfg.max_grad_norm, cfg.compile)
    heldout = task.prompts("heldout", cfg.eval_prompts, seed=cfg.seed)
    timer = PhaseTimer()
    progress = Progress(cfg.steps, session.start_step, desc="pretrain")
    step = session.start_step
    metrics = {}

    with train.interruptible(session, lambda: (step, optimizer)):
        while step < cfg.steps:
            with timer("data"):
                tokens, mask = corpus_batch(task, tokenizer, session.rng, cfg.batch_size, cfg.chat_template)
                if cfg.loss_on_prompt:
                    mask = (tokens[:, 1:] != (tokenizer.pad_token_id or 0)).astype(mx.float32)
            loss, aux, grad_norm = update(tokens, mask, timer=timer)
            step += 1
            row = {
                "loss/cross_entropy": loss.item(),
                "optim/grad_norm": grad_norm.item(),
                "optim/lr": train.current_lr(optimizer),
            }
            last = step == cfg.steps or (cfg.time_limit > 0 and run.wall_s >= cfg.time_limit)
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                with timer("eval"):
                    metrics, samples = train.evaluate(model, tokenizer, task, heldout, cfg.chat_template)
                row.update(metrics)
                run.log_samples(step, samples)
                train.save(session, step, optimizer)
            times = timer.pop()
            step_s = sum(v for k, v in times.items() if k != "time/eval_s")
            row.update(times)
            row["perf/tokens_per_s"] = aux["ntokens"].item() / max(step_s, 1e-9)
            row["perf/peak_memory_gb"] = train.peak_memory_gb()
            run.log(step, row)
            progress.update(step, loss=row["loss/cross_entropy"], acc=metrics.get("eval/accuracy", float("nan")))
            if last:
                break
    progress.close()

    plot_run(run.path)
    summary = run.write_summary(steps=step, final_loss=row["loss/cross_entropy"], **metrics, checkpoint=str(run.checkpoint_dir))
    print(f"held-out greedy accuracy {metrics['eval/accuracy']:.1%}  ({run.path})")
    return summary


cli = command("pretrain", PretrainConfig, run_pretrain, help=__doc__.split("\n\n")[0])
