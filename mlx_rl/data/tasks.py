"""Tasks: where prompts come from, how answers are rewarded, and what the pretraining corpus says.

A task is data plus rewards, and the built-in tasks are just the first users of
the mechanism a user's own task goes through:

    Task.train_rows(rng, n)      n training rows {"prompt", "answer", ...} (repeats allowed)
    Task.heldout_rows(n, seed)   held-out rows for evaluation, never trained on
    Task.rewards                 a RewardSet: TRL-style functions fn(prompts, completions, **columns)
    Task.corpus_example(rng)     one (prompt, completion) of pretraining text
    Task.max_new_tokens          the longest completion the RL chapters sample

The built-ins generate their data and pay `exact` (1 for the right answer) plus
0.1 x `chars` (0.1 per character in its right place). A user's task is
`--data PATH` (JSONL rows with a `prompt` and any columns their rewards need)
with `--reward SPEC` (a built-in reward, or `file.py:function`). Rows may carry a
`kind` column; evaluation then reports accuracy per kind (`eval/accuracy_<kind>`).

The built-in corpora are imperfect on purpose, like human data. In `addition`,
an example that needs a carry is written with the carry forgotten with
probability `mistake_rate` (default 0.75, drawn afresh every time a problem is
sampled). A model that imitates the corpus learns the mistake: its greedy
answer to a carry problem is the wrong one, so held-out accuracy settles near
the share of problems without a carry (about 30% for two digits), while
sampling at temperature 1 still finds the right answer now and then.
Imitation cannot get past that plateau; a reward can.

Formats (chosen because a 1M-parameter model learns them in a minute):
  addition  "07+45=" -> "250"    operands zero-padded, sum written units first
                                 (reversed), the order in which carries are made
  sort      "sort:53913=" -> "13359"   the corpus drops repeated digits ("1359")
"""

import dataclasses
import typing

import numpy as np

from mlx_rl.config import MlxRlError, option

HELD_OUT_PERCENT = 10  # share of a built-in task's problem space kept out of training


@dataclasses.dataclass
class TaskConfig:
    """The task fields every LLM command shares."""

    task: str = option("addition", "built-in task (see `mlx-rl tasks`); ignored with --data")
    data: typing.Optional[str] = option(None, "your own data: a JSONL, JSON, CSV or Parquet file, a folder with train.jsonl "
                                        "and valid.jsonl (or those formats), or a datasets.save_to_disk folder "
                                        "(see docs/your-own.md)")
    columns: typing.Optional[str] = option(None, "rename the data's columns to the ones mlx-rl reads, NAME=COLUMN, "
                                           "comma-separated: prompt=question,answer=solution")
    reward: typing.Tuple[str, ...] = option((), "reward: a built-in name (exact, numeric, lenient_numeric, chars, format:REGEX, "
                                            "length:N) or path/to/file.py:function; repeat for several (default: the task's own)")
    reward_weights: typing.Tuple[float, ...] = option((), "weights of the --reward functions, comma-separated (default: 1 each)")
    digits: int = option(2, "addition: operand digits (prompts and corpus)", min=1, max=6)
    sort_length: int = option(5, "sort: list length (prompts and corpus)", min=2, max=12)
    env: typing.Optional[str] = option(None, "your own environment: path/to/file.py:make, make(row) -> env with "
                                       "reset() and step(text) (see docs/agents.md); --data rows go to make")
    max_turns: int = option(0, "episodes: model turns per episode at most (0: the environment's own; icemaze "
                            "2 x (rows + columns - 2), 100 on slippery ice, calculator 3, --env 8)", min=0)
    max_turn_tokens: int = option(0, "episodes: tokens per model turn at most (0: the environment's own; icemaze 4, "
                                  "calculator 24, --env 64)", min=0)
    map: str = option("4x4", "icemaze: the board (4x4, 8x8, random:N, a map file, or rows like SFFF/FHFH/FFFH/HFFG)")
    slippery: bool = option(False, "icemaze: slippery ice (the intended move with probability 1/3, each "
                            "perpendicular one 1/3)")


def mix(x):
    """A fixed integer hash (splitmix64), used to split problems into train / held-out."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Task:
    """Data + rewards. Subclasses: BuiltinTask (a generator) and DataTask (the user's JSONL)."""

    name = ""
    description = ""
    rewards = None  # the task's own rewards: the verifier, what held-out evaluation reports
    training_rewards = None  # what the RL chapters train on, when not `rewards` (a learned reward model)
    eval_rewards = None  # what evaluation scores with, when more than `rewards` (the verifier + the reward model)
    max_new_tokens = 0

    def train_rows(self, rng, n, distinct=False):
        """n training rows drawn with `rng` (a numpy Generator); distinct: no prompt twice (as far as the data allows)."""
        raise NotImplementedError

    def heldout_rows(self, n, seed):
        raise NotImplementedError

    def corpus_example(self, rng):
        raise MlxRlError(f"task {self.name} has no pretraining corpus: give `mlx-rl pretrain --data CORPUS.jsonl`")

    def chars(self):
        """Every character of the task's text, for a new tiny model's vocabulary."""
        return ""

    def describe(self):
        return f"{self.name}: {self.description}"


# --- the built-in tasks: a generator, the built-in rewards, a corpus with a mistake -------------


class BuiltinTask(Task):
    """A generated task. Subclasses define problems, the right answer and the corpus's mistake."""

    reward_specs = ("exact", "chars")
    reward_weights = (1.0, 0.1)  # 1 for the exact answer + 0.1 per character in its right place

    def __init__(self, mistake_rate=0.75):
        if not 0.0 <= mistake_rate <= 1.0:
            raise MlxRlError(f"mistake_rate must be in [0, 1], got {mistake_rate}")
        self.mistake_rate = mistake_rate
        from mlx_rl.data.rewards import load_rewards

        self.rewards = load_rewards(list(self.reward_specs), list(self.reward_weights))

    # --- to define in subclasses ---
    def random_problem(self, rng):
        raise NotImplementedError

    def problem_id(self, problem):
        raise NotImplementedError

    def prompt(self, problem):
        raise NotImplementedError

    def answer(self, problem):
        raise NotImplementedError

    def mistaken_answer(self, problem):
        """The corpus's systematic mistake, or None where the mistake can't happen."""
        return None

    kinds = ("mistake", "other")  # the `kind` column: does the corpus's mistake apply to this problem?

    # --- shared ---
    def row(self, problem):
        kind = self.kinds[0] if self.mistaken_answer(problem) is not None else self.kinds[1]
        return {"prompt": self.prompt(problem), "answer": self.answer(problem), "kind": kind}

    def is_held_out(self, problem):
        return mix(self.problem_id(problem)) % 100 < HELD_OUT_PERCENT

    def train_problem(self, rng):
        """A random problem from the train split (never a held-out one)."""
        while True:
            p = self.random_problem(rng)
            if not self.is_held_out(p):
                return p

    def train_rows(self, rng, n, distinct=False):
        if distinct:
            return self.distinct_rows(rng, n, held_out=False)
        return [self.row(self.train_problem(rng)) for _ in range(n)]

    def heldout_rows(self, n, seed):
        """n distinct held-out rows, reproducible from seed."""
        return self.distinct_rows(np.random.default_rng([seed, 1]), n, held_out=True)

    def distinct_rows(self, rng, n, held_out):
        seen, out = set(), []
        for _ in range(200 * n):
            p = self.random_problem(rng)
            if self.is_held_out(p) != held_out or self.problem_id(p) in seen:
                continue
            seen.add(self.problem_id(p))
            out.append(self.row(p))
            if len(out) == n:
                break
        return out

    def corpus_example(self, rng):
        """One (prompt, completion) pair of pretraining text, from the train split, mistakes included."""
        p = self.train_problem(rng)
        wrong = self.mistaken_answer(p)
        if wrong is not None and rng.random() < self.mistake_rate:
            return self.prompt(p), wrong
        return self.prompt(p), self.answer(p)

    def chars(self):
        rng = np.random.default_rng(0)
        return "".join(sorted({c for r in self.train_rows(rng, 200) for c in r["prompt"] + r["answer"]}))


class Addition(BuiltinTask):
    name = "addition"
    description = "a+b with zero-padded operands; the sum is written units first; the corpus forgets carries"
    kinds = ("carry", "no_carry")

    def __init__(self, digits=2, mistake_rate=0.75):
        if not 1 <= digits <= 6:
            raise MlxRlError(f"addition digits must be between 1 and 6, got {digits}")
        self.digits = digits
        self.max_new_tokens = digits + 2  # the digits of the sum, and EOS
        super().__init__(mistake_rate)

    def random_problem(self, rng):
        hi = 10**self.digits
        return int(rng.integers(hi)), int(rng.integers(hi))

    def problem_id(self, problem):
        a, b = problem
        return a * 10**self.digits + b

    def prompt(self, problem):
        a, b = problem
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def write_sum(self, total):
        return f"{total:0{self.digits + 1}d}"[::-1]  # units first

    def answer(self, problem):
        return self.write_sum(problem[0] + problem[1])

    def mistaken_answer(self, problem):
        a, b = problem
        no_carry = sum(((a // 10**i + b // 10**i) % 10) * 10**i for i in range(self.digits))
        return None if no_carry == a + b else self.write_sum(no_carry)


class Sort(BuiltinTask):
    name = "sort"
    description = "sort a list of digits; the corpus writes repeated digits only once"
    kinds = ("repeats", "distinct")

    def __init__(self, length=5, mistake_rate=0.75):
        if not 2 <= length <= 12:
            raise MlxRlError(f"sort length must be between 2 and 12, got {length}")
        self.length = length
        self.max_new_tokens = length + 1  # the sorted list, and EOS
        super().__init__(mistake_rate)

    def random_problem(self, rng):
        return tuple(int(d) for d in rng.integers(10, size=self.length))

    def problem_id(self, problem):
        return int("".join(map(str, problem)))

    def prompt(self, problem):
        return "sort:" + "".join(map(str, problem)) + "="

    def answer(self, problem):
        return "".join(map(str, sorted(problem)))

    def mistaken_answer(self, problem):
        if len(set(problem)) == len(problem):
            return None
        return "".join(map(str, sorted(set(problem))))


BUILTIN = {"addition": Addition, "sort": Sort}


# --- the user's own task: JSONL rows + rewards -------------------------------------------------


class DataTask(Task):
    """Prompts from the user's JSONL (`--data`), scored by `--reward` functions."""

    def __init__(self, path, rewards, seed=0, max_new_tokens=64, columns=None):
        from mlx_rl.data.datasets import load_prompts

        self.data = load_prompts(path, seed=seed, columns=columns)
        self.name = str(path)
        self.description = self.data.describe()
        self.rewards = rewards
        self.max_new_tokens = max_new_tokens
        rewards.check_columns(self.data.columns)  # a reward's missing column: one line, before any model loads

    def train_rows(self, rng, n, distinct=False):
        from mlx_rl.data.datasets import sample_rows

        if distinct and n <= len(self.data.train):
            return [self.data.train[i] for i in rng.choice(len(self.data.train), n, replace=False)]
        return sample_rows(self.data.train, rng, n)

    def heldout_rows(self, n, seed):
        return self.data.valid[:n]

    def chars(self):
        from mlx_rl.data.datasets import charset

        return charset(self.data.train + self.data.valid)


class CorpusTask(Task):
    """A pretraining corpus from the user's JSONL (`pretrain --data`): text, prompt/completion or messages rows.

    Held-out evaluation needs prompts and a reward: with --reward, the held-out rows
    that have a prompt are evaluated (their other columns, e.g. `answer`, go to the
    reward); without one, pretraining reports its loss only.
    """

    def __init__(self, path, rewards, seed=0, max_new_tokens=64, columns=None):
        from mlx_rl.data.datasets import load_corpus

        self.data = load_corpus(path, seed=seed, columns=columns)
        self.name = str(path)
        self.description = self.data.describe()
        self.rewards = rewards
        self.max_new_tokens = max_new_tokens
        if rewards is not None:
            if self.data.format == "text":
                raise MlxRlError(f"--data {path}: a corpus of 'text' rows has no prompts to evaluate with --reward "
                                 "(use prompt/completion rows, or drop --reward)")
            rows = self.data.train + self.data.valid
            rewards.check_columns(set.intersection(*(set(r) for r in rows)) if rows else set())

    def corpus_example(self, rng):
        return self.corpus_example_of(self.data.train[int(rng.integers(len(self.data.train)))])

    @staticmethod
    def corpus_example_of(row):
        from mlx_rl.data.datasets import corpus_examples

        prompt, completion = corpus_examples([row])[0]
        if isinstance(prompt, list):  # chat rows: the conversation so far goes through the chat template
            prompt = {"prompt": prompt}
        return prompt, completion

    def corpus_tokens(self, rng, tokenizer, chat_template=False):
        """One pretraining example as (ids, mask): mask 1 on the tokens the loss covers.

        A chat row with several assistant turns (a tool-use transcript: assistant, tool, assistant) is laid
        out exactly as an episode's rollout is (`episodes.transcript_tokens`): every assistant turn trained,
        the other roles' messages between them not. Other rows: the prompt, then the completion and EOS.
        """
        from mlx_rl.engine.episodes import transcript_tokens
        from mlx_rl.engine.sampling import encode_prompts

        row = self.data.train[int(rng.integers(len(self.data.train)))]
        messages = row.get("messages")
        if messages is not None and sum(m["role"] == "assistant" for m in messages) > 1:
            return transcript_tokens(tokenizer, messages)
        prompt, completion = self.corpus_example_of(row)
        ids = encode_prompts(tokenizer, [prompt], chat_template)[0]
        answer = list(tokenizer.encode(completion, add_special_tokens=False)) + [tokenizer.eos_token_id]
        return ids + answer, [0] * len(ids) + [1] * len(answer)

    def heldout_rows(self, n, seed):
        if self.rewards is None:
            return []
        rows = []
        for r in self.data.valid[:n]:
            prompt = r.get("prompt") if "prompt" in r else r["messages"][:-1]
            rows.append({**{k: v for k, v in r.items() if k not in ("completion", "messages")}, "prompt": prompt})
        return rows

    def chars(self):
        from mlx_rl.data.datasets import charset

        return charset(self.data.train + self.data.valid)


def make_task(cfg, mistake_rate=0.75, corpus=False):
    """The task a config asks for: --data with --reward, or a built-in (whose rewards --reward may replace).

    Everything is checked here, before a model is loaded: the data file, the reward
    specs (a user's reward file is imported now), the columns the rewards need.
    """
    from mlx_rl.data.rewards import load_rewards

    if getattr(cfg, "env", None) or cfg.task in ENV_TASK_NAMES:
        return make_env_task_checked(cfg, mistake_rate, corpus)
    rewards = load_rewards(list(cfg.reward), list(cfg.reward_weights) or None) if cfg.reward else None
    if cfg.reward_weights and not cfg.reward:
        raise MlxRlError("--reward-weights needs --reward")
    if getattr(cfg, "data", None) and corpus:
        return CorpusTask(cfg.data, rewards, seed=cfg.seed, max_new_tokens=getattr(cfg, "max_new_tokens", 0) or 64,
                          columns=getattr(cfg, "columns", None))
    if getattr(cfg, "data", None):
        if rewards is None:
            raise MlxRlError(f"--data {cfg.data}: say how completions are scored with --reward (e.g. --reward exact, "
                             "or --reward my_reward.py:score)")
        return DataTask(cfg.data, rewards, seed=cfg.seed, max_new_tokens=getattr(cfg, "max_new_tokens", 0) or 64,
                        columns=getattr(cfg, "columns", None))
    task = get_task(cfg.task, digits=cfg.digits, sort_length=cfg.sort_length, mistake_rate=mistake_rate)
    if rewards is not None:
        rewards.check_columns({"prompt", "answer", "kind"})
        task.rewards = rewards
    return task


ENV_TASK_NAMES = ("icemaze", "calculator")  # built-in tasks with an environment (data/envs.py)


def make_env_task_checked(cfg, mistake_rate, corpus):
    """A task with an environment (data/envs.py), its options checked against the others given."""
    from mlx_rl.data.envs import make_env_task

    what = f"--env {cfg.env}" if getattr(cfg, "env", None) else f"--task {cfg.task}"
    if cfg.reward:
        raise MlxRlError(f"{what}: the environment gives the reward; drop --reward")
    if corpus and getattr(cfg, "env", None):
        raise MlxRlError(f"pretrain {what}: your environment has no corpus of its own; pretrain (or fine-tune) on "
                         "transcripts with --data CORPUS.jsonl, then train with the environment in grpo or ppo")
    if corpus and cfg.data:
        raise MlxRlError(f"pretrain --data {cfg.data}: a corpus of your own replaces the task's; drop --task {cfg.task}")
    return make_env_task(cfg, mistake_rate)


def get_task(name, digits=2, sort_length=5, mistake_rate=0.75):
    if name not in BUILTIN:
        raise MlxRlError(f"unknown task '{name}': the built-in tasks are {', '.join([*BUILTIN, *ENV_TASK_NAMES])}; "
                         "for your own, give --data FILE.jsonl --reward SPEC (see `mlx-rl tasks`)")
    if name == "addition":
        return Addition(digits=digits, mistake_rate=mistake_rate)
    return Sort(length=sort_length, mistake_rate=mistake_rate)
