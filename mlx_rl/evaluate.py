"""`mlx-rl eval`: held-out greedy accuracy of a checkpoint; `mlx-rl tasks`: the task list."""

import json

import click

from mlx_rl.tasks import TASKS, get_task


@click.command("eval")
@click.option("--model", required=True, help="checkpoint directory (e.g. RUN/checkpoint) or hub name")
@click.option("--task", default="addition", show_default=True, help="task name (see `mlx-rl tasks`)")
@click.option("--prompts", "n_prompts", type=click.IntRange(min=1), default=500, show_default=True, help="held-out prompts")
@click.option("--seed", type=int, default=0, show_default=True, help="which held-out prompts")
@click.option("--digits", type=click.IntRange(1, 6), default=2, show_default=True, help="addition: operand digits")
@click.option("--sort-length", type=click.IntRange(2, 12), default=5, show_default=True, help="sort: list length")
@click.option("--samples", type=click.IntRange(min=0), default=5, show_default=True, help="sample completions to show")
@click.option("--chat-template/--no-chat-template", default=False, show_default=True, help="wrap prompts in the chat template")
@click.option("--adapter-path", default=None, help="LoRA adapters to apply to --model")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def cli_eval(model, task, n_prompts, seed, digits, sort_length, samples, chat_template, adapter_path, as_json):
    """Held-out greedy accuracy, mean reward and sample completions of a checkpoint."""
    from mlx_rl.models import load_model
    from mlx_rl.train import evaluate

    extra = {"addition": {"digits": digits}, "sort": {"length": sort_length}}.get(task, {})
    task_obj = get_task(task, **extra)
    loaded, tokenizer, _ = load_model(model, adapter_path=adapter_path)
    prompts = task_obj.prompts("heldout", n_prompts, seed=seed)
    metrics, rows = evaluate(loaded, tokenizer, task_obj, prompts, chat_template, n_samples=samples)
    if as_json:
        click.echo(json.dumps({"model": model, "task": task, "prompts": len(prompts), **metrics, "samples": rows}))
        return
    click.echo(f"{task} on {len(prompts)} held-out prompts: accuracy {metrics['eval/accuracy']:.1%}, "
               f"mean reward {metrics['eval/reward']:.3f}")
    for r in rows:
        click.echo(f"  {r['prompt']}{r['completion']}   reward {r['reward']:.2f}{'  ok' if r['correct'] else ''}")


@click.command("tasks")
def cli_tasks():
    """List the tasks."""
    for name, cls in TASKS.items():
        click.echo(f"{name:10s} {cls.description}")

