"""Chapter "Pretraining": train a tiny language model from scratch on a laptop.

What it teaches: a language model is trained by imitation (next-token
cross-entropy on a corpus), and it learns whatever the corpus does, mistakes
included. The built-in corpora carry a systematic mistake (addition forgets
most carries), so the model's greedy accuracy settles on a plateau that more
imitation cannot lift. The RL chapters start from this checkpoint and use a
reward to get past it.

Your own corpus: `--data CORPUS.jsonl` in mlx-lm's formats ({"text"},
{"prompt", "completion"}, {"messages"}); the loss covers the completion (the
assistant's answer) where there is one, every token of a "text" row. With
`--reward`, rows with a prompt are also evaluated held-out (docs/your-own.md).
A new tiny model takes its character vocabulary from the corpus.

Deliberate simplifications: the built-in corpus is generated on the fly (no
data set), the loss covers the answer tokens only (the prompts are random
operands with nothing to learn), a short warm-up then a cosine decay.

The model is an ordinary mlx-lm checkpoint: `mlx_lm generate --model RUN/checkpoint --prompt 07+45=`.
"""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_rl.config import command, option
from mlx_rl.engine import loop
from mlx_rl.engine.logprobs import completion_batch, masked
from mlx_rl.engine.sampling import encode_prompts
from mlx_rl.engine.session import LLMConfig, start
from mlx_rl.engine.update import current_lr


@dataclasses.dataclass
class PretrainConfig(LLMConfig):
    steps: int = option(3000, "number of training steps", min=1, resumable=True)
    preset: str = option("tiny", "size of a new model when --model is not given", choices=["micro", "tiny", "small"])
    mistake_rate: float = option(0.75, "built-in tasks: share of corpus examples written with the task's systematic "
                                 "mistake", min=0.0, max=1.0)
    batch_size: int = option(32, "training examples per step (corpus examples)", min=1)
    lr: float = option(1e-3, "learning rate (AdamW; the peak, after warm-up)", above=0.0, resumable=True)
    warmup: int = option(100, "linear learning-rate warm-up steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    lr_schedule: str = option("cosine", "learning rate after warm-up: constant, or cosine decay to lr/20",
                              choices=["constant", "cosine"])
    time_limit: float = option(0.0, "stop after this many seconds of wall time, evaluations included and counted across --resume (0: no limit)", min=0.0, resumable=True)
    loss_on_prompt: bool = option(False, "also train on the prompt tokens (they are random operands)")
    eval_every: int = option(500, "evaluate on held-out data every N steps: greedy accuracy (0: only at the start and the end)",
                             min=0, resumable=True)


# --- the maths -------------------------------------------------------------------------


def pretrain_loss(model, tokens, mask, n_tokens):
    """Next-token cross-entropy summed over the positions in mask, divided by n_tokens (the global count)."""
    logits = model(tokens[:, :-1])  # (B, T-1, V)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:])  # (B, T-1)
    return masked(ce, mask).sum() / n_tokens, {"ntokens": mask.sum()}


# --- the data ----------------------------------------------------------------------------


def corpus_batch(task, tokenizer, rng, batch_size, chat_template=False):
    """A batch of corpus text as (tokens (B, T), mask (B, T-1)) of the answer tokens, EOS included.

    A task with an environment gives whole episodes of its behaviour instead, and a corpus of the user's
    its rows, as (ids, mask) laid out as the RL chapters' rollouts are: the loss covers the behaviour's
    (the assistant's) turns, never the environment's (the tool's).
    """
    if hasattr(task, "corpus_tokens"):
        return token_batch([task.corpus_tokens(rng, tokenizer, chat_template) for _ in range(batch_size)],
                           tokenizer.pad_token_id or 0)
    pairs = [task.corpus_example(rng) for _ in range(batch_size)]
    prompt_ids = encode_prompts(tokenizer, [p for p, _ in pairs], chat_template)
    answers = [tokenizer.encode(c, add_special_tokens=False) + [tokenizer.eos_token_id] for _, c in pairs]
    n = max(len(a) for a in answers)
    pad = tokenizer.pad_token_id or 0
    completion_ids = [a + [pad] * (n - len(a)) for a in answers]
    completion_mask = [[1] * len(a) + [0] * (n - len(a)) for a in answers]
    return completion_batch(prompt_ids, completion_ids, completion_mask, pad)


def token_batch(examples, pad_id):
    """[(ids, mask)] -> (tokens (B, T), mask (B, T-1)), right-padded; mask[t] says whether tokens[t + 1] is trained."""
    T = max(len(ids) for ids, _ in examples)
    tokens = np.full((len(examples), T), pad_id, dtype=np.int32)
    mask = np.zeros((len(examples), T), dtype=np.float32)
    for i, (ids, m) in enumerate(examples):
        tokens[i, : len(ids)], mask[i, : len(m)] = ids, m
    return mx.array(tokens), mx.array(mask[:, 1:])


# --- the run -------------------------------------------------------------------------------


def train(cfg):
    session = start("pretrain", cfg, mistake_rate=cfg.mistake_rate, corpus=True)
    task, tokenizer, world, timer = session.task, session.tokenizer, session.world, session.timer
    optimizer = session.optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay, cfg.lr_schedule)
    update = session.update_step(pretrain_loss, optimizer)

    def step(i):
        with timer("data"):
            # Every rank draws the whole global batch (the same numpy RNG stream as one process) and keeps its share.
            tokens, mask = corpus_batch(task, tokenizer, session.rng, cfg.batch_size, cfg.chat_template)
            if cfg.loss_on_prompt:
                mask = (tokens[:, 1:] != (tokenizer.pad_token_id or 0)).astype(mx.float32)
            n_tokens = mask.sum()
            n_batch_tokens = int((tokens != (tokenizer.pad_token_id or 0)).sum().item())  # the global batch's
            tokens, mask = world.shard(tokens), world.shard(mask)
        loss, aux, grad_norm = update(tokens, mask, n_tokens)
        return {
            "loss/cross_entropy": loss.item(),
            "optim/grad_norm": grad_norm.item(),
            "optim/lr": current_lr(optimizer),
            "perf/tokens": n_batch_tokens,  # -> perf/tokens_per_s (loop.tokens_per_second)
        }

    stop_when = (lambda i, row: session.run.wall_s >= cfg.time_limit) if cfg.time_limit > 0 else None
    return loop.run(session, step, steps=cfg.steps, stop_when=stop_when,
                    signals={"loss": "loss/cross_entropy", "held-out acc": "eval/accuracy", "tok/s": "perf/tokens_per_s"})


cli = command("pretrain", PretrainConfig, train, help=__doc__.split("\n\n")[0])
