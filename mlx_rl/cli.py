"""The `mlx-rl` command: one sub-command per chapter, plus the tools (eval, plot, profile, report, tasks, import-gguf).

Each chapter module exposes `cli`, a click command built from its config
dataclass (see config.command). Errors in the user's input (MlxRlError) print
one line and exit with status 2 (3: training diverged; 130: interrupted; 0: a
finished run resumed with nothing to do); they never show a traceback.

`main()` first switches on the speed-ups for MLX's Linux CPU backend
(engine/speed.py: OpenBLAS must be loaded before MLX is imported).
"""

import importlib
import sys

import click

from mlx_rl.config import MlxRlError

# command name -> module that defines it (imported only when that command runs, so
# `mlx-rl --help` stays fast)
COMMANDS = {
    "icemaze": "mlx_rl.chapters.icemaze",
    "pretrain": "mlx_rl.chapters.pretrain",
    "kl": "mlx_rl.chapters.kl",
    "grpo": "mlx_rl.chapters.grpo",
    "ppo": "mlx_rl.chapters.ppo",
    "dpo": "mlx_rl.chapters.dpo",
    "distill": "mlx_rl.chapters.distill",
    "dpo-pairs": "mlx_rl.chapters.dpo",
    "label-pairs": "mlx_rl.chapters.reward_model",
    "reward-model": "mlx_rl.chapters.reward_model",
    "eval": "mlx_rl.tools.evaluate",
    "plot": "mlx_rl.plots",
    "profile": "mlx_rl.tools.profile",
    "report": "mlx_rl.report",
    "tasks": "mlx_rl.tools.evaluate",
    "import-gguf": "mlx_rl.tools.gguf",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name])
        return getattr(module, "cli_" + name.replace("-", "_"), None) or module.cli


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mlx-rl")
def group():
    """Reinforcement learning for LLM post-training on MLX, one chapter at a time.

    Start with `mlx-rl pretrain`, then improve its checkpoint with `mlx-rl grpo`,
    `mlx-rl ppo` or `mlx-rl dpo`. Every run writes a directory under runs/.
    """


def main(argv=None):
    from mlx_rl.engine import speed

    speed.enable()  # OpenBLAS before MLX is imported; the fast SwiGLU when mlx-lm is
    try:
        group.main(args=argv, standalone_mode=False)
    except MlxRlError as e:
        code = getattr(e, "exit_code", 2)
        click.echo(f"{'error: ' if code not in (0, 130) else ''}{e}", err=True)
        sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
