"""`mlx-rl eval`: held-out figures of any checkpoint on any task; `mlx-rl tasks`: the built-in tasks, and how to add one.

    mlx-rl eval --model runs/grpo/checkpoint                              # the built-in addition task
    mlx-rl eval --model M --data my_task/ --reward my_task/reward.py:score --json
    mlx-rl eval --model M --pass-k 1,8,64                                 # pass@k from temperature-1 samples
"""

import dataclasses
import json
import typing
from pathlib import Path

import click

from mlx_rl.config import MlxRlError, command, option
from mlx_rl.data.tasks import BUILTIN, TaskConfig


@dataclasses.dataclass
class EvalConfig(TaskConfig):
    model: typing.Optional[str] = option(None, "checkpoint directory (e.g. RUN/checkpoint) or hub name (required)")
    adapter_path: typing.Optional[str] = option(None, "LoRA adapters to apply to --model")
    eval_prompts: int = option(500, "held-out prompts in each evaluation", min=1, aliases=("prompts",))
    seed: int = option(0, "random seed: which held-out prompts (the built-in tasks), or which share is held out (--data)")
    show_samples: int = option(5, "sample completions to print", min=0, aliases=("samples",))
    chat_template: bool = option(False, "wrap prompts in the tokenizer's chat template")
    max_new_tokens: int = option(0, "longest completion (0: the task's answer length + EOS; 64 with --data)", min=0)
    pass_k: typing.Tuple[str, ...] = option((), "pass@k for these k too, comma-separated (sampled at temperature 1)")
    pass_k_samples: int = option(0, "samples per prompt for pass@k (0: the largest k)", min=0)
    json: bool = option(False, "print one JSON object instead of text")


EPISODE_COUNTERS = ("tool_calls", "tool_errors", "invalid_moves")  # environments' counters worth a line


def warn_task_mismatch(model, task_name, data):
    """A checkpoint evaluated on another task's prompts scores 0%: say so rather than let it pass silently."""
    run_config = Path(model).parent / "config.json"
    try:
        trained = json.loads(run_config.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return
    if not isinstance(trained, dict) or "command" not in trained:
        return
    was = trained.get("data") or trained.get("task")
    now = data or task_name
    if trained.get("command") == "pretrain" and trained.get("data") and data:
        return  # a corpus is never the prompt file it is evaluated on: a different path is the normal case
    if was and was != now:
        click.echo(f"note: {model} was trained on {was!r}, and is evaluated here on {now!r}", err=True)


def run_eval(cfg):
    from mlx_rl.chapters.grpo_family import parse_ks
    from mlx_rl.data.tasks import make_task
    from mlx_rl.engine.evaluate import evaluate, evaluate_pass_at_k
    from mlx_rl.engine.models import load_model

    if not cfg.model:
        raise MlxRlError("--model is required: a checkpoint directory (e.g. runs/NAME/checkpoint) or a hub name")
    ks = parse_ks(cfg.pass_k)
    task = make_task(cfg)  # data and rewards checked before the model is loaded
    if task.rewards is None:
        raise MlxRlError("nothing to evaluate with: give --reward")
    warn_task_mismatch(cfg.model, cfg.task, cfg.data)
    model, tokenizer, _ = load_model(cfg.model, adapter_path=cfg.adapter_path)
    rows = task.heldout_rows(cfg.eval_prompts, seed=cfg.seed)
    if not rows:
        raise MlxRlError(f"{task.name} has no held-out rows to evaluate")
    metrics, samples = evaluate(model, tokenizer, task, rows, cfg.chat_template, n_samples=cfg.show_samples)
    if ks:
        metrics.update(evaluate_pass_at_k(model, tokenizer, task, rows, ks, n=cfg.pass_k_samples or None,
                                          chat_template=cfg.chat_template))
    if cfg.json:
        click.echo(json.dumps({"model": cfg.model, "task": task.name, "prompts": len(rows), **metrics, "samples": samples},
                              ensure_ascii=False))
        return metrics
    headline = (f"accuracy {metrics['eval/accuracy']:.1%}, " if "eval/accuracy" in metrics else "")
    what = "greedy episodes" if getattr(task, "env", None) else "held-out prompts"
    click.echo(f"{task.name} on {len(rows)} {what}: {headline}mean reward {metrics['eval/reward']:.3f}"
               f"  ({task.rewards.describe()})")
    for k, v in metrics.items():
        if k == "eval/turns" or (getattr(task, "env", None) and k.startswith("eval/") and k[5:] in EPISODE_COUNTERS):
            click.echo(f"  {k[len('eval/'):]}: {v:.2f} per episode")
        if k.startswith("eval/accuracy_") or (k.startswith("eval/reward_") and len(task.rewards.names) > 1):
            click.echo(f"  {k[len('eval/'):]}: {v:.1%}" if "accuracy" in k else f"  {k[len('eval/'):]}: {v:.3f}")
        if k.startswith("pass@"):
            click.echo(f"  {k}: {v:.1%}")
    for s in samples:
        expected = f"   expected {s['answer']!r}" if "answer" in s else ""
        prompt = s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][-1]["content"]
        click.echo(f"  {prompt!r} -> {s['completion']!r}{expected}   reward {s['reward']:.2f}")
    return metrics


cli_eval = command("eval", EvalConfig, run_eval,
                   help="Held-out greedy accuracy, each reward's mean, sample completions (and pass@k) of a checkpoint.")


@click.command("tasks")
def cli_tasks():
    """List the built-in tasks, and say how to bring your own."""
    from mlx_rl.data.envs import ENV_TASKS

    for name, cls in BUILTIN.items():
        click.echo(f"{name:10s} {cls.description}")
    click.echo("\nWith an environment (the model acts over several turns; the environment answers and rewards):")
    for name, cls in ENV_TASKS.items():
        click.echo(f"{name:10s} {cls.description}")
    click.echo(
        "\nYour own task: a JSONL file (or a folder with train.jsonl and valid.jsonl) of rows with a 'prompt' and\n"
        "any columns your reward needs, and a reward: a built-in (exact, numeric, lenient_numeric, chars,\n"
        "format:REGEX, length:N) or your own function fn(prompts, completions, **columns) -> list of floats:\n"
        "\n"
        "  mlx-rl grpo --model M --data my_task/ --reward my_task/reward.py:score\n"
        "\n"
        "A pretraining corpus is a JSONL of {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} rows:\n"
        "  mlx-rl pretrain --data my_task/corpus.jsonl --reward exact\n"
        "\n"
        "A complete example to copy: examples/ (see docs/your-own.md).\n"
        "\n"
        "Your own environment: a Python file with a function make(row) -> env, where env.reset() -> str is the\n"
        "first observation and env.step(text) -> (observation: str | None, reward: float, done: bool) answers the\n"
        "model's turn; optional env.stop (strings that end a turn, e.g. ['</calc>']), env.role, env.solved, env.info:\n"
        "\n"
        "  mlx-rl grpo --model M --env my_env.py:make --data my_task/   # --data rows are passed to make(row)\n"
        "\n"
        "A complete one to copy: examples/calculator/ (see docs/agents.md).")
