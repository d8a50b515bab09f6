"""Config dataclasses, and the CLI built from them.

Each chapter declares its settings once, as a dataclass whose fields carry help
text. `command()` turns it into a click command with one option per field, so
`--help` shows every field's help and default, `-c/--config FILE` (YAML or
JSON, keys in snake_case or kebab-case) can set any field, and flags given on
the command line win over the file. The resolved config is saved in the run
directory, so `--config RUN/config.json` repeats a run exactly.

Every value is checked before anything is loaded: its type, its bounds (NaN and
infinity never pass a float field), its choices; an unknown key gets a
did-you-mean. `--resume RUN` takes RUN's own config, and a flag that would
change a setting the run can't change midway is refused in one line.
"""

import dataclasses
import difflib
import json
import math
import typing
from pathlib import Path

import click


class MlxRlError(Exception):
    """A problem with the user's input: printed as one line, never a traceback."""


def option(default, help, *, aliases=(), resumable=False, **checks):
    """A config field: `lr: float = option(1e-3, "learning rate", above=0, resumable=True)`.

    checks: min / max (inclusive bounds), above (a strict lower bound), choices.
    aliases: older names that still work, as flags and as config-file keys.
    resumable: the setting may change on --resume (steps, learning rate, how often
    to evaluate or save); every other setting is fixed for the life of a run.
    A tuple default makes a repeatable option (`--reward A --reward B`).
    """
    meta = {"help": help, "aliases": tuple(aliases), "resumable": resumable, **checks}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def log_to_option():
    return option((), "also log metrics, config and samples to tensorboard (RUN/tensorboard), wandb or trackio; repeat "
                  "for several (each an extra: pip install 'mlx-rl[tensorboard]')",
                  choices=("tensorboard", "wandb", "trackio"), resumable=True)


@dataclasses.dataclass
class RunConfig:
    """Fields every training command shares."""

    out: typing.Optional[str] = option(None, "where to write: the run directory (default: runs/<command>-<date>-<time>)")
    seed: int = option(0, "random seed for data, sampling and initialisation")
    steps: int = option(100, "number of training steps", min=1, resumable=True)
    resume: typing.Optional[str] = option(None, "continue a run directory from its last checkpoint (a finished run: "
                                          "extend it with a larger --steps)")
    log_to: typing.Tuple[str, ...] = log_to_option()


# Fields that say where a run lives, not what it does: not read from --config files.
RUN_ONLY_FIELDS = ("out", "resume", "command", "runtime", "world")
# ... of which a run's own config.json records these (so `-c RUN/config.json` repeats a run in a new directory)
RUN_RECORD_FIELDS = ("command", "runtime", "world")


def field_type(cls, f):
    """The plain type of a field: Optional[int] -> int; tuple fields -> (tuple, element type)."""
    t = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def element_type(t):
    """typing.Tuple[float, ...] -> float; a plain type -> None."""
    if typing.get_origin(t) is tuple:
        return typing.get_args(t)[0]
    return None


def fields_by_name(cls):
    """{name or alias: field}, with '-' and '_' both accepted."""
    out = {}
    for f in dataclasses.fields(cls):
        for name in (f.name, *f.metadata.get("aliases", ())):
            out[name] = f
    return out


def canonical(cls, name, where):
    """The field a key names (snake or kebab case, or an alias), or a one-line did-you-mean error."""
    names = fields_by_name(cls)
    key = str(name).replace("-", "_")
    if key in names:
        return names[key]
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
    raise MlxRlError(f"unknown setting '{name}' {where}{hint}")


def check_scalar(name, value, t, meta, where):
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise MlxRlError(f"setting '{name}' {where} must be {t.__name__}, got {value!r}")
    if t is float and not math.isfinite(value):
        raise MlxRlError(f"setting '{name}' {where} must be a finite number, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise MlxRlError(f"setting '{name}' {where} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise MlxRlError(f"setting '{name}' {where} must be >= {meta['min']}, got {value!r}")
    if "above" in meta and value <= meta["above"]:
        raise MlxRlError(f"setting '{name}' {where} must be > {meta['above']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise MlxRlError(f"setting '{name}' {where} must be <= {meta['max']}, got {value!r}")
    return value


def check_value(cls, name, value, where):
    """Type-check and bound-check one value; returns (field name, value converted)."""
    f = canonical(cls, name, where)
    meta = f.metadata
    if value is None:
        if f.default is None:
            return f.name, None
        raise MlxRlError(f"setting '{f.name}' {where} cannot be empty")
    t = field_type(cls, f)
    inner = element_type(t)
    if inner is not None:
        if isinstance(value, str):  # "1,0.1" from a flag or a file
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if inner is float:
            try:
                value = [float(v) if isinstance(v, str) else v for v in value]
            except ValueError:
                raise MlxRlError(f"setting '{f.name}' {where} must be numbers, got {value!r}") from None
        return f.name, tuple(check_scalar(f.name, v, inner, meta, where) for v in value)
    return f.name, check_scalar(f.name, value, t, meta, where)


def read_config_file(path):
    """A YAML or JSON file of settings -> dict (keys as written)."""
    path = Path(path)
    if not path.is_file():
        raise MlxRlError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise MlxRlError(f"config file {path} is not UTF-8 text") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MlxRlError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text, parse_constant=lambda c: float(c))  # NaN / Infinity are refused by the bounds
        except json.JSONDecodeError as e:
            raise MlxRlError(f"config file {path} is not valid JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MlxRlError(f"config file {path} must hold a mapping of settings")
    return data


def check_file_keys(data, path, command_name):
    """Refuse, in one line, a key of a config file that would otherwise be dropped without a word.

    `out:` and `resume:` say where a run lives: they are given on the command line, never read from a file.
    A run's own config.json (it has `command:`) records them; there they describe the old run and are left out,
    so `-c RUN/config.json` repeats that run in a new directory. A run of another command is refused.
    """
    saved = data.get("command")
    if saved is not None and saved != command_name:
        raise MlxRlError(f"config file {path} is a `{saved}` run's settings: use it with `mlx-rl {saved} -c {path}`")
    if saved is None:
        for key in data:
            name = str(key).replace("-", "_")
            if name in ("out", "resume") and data[key] is not None:
                raise MlxRlError(f"config file {path}: '{key}' is not read from a file: give --{name} on the command line")
            if name in RUN_RECORD_FIELDS:
                raise MlxRlError(f"config file {path}: '{key}' is recorded in a run's config.json, not a setting")


def alias_notes(cls, names, where):
    """One line per older name used (an alias): what it is called now. The old spelling keeps working."""
    fields, seen = fields_by_name(cls), set()
    for name in names:
        key = str(name).lstrip("-").replace("-", "_")
        if key not in fields and key.startswith("no_"):
            key = key[3:]  # --no-OLD of a bool
        f = fields.get(key)
        if f is None or key == f.name or key in seen:
            continue
        seen.add(key)
        old, new = (f"--{key}", f"--{f.name}") if where == "flag" else (f"config key '{key}'", f"'{f.name}'")
        click.echo(f"note: {old.replace('_', '-') if where == 'flag' else old} is now "
                   f"{new.replace('_', '-') if where == 'flag' else new} ({f.metadata.get('help', '')})", err=True)


class SettingsCommand(click.Command):
    """A click command that says, in one line, what an older option name (an alias) became."""

    def __init__(self, *args, settings_cls=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings_cls = settings_cls

    def parse_args(self, ctx, args):
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        alias_notes(self.settings_cls, flags, "flag")
        return super().parse_args(ctx, args)


def build(cls, file_values=None, overrides=None, where_file="in the config file"):
    """Defaults < file values < overrides, each value checked. Returns a `cls`."""
    values = {}
    for name, value in (file_values or {}).items():
        if str(name).replace("-", "_") in RUN_ONLY_FIELDS:
            continue
        key, value = check_value(cls, name, value, where_file)
        values[key] = value
    for name, value in (overrides or {}).items():
        key, value = check_value(cls, name, value, "on the command line")
        values[key] = value
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def read_run_config(run_dir, command_name):
    """RUN/config.json of a run to resume, checked to be this command's."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise MlxRlError(f"--resume {run_dir}: no such run directory")
    if not path.is_file():
        raise MlxRlError(f"--resume {run_dir}: not a run directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MlxRlError(f"--resume {run_dir}: its config.json is damaged (not valid JSON)") from None
    if not isinstance(data, dict):
        raise MlxRlError(f"--resume {run_dir}: its config.json is damaged (not an object)")
    saved = data.get("command")
    if saved and saved != command_name:
        raise MlxRlError(f"--resume {run_dir}: that is a `{saved}` run; continue it with `mlx-rl {saved} --resume {run_dir}`")
    return data


def check_resume_changes(cls, saved, given):
    """Refuse, in one line, a flag that would change a setting fixed for the life of a run."""
    for name, value in given.items():
        f = fields_by_name(cls)[name]
        if f.name in RUN_ONLY_FIELDS or f.metadata.get("resumable"):
            continue
        if f.name not in saved:
            continue
        _, before = check_value(cls, f.name, saved[f.name], "in the run's config.json")
        if before != value:
            flag = "--" + f.name.replace("_", "-")
            raise MlxRlError(f"--resume: {flag} was {fmt(before)} in this run and is {fmt(value)} now; a run keeps "
                             f"its settings (only {', '.join(resumable_flags(cls))} may change): start a new run instead")


def resumable_flags(cls):
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.metadata.get("resumable")]


def fmt(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else repr(value)


def task_defaults(command_name, task_name):
    """Settings a built-in task brings to a chapter (`CHAPTER_DEFAULTS` on the task's class: its corpus plateaus
    after 300 steps, say, where addition needs 3000); a flag or a config file still wins."""
    if not task_name:
        return {}
    from mlx_rl.data.envs import TASK_CHAPTER_DEFAULTS  # (lazy: config is imported by everything)

    return dict(TASK_CHAPTER_DEFAULTS.get(task_name, {}).get(command_name, {}))


def task_defaults_help(command_name, field_name):
    from mlx_rl.data.envs import TASK_CHAPTER_DEFAULTS

    own = [f"{task} {fmt(d[command_name][field_name])}" for task, d in TASK_CHAPTER_DEFAULTS.items()
           if field_name in d.get(command_name, {})]
    return f" [--task {', '.join(own)}]" if own else ""


def resolve(name, cls, given, config_file=None):
    """The config a command runs with: defaults < the task's own defaults < a config file < `given`
    (with `resume` in `given`: the run's saved settings, which `given` may change only where resumable).

    The one path from settings to a checked config, for the CLI (`given`: the flags typed) and the
    Python API (`given`: keyword arguments; mlx_rl/api.py).
    """
    file_values = {}
    if config_file:
        data = read_config_file(config_file)
        check_file_keys(data, config_file, name)
        alias_notes(cls, [k for k in data if str(k).replace("-", "_") not in RUN_ONLY_FIELDS], "key")
        file_values.update(data)
    task = given.get("task", file_values.get("task"))
    file_values = {**task_defaults(name, task), **file_values}  # a task's own defaults, under everything given
    if given.get("resume"):
        saved = read_run_config(given["resume"], name)
        checked = dict(check_value(cls, k, v, "on the command line") for k, v in given.items())
        check_resume_changes(cls, saved, checked)
        file_values = {**file_values, **saved}  # the run's own settings win over a --config file
    return build(cls, file_values, given)


def command(name, cls, run, help):
    """A click command with one option per field of `cls`; it calls `run(cfg)`."""
    from click.core import ParameterSource

    def callback(**kwargs):
        ctx = click.get_current_context()
        config_file = kwargs.pop("config")
        given = {k: v for k, v in kwargs.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        return run(resolve(name, cls, given, config_file))

    params = [click.Option(["-c", "--config"], type=click.Path(dir_okay=False),
                           help="YAML or JSON file of settings (snake_case or kebab-case keys); flags given here win")]
    for f in dataclasses.fields(cls):
        t = field_type(cls, f)
        flags = ["--" + n.replace("_", "-") for n in (f.name, *f.metadata.get("aliases", ()))]
        help_text = f.metadata.get("help", "") + task_defaults_help(name, f.name)
        if f.metadata.get("aliases"):
            help_text += f" ({', '.join(flags[1:])}: older name)"
        if t is bool:
            negatives = ["--no-" + fl[2:] for fl in flags]
            decls = [f"{fl}/{neg}" for fl, neg in zip(flags, negatives)]
            params.append(click.Option(decls + [f.name], default=f.default, show_default=True, help=help_text))
            continue
        inner = element_type(t)
        if inner is not None:
            default = f.default_factory()
            multiple = inner is str
            params.append(click.Option(flags + [f.name], type=str, multiple=multiple, default=default if multiple else None,
                                       show_default=bool(default), help=help_text))
            continue
        click_type = {int: int, float: float, str: str}[t]
        if "choices" in f.metadata:
            click_type = click.Choice([str(c) for c in f.metadata["choices"]])
        params.append(click.Option(flags + [f.name], type=click_type, default=f.default, show_default=f.default is not None,
                                   help=help_text))
    cmd = SettingsCommand(name, callback=callback, params=params, help=help, settings_cls=cls)
    cmd.config_class, cmd.run_config = cls, run  # what the Python API (mlx_rl/api.py) calls, without click
    return cmd
