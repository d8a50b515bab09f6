"""The `mlx-rl` command: one sub-command per chapter, plus eval, plot and tasks.

Each chapter module exposes `cli`, a click command built from its config
dataclass (see config.command). Errors in the user's input (MlxRlError) print
one line and exit with status 2; they never show a traceback.
"""

import importlib
import sys

import click

from mlx_rl.config import MlxRlError

# command name -> module that defines it (imported only when that command runs, so
# `mlx-rl --help` stays fast)
COMMANDS = {
    "icemaze": "mlx_rl.icemaze",
    "pretrain": "mlx_rl.pretrain",
    "kl": "mlx_rl.kl",
    "grpo": "mlx_rl.grpo",
    "ppo": "mlx_rl.ppo",
    "dpo": "mlx_rl.dpo",
    "dpo-pairs": "mlx_rl.dpo",
    "eval": "mlx_rl.evaluate",
    "plot": "mlx_rl.plots",
    "profile": "mlx_rl.profile",
    "tasks": "mlx_rl.evaluate",
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
    try:
        group.main(args=argv, standalone_mode=False)
    except MlxRlError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
