"""One meaning per option name: the table every command's options are checked against (tests/test_options.py).

An option that more than one command has means the same thing in each; its help text starts with the meaning
below (after an optional scope such as `icemaze: ` or `LoRA: ` saying when it applies), and the rest of the help
says what is particular to that command (the default, the unit of a batch). A new option shared by two commands
gets a line here, or a name of its own.

Older names (aliases) keep working and print one line saying what they became; ALIASES lists them.
"""

MEANINGS = {
    "adapter-path": "LoRA adapters",
    "batch-size": "training examples per step",
    "chat-template": "wrap prompts in the tokenizer's chat template",
    "clip-eps": "clip of the policy ratio",
    "columns": "rename the data's columns to the ones mlx-rl reads",
    "compile": "compile the update step with mx.compile",
    "config": "YAML or JSON file of settings",
    "data": "your own data",
    "digits": "operand digits",
    "env": "your own environment",
    "epochs": "passes over each batch of collected data",
    "eval-every": "evaluate on held-out data every N steps",
    "eval-prompts": "held-out prompts",
    "force": "overwrite",
    "fuse": "also save the adapters fused into the base",
    "gamma": "discount factor",
    "is-cap": "the importance weight's cap C",
    "is-correction": "weight each token's policy term by pi_old / pi_sampler",
    "kl-coef": "weight of the KL penalty to the reference",
    "label-noise": "labeller: chance it picks the worse answer of a pair",
    "labels": "comma-separated names for the runs",
    "length-bias": "labeller: chance that, of two answers of different lengths, it picks the longer one",
    "log-to": "also log metrics, config and samples to",
    "lora-keys": "comma-separated layers inside a block to adapt",
    "lora-layers": "adapt the last N transformer blocks",
    "lora-rank": "train LoRA adapters of this rank",
    "lora-scale": "scale of the low-rank update",
    "lr": "learning rate",
    "lr-schedule": "learning rate after warm-up: constant, or cosine decay to lr/20",
    "map": "the board",
    "prompts-per-step": "prompts per step",
    "max-extra": "labeller: longer answers it is shown have 1 to this many digits appended",
    "max-grad-norm": "clip the gradient norm to this",
    "max-new-tokens": "longest completion",
    "max-turn-tokens": "tokens per model turn at most",
    "max-turns": "model turns per episode at most",
    "model": "checkpoint",
    "on-nan": "a non-finite loss, gradient or weight",
    "out": "where to write",
    "pair-prompts": "training prompts to build preference pairs from",
    "pair-temperature": "sampling temperature of the answers made into pairs",
    "pairs": "preference pairs in TRL's formats",
    "pairs-per-prompt": "labeller: pairs per prompt",
    "pass-k": "pass@k",
    "pass-k-prompts": "held-out prompts for pass@k",
    "preset": "size of a new model when --model is not given",
    "resume": "continue a run directory from its last checkpoint",
    "reward": "reward: a built-in name",
    "reward-model": "train on this reward model's score",
    "reward-model-weight": "weight of the learned reward",
    "reward-weights": "weights of the --reward functions",
    "samples-per-prompt": "answers sampled per prompt",
    "save-every": "also save a checkpoint every N steps",
    "save-minutes": "save a checkpoint at least this often",
    "seed": "random seed",
    "slippery": "slippery ice",
    "sort-length": "list length",
    "steps": "number of training steps",
    "task": "built-in task",
    "temperature": "sampling temperature of the rollouts",
    "verifier-weight": "weight of the task's own reward added to the learned one",
    "warmup": "linear learning-rate warm-up steps",
    "weight-decay": "AdamW weight decay",
    "x": "x axis",
}

# older name -> {command: the name it became there}
ALIASES = {
    "beta": {"grpo": "kl-coef", "dpo": "dpo-beta"},
    "inner-iters": {"grpo": "epochs"},
    "prompts": {"eval": "eval-prompts", "kl": "sample-prompts"},
    "samples": {"eval": "show-samples"},
}
