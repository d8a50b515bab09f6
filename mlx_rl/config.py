"""Config dataclasses, and the CLI built from them.

Each chapter declares its settings once, as a dataclass whose fields carry help
text. `command()` turns it into a click command with one option per field, so
`--help` shows every field's help and default, a `--config FILE` (JSON) can set
any field, and flags given on the command line win over the file. The resolved
config is saved in the run directory, so `--config RUN/config.json` repeats a
run exactly.
"""

import dataclasses
import json
import typing
from pathlib import Path

import click


class MlxRlError(Exception):
    """A problem with the user's input: printed as one line, never a traceback."""


def option(default, help, **checks):
    """A config field: `lr: float = option(1e-3, "learning rate", min=0)`.

    checks: min / max (inclusive bounds, with `above` for a strict lower bound),
    choices (a list of allowed values).
    """
    return dataclasses.field(default=default, metadata={"help": help, **checks})


@dataclasses.dataclass
class RunConfig:
    """Fields every training command shares."""

    out: typing.Optional[str] = option(None, "run directory (default: runs/<command>-<time>)")
    seed: int = option(0, "random seed for data, sampling and initialisation")
    steps: int = option(100, "number of training steps", min=1)
    model: typing.Optional[str] = option(
        None, "checkpoint directory or hub name to start from (default: pretrain builds a new tiny model; "
        "grpo/ppo/dpo take the newest runs/pretrain-* checkpoint for the task)"
    )
    task: str = option("addition", "task name (see `mlx-rl tasks`)")
    resume: typing.Optional[str] = option(None, "continue an interrupted run directory from its last checkpoint")


# Fields that say where a run lives, not what it does: not read from --config files.
RUN_ONLY_FIELDS = ("out", "resume", "command")


def field_type(cls, f):
    """The plain type of a field: Optional[int] -> int."""
    t = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def check_value(cls, name, value, where):
    """Type-check and bound-check one value; return it converted (int -> float)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise MlxRlError(f"unknown setting '{name}' {where}")
    f = fields[name]
    meta = f.metadata
    if value is None:
        if f.default is None:
            return None
        raise MlxRlError(f"setting '{name}' {where} cannot be empty")
    t = field_type(cls, f)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise MlxRlError(f"setting '{name}' {where} must be {t.__name__}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise MlxRlError(f"setting '{name}' {where} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise MlxRlError(f"setting '{name}' {where} must be >= {meta['min']}, got {value!r}")
    if "above" in meta and value <= meta["above"]:
        raise MlxRlError(f"setting '{name}' {where} must be > {meta['above']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise MlxRlError(f"setting '{name}' {where} must be <= {meta['max']}, got {value!r}")
    return value


def read_config_file(path):
    path = Path(path)
    if not path.is_file():
        raise MlxRlError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxRlError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MlxRlError(f"config file {path} must hold a JSON object")
    return data


def build(cls, file_values=None, overrides=None, where_file="in the config file"):
    """Defaults < file values < overrides, each value checked. Returns a `cls`."""
    values = {}
    for name, value in (file_values or {}).items():
        if name in RUN_ONLY_FIELDS:
            continue
        values[name] = check_value(cls, name, value, where_file)
    for name, value in (overrides or {}).items():
        values[name] = check_value(cls, name, value, "on the command line")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def command(name, cls, run, help):
    """A click command with one option per field of `cls`; it calls `run(cfg)`."""
    from click.core import ParameterSource

    def callback(**kwargs):
        ctx = click.get_current_context()
        config_file = kwargs.pop("config")
        given = {
            k: v
            for k, v in kwargs.items()
            if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE
        }
        file_values = {}
        if kwargs.get("resume"):
            file_values = read_config_file(Path(kwargs["resume"]) / "config.json")
        if config_file:
            file_values.update(read_config_file(config_file))
        cfg = build(cls, file_values, given)
        return run(cfg)

    params = [click.Option(["--config"], type=click.Path(dir_okay=False), help="JSON file of settings; flags given here win")]
    for f in dataclasses.fields(cls):
        t = field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if t is bool:
            params.append(click.Option([f"{flag}/--no-{flag[2:]}", f.name], default=f.default, show_default=True, help=help_text))
            continue
        click_type = {int: int, float: float, str: str}[t]
        if "choices" in f.metadata:
            click_type = click.Choice([str(c) for c in f.metadata["choices"]])
        params.append(click.Option([flag, f.name], type=click_type, default=f.default, show_default=f.default is not None, help=help_text))
    return click.Command(name, callback=callback, params=params, help=help)
