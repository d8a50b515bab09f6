"""Rewards: built-in verifiers and the user's own Python functions, called with TRL's signature.

A reward function is called with keywords only, the way TRL's trainers call it:

    fn(prompts=[...], completions=[...], answer=[...], <one keyword per column>) -> list[float | None]

`prompts` and `completions` are lists of strings, or for conversational data
lists of message lists, where a completion is `[{"role": "assistant",
"content": text}]`. Every other dataset column comes as a keyword list of the
same length. So a function written for TRL works unchanged:

    def accuracy_reward(completions, solution, **kwargs):
        return [float(c[0]["content"].strip() == s) for c, s in zip(completions, solution)]

A function that takes no **kwargs gets only the keywords it names. A value of
None means "this reward does not apply to that completion": it is left out of
the weighted sum (and out of that reward's mean).

A SPEC names a reward:
    path/to/file.py:function   the user's function (the path relative to the current
                               directory). This IMPORTS AND RUNS THE USER'S
                               FILE, which is the point: it is their code, run as if they
                               had imported it. (Nothing is ever eval'ed from a string.)
                               Modules next to the file can be imported at its top.
    exact, numeric, lenient_numeric, chars    verifiers against the `answer` column;
                               `exact:solution` reads another column instead
    format:REGEX, length:N     see each built-in's docstring

Names: a built-in's name, or the function's name as the spec writes it;
duplicates get _2, _3 (`exact`, `exact_2`).

`is_verifier()`: built-ins exact/numeric/lenient_numeric/format are 0/1
verifiers, chars and length are not. A user function counts as one when every
value it has returned so far (in all `score` calls, None aside) is 0 or 1, and
it has returned at least one; before its first call it does not.

Errors are MlxRlError, one line naming the reward (and spec), the row and the
problem: a function that raises, returns a non-list or the wrong length, or a
value that is not a number (bools and numpy numbers are accepted), NaN or inf.
"""

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
from decimal import Decimal
from pathlib import Path

import numpy as np

from mlx_rl.config import MlxRlError

# Keywords every call gets, never dataset columns.
CALL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state")
# Metric names a reward may not take (Scores.metrics writes them).
RESERVED_NAMES = ("mean", "std", "none_rows")


class RowError(MlxRlError):
    """A built-in's complaint about one row (RewardSet.score adds the reward's name and the row's location)."""

    def __init__(self, row, problem):
        super().__init__(problem)
        self.row, self.problem = row, problem


def completion_text(completion):
    """A completion's text: the string, or the content of the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content", "")
    if isinstance(completion, dict):
        return completion.get("content", "")
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


# ----------------------------------------------------------------------------- built-ins

NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def first_number(text):
    """The first number written in text, as a Decimal, or None. Signs, decimals and thousands separators
    ("1,234.5") are read; exponents ("1e5") are not."""
    m = NUMBER.search(text)
    return Decimal(m.group().replace(",", "")) if m else None


def answer_number(value, row):
    """A row's `answer` as a Decimal: a JSON number, or a string that is exactly one number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return Decimal(str(value))
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return Decimal(value.strip().replace(",", ""))
    raise RowError(row, f"answer {value!r} is not a number")


def builtin_exact(column):
    def exact(prompts, completions, **columns):
        """1.0 if the completion, stripped, equals str(answer) stripped, else 0.0; None where answer is null."""
        return [None if a is None else float(completion_text(c).strip() == str(a).strip())
                for c, a in zip(completions, columns[column])]
    return exact


def numbers_equal(completions, answers, read):
    """1.0 / 0.0 per row: does read(completion text) equal the answer as a number? None where answer is null."""
    out = []
    for i, (c, a) in enumerate(zip(completions, answers)):
        if a is None:
            out.append(None)
            continue
        want, got = answer_number(a, i), read(completion_text(c))
        out.append(float(got is not None and got == want))
    return out


def builtin_numeric(column):
    def numeric(prompts, completions, **columns):
        """1.0 if the first number in the completion equals answer as a number ("11.0" == 11, "1,234" == 1234),
        else 0.0 (also when there is no number); None where answer is null."""
        return numbers_equal(completions, columns[column], first_number)
    return numeric


def builtin_lenient_numeric(column):
    def lenient_numeric(prompts, completions, **columns):
        """Like numeric, but reads the number after the first "=" when there is one ("3 + 8 = 11" -> 11), else
        the first number: for chat models that write out the sum. 0.0 when there is no number there."""
        return numbers_equal(completions, columns[column], lambda text: first_number(text.split("=", 1)[-1]))
    return lenient_numeric


def builtin_chars(column):
    def chars(prompts, completions, **columns):
        """The number of characters of the stripped completion equal to str(answer) (stripped) at the same
        position; None where answer is null. 1.0 x exact + 0.1 x chars is the built-in tasks' reward."""
        out = []
        for c, a in zip(completions, columns[column]):
            got, target = completion_text(c).strip(), None if a is None else str(a).strip()
            out.append(None if target is None else float(sum(x == y for x, y in zip(got, target))))
        return out
    return chars


def builtin_format(pattern):
    def format(prompts, completions, **columns):
        """1.0 if re.search(REGEX, completion) finds a match, else 0.0 (write (?s) in REGEX for "." to match
        newlines)."""
        return [float(pattern.search(completion_text(c)) is not None) for c in completions]
    return format


def builtin_length(limit):
    def length(prompts, completions, **columns):
        """A length penalty: -max(0, len(completion) - N) / N, so 0 up to N characters and -1 at 2N."""
        return [-max(0, len(completion_text(c)) - limit) / limit for c in completions]
    return length


def parse_regex(arg, spec):
    try:
        return re.compile(arg)
    except re.error as e:
        raise MlxRlError(f"reward spec '{spec}': bad regular expression: {e}") from None


def parse_length(arg, spec):
    if not (arg.isdigit() and int(arg) >= 1):
        raise MlxRlError(f"reward spec '{spec}': the argument must be a whole number of characters, at least 1, got {arg!r}")
    return int(arg)


@dataclasses.dataclass(frozen=True)
class Builtin:
    make: object  # argument -> reward function
    argument: str  # "column" (optional, default "answer"), "regex" or "length" (required)
    verifier: bool


BUILTINS = {
    "exact": Builtin(builtin_exact, "column", True),
    "numeric": Builtin(builtin_numeric, "column", True),
    "lenient_numeric": Builtin(builtin_lenient_numeric, "column", True),
    "chars": Builtin(builtin_chars, "column", False),
    "format": Builtin(builtin_format, "regex", True),
    "length": Builtin(builtin_length, "length", False),
}


# ----------------------------------------------------------------------------- the user's functions


def exception_line(e):
    """"ValueError: bad thing (at reward.py:12)": the type, the first line of the message, the innermost frame."""
    text = str(e).strip().splitlines()
    out = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        out += f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})"
    return out


def import_file(path, spec, cache):
    """The user's reward file as a module (runs their code: intended), once per load_rewards call."""
    path = Path(path)
    if not path.is_file():
        raise MlxRlError(f"reward spec '{spec}': file {path} does not exist")
    key = str(path.resolve())
    if key in cache:
        return cache[key]
    name = "mlx_rl_user_reward_" + hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so dataclasses, pickling and the like work inside it
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)  # its own helper modules, imported at its top (last: it never shadows a package)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise MlxRlError(f"reward file {path} failed to import: {exception_line(e)}") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    cache[key] = module
    return module


def find_function(module, fname, path, spec):
    if not fname.isidentifier():
        raise MlxRlError(f"reward spec '{spec}' names no function: write {path}:function_name")
    fn = getattr(module, fname, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        close = difflib.get_close_matches(fname, defined, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise MlxRlError(f"reward file {path} has no function '{fname}' ({hint}it defines: {', '.join(defined) or 'no functions'})")
    if not callable(fn):
        raise MlxRlError(f"reward spec '{spec}': '{fname}' in {path} is {type(fn).__name__}, not a function")
    return fn


def signature_of(fn, label):
    """(named parameters, takes **kwargs, required column names) of a reward function."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some C callables): pass it everything
        return frozenset(), True, ()
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    for p in params:
        if p.kind == p.POSITIONAL_ONLY and p.default is p.empty:
            raise MlxRlError(f"reward {label}: parameter '{p.name}' is positional-only, but reward functions are "
                             "called with keywords (prompts=, completions=, one per column)")
    if "completions" not in names and not var_kw:
        hint = " (not 'completion')" if "completion" in names else ""
        raise MlxRlError(f"reward {label} takes no 'completions' parameter{hint}; TRL's signature is "
                         "fn(prompts, completions, **kwargs)")
    required = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.default is p.empty and p.name not in CALL_KEYWORDS)
    return names, var_kw, required


# ----------------------------------------------------------------------------- the set


@dataclasses.dataclass
class Reward:
    name: str
    spec: str
    fn: object
    weight: float
    verifier: object  # True / False for built-ins; None: decided from the values seen
    params: frozenset  # the keywords it names
    takes_all: bool  # has **kwargs: gets every column
    required: tuple  # columns it needs
    seen_values: bool = False
    seen_non_binary: bool = False

    @property
    def label(self):
        return self.name if self.spec == self.name else f"{self.name} ({self.spec})"


def parse_spec(spec, cache):
    """A spec (or a callable) -> (name, spec text, fn, verifier, params, takes_all, required)."""
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return (name, name, spec, None, *signature_of(spec, name))
    if not isinstance(spec, str) or not spec.strip():
        raise MlxRlError(f"a reward spec must be a built-in name or path/to/file.py:function, got {spec!r}")
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    if name in BUILTINS:  # checked first, so "format:\.py:" stays a regex
        b = BUILTINS[name]
        if b.argument == "column":
            argument = arg or "answer"
            required = (argument,)
        elif not arg:
            raise MlxRlError(f"reward '{name}' needs an argument: {name}:{'REGEX' if b.argument == 'regex' else 'N'}")
        else:
            argument = parse_regex(arg, spec) if b.argument == "regex" else parse_length(arg, spec)
            required = ()
        return name, spec, b.make(argument), b.verifier, frozenset(), True, required
    cut = spec.rfind(".py:")  # the last one: a Windows drive letter's colon comes before it
    if cut >= 0:
        path, fname = spec[: cut + 3], spec[cut + 4 :]
        fn = find_function(import_file(path, spec, cache), fname, path, spec)
        return (fname, spec, fn, None, *signature_of(fn, f"{fname} ({spec})"))
    if spec.endswith(".py"):
        raise MlxRlError(f"reward spec '{spec}' names a file but no function: write {spec}:function_name")
    close = difflib.get_close_matches(name, BUILTINS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise MlxRlError(f"unknown reward '{name}' ({hint}built-ins: {', '.join(BUILTINS)}; "
                     "or path/to/file.py:function for your own)")


def load_rewards(specs, weights=None):
    """A RewardSet from specs (strings as above, or callables) and their weights (default: 1 each).

    File specs import and run the user's Python file (intended: it is their code).
    """
    specs = list(specs)
    if not specs:
        raise MlxRlError("no reward given: name at least one (a built-in, or path/to/file.py:function)")
    if weights is None:
        weights = [1.0] * len(specs)
    weights = list(weights)
    if len(weights) != len(specs):
        raise MlxRlError(f"{len(weights)} reward weights for {len(specs)} rewards; give one weight per reward")
    for w in weights:
        if not (isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)):
            raise MlxRlError(f"reward weights must be finite numbers, got {w!r}")
    cache, used, rewards = {}, set(RESERVED_NAMES), []
    for spec, weight in zip(specs, weights):
        name, text, fn, verifier, params, takes_all, required = parse_spec(spec, cache)
        unique, k = name, 2
        while unique in used:
            unique, k = f"{name}_{k}", k + 1
        used.add(unique)
        rewards.append(Reward(unique, text, fn, float(weight), verifier, params, takes_all, required))
    return RewardSet(rewards)


@dataclasses.dataclass
class Scores:
    total: np.ndarray  # (B,) float32: the weighted sum of the values that are not None
    per_reward: dict  # name -> (B,) float64, unweighted, nan where the reward returned None
    names: list
    weights: list
    none_rows: int  # rows where every reward returned None (their total is 0)

    def metrics(self, prefix="reward"):
        """{"reward/mean", "reward/std", "reward/none_rows", "reward/<name>"}; a reward's entry is its
        unweighted mean over the rows it applied to, left out when it applied to none."""
        if len(self.total) == 0:
            return {}
        out = {f"{prefix}/mean": float(self.total.mean()), f"{prefix}/std": float(self.total.std()),
               f"{prefix}/none_rows": self.none_rows}
        for name in self.names:
            v = self.per_reward[name]
            applied = ~np.isnan(v)
            if applied.any():
                out[f"{prefix}/{name}"] = float(v[applied].mean())
        return out

    @property
    def accuracy(self):
        """The mean of the first reward over the rows it applied to (eval/accuracy when it is a verifier),
        None when it applied to none."""
        v = self.per_reward[self.names[0]]
        applied = ~np.isnan(v)
        return float(v[applied].mean()) if applied.any() else None


class RewardSet:
    def __init__(self, rewards):
        self.rewards = rewards

    @property
    def names(self):
        return [r.name for r in self.rewards]

    def describe(self):
        """One line: "reward = 1 x exact + 0.1 x chars"."""
        return "reward = " + " + ".join(f"{r.weight:g} x {r.spec}" for r in self.rewards)

    def required_columns(self):
        """Columns the rewards need: the built-ins' (answer, or the column named), and the user functions'
        parameters beyond prompts/completions that have no default."""
        return {c for r in self.rewards for c in r.required}

    def check_columns(self, columns):
        """Raise a one-line MlxRlError if the data lacks a column a reward needs (run it before loading a model)."""
        have = set(columns) - {"prompt", "completion"}  # those two arrive as prompts= and completions=
        for r in self.rewards:
            for c in r.required:
                if c not in have:
                    hint = " (TRL's names are 'prompts' and 'completions')" if c in ("prompt", "completion") else ""
                    raise MlxRlError(f"reward {r.label} needs column '{c}'{hint}, which the data does not have "
                                     f"(its columns: {', '.join(sorted(have)) or 'none besides the prompt'})")

    def is_verifier(self):
        """Is the first reward a 0/1 verifier (see the module docstring), so that its mean is an accuracy?"""
        r = self.rewards[0]
        if r.verifier is not None:
            return r.verifier
        return r.seen_values and not r.seen_non_binary

    def score(self, prompts, completions, columns=None, conversational=None, completion_ids=None, where=None):
        """Score B completions with every reward -> Scores.

        prompts: B strings or B message lists. completions: B strings (the sampled text), or B message lists.
        columns: {name: list of B values}, the dataset's other columns. conversational: pass completions as
        [{"role": "assistant", "content": text}] lists, TRL's convention for conversational prompts
        (default: when the prompts are message lists). completion_ids: passed on when given (TRL does).
        where: B "file:line" locations, for error messages.
        """
        B = len(completions)
        columns = {k: list(v) for k, v in (columns or {}).items() if k not in ("prompt", "completion", *CALL_KEYWORDS)}
        for k, v in columns.items():
            if len(v) != B:
                raise ValueError(f"score: column '{k}' has {len(v)} values for {B} completions")
        if len(prompts) != B or (where is not None and len(where) != B):
            raise ValueError(f"score: {len(prompts)} prompts and {'no' if where is None else len(where)} locations for {B} completions")
        self.check_columns(columns)  # a clear line rather than a KeyError from inside a reward
        if conversational is None:
            conversational = B > 0 and isinstance(prompts[0], list)
        if conversational:
            completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
        keywords = {"prompts": list(prompts), "completions": list(completions), **columns}
        if completion_ids is not None:
            keywords["completion_ids"] = completion_ids

        per_reward, total, applied = {}, np.zeros(B), np.zeros(B, dtype=bool)
        for r in self.rewards:
            values = self.call(r, keywords, B, where)  # (B,) float64, nan for None
            per_reward[r.name] = values
            ok = ~np.isnan(values)
            total[ok] += r.weight * values[ok]
            applied |= ok
            if r.verifier is None and ok.any():
                r.seen_values = True
                r.seen_non_binary |= bool(np.any((values[ok] != 0) & (values[ok] != 1)))
        return Scores(total.astype(np.float32), per_reward, self.names, [r.weight for r in self.rewards], int((~applied).sum()))

    FAILING_ROW_TRIES = 8  # rows tried one at a time to name the failing one: a slow reward is not called B times

    @staticmethod
    def failing_row(r, kwargs, B):
        """After a batch call raised: call the function one row at a time, on the first few rows, to name the first
        row it fails on (None if none of them fails alone). Only on the error path: free in a healthy run."""
        for i in range(min(B, RewardSet.FAILING_ROW_TRIES)):
            one = {k: (v[i : i + 1] if isinstance(v, (list, tuple)) and len(v) == B else v) for k, v in kwargs.items()}
            try:
                r.fn(**one)
            except Exception:
                return i
        return None

    def call(self, r, keywords, B, where):
        def fail(problem, row=None):
            at = "" if row is None else f": row {row}" + (f" ({where[row]})" if where is not None else "")
            if row is not None and where is None and isinstance(keywords["prompts"][row], str):
                at += f" (prompt {keywords['prompts'][row][:40]!r})"
            raise MlxRlError(f"reward {r.label}{at}: {problem}")

        kwargs = keywords if r.takes_all else {k: v for k, v in keywords.items() if k in r.params}
        error = None
        try:
            out = r.fn(**kwargs)
        except RowError as e:
            error = (e.problem, e.row)
        except Exception as e:
            error = (f"raised {exception_line(e)}", self.failing_row(r, kwargs, B))
        if error:  # raised outside the except block, so no chained traceback comes with it
            fail(*error)
        if isinstance(out, np.ndarray):
            if out.ndim != 1:
                fail(f"returned an array of shape {out.shape}, expected a list of {B} numbers")
            out = out.tolist()
        elif not isinstance(out, (list, tuple)):
            fail(f"returned {type(out).__name__}, expected a list of {B} numbers (or None)")
        if len(out) != B:
            fail(f"returned {len(out)} values for {B} completions")
        values = np.full(B, np.nan)
        for i, v in enumerate(out):
            if v is None:
                continue
            if not isinstance(v, (numbers.Real, np.bool_)):
                fail(f"returned {v!r:.60} ({type(v).__name__}), expected a number or None", i)
            if not math.isfinite(v):
                fail(f"returned {v}, expected a finite number", i)
            values[i] = float(v)
        return values
