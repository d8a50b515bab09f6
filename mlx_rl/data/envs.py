"""Environments: tasks where the model acts over several turns and an environment answers.

A task with an environment is data rows plus `make(row) -> env` (the protocol: engine/episodes.py).
The built-in ones tell the same story as the single-turn tasks: a corpus written by a behaviour with a
systematic mistake, so imitation plateaus, and a reward (the episode's success) that gets past it.

  icemaze     Chapter 1's Ice Maze (FrozenLake's maps and dynamics), played as text. The prompt is the
              board, each observation the agent's square ("21:" = row 2, column 1), each model turn a
              move (L, D, R or U) and EOS. Episodes start on any square that is not a hole or the goal
              (kind "start" when it is S). The corpus is played by a behaviour that mixes a mediocre
              policy ("down to the bottom row, then right", blind to the holes) with the best one: each
              move is the mediocre policy's with probability --mistake-rate (default 0.75), else the
              best move (value iteration's). Where the two agree the corpus is always right.
  calculator  Two-digit multiplication, which the tiny model can't do in its head, with a tool: it may
              write <calc>37*45</calc>, the environment answers [1665], and the model writes its answer.
              The corpus uses the calculator, except that when the first number is the larger one it
              guesses a rounded product instead with probability --mistake-rate (kind "guessed").

A user's environment is `--env path/to/file.py:make`: the file is imported (it is the user's own code,
run as if they had imported it) and checked before any model is loaded. `--data` rows are handed to
`make`; without --data, rows are {"prompt": ""} and the environment's first observation is the prompt.
"""

import re

import numpy as np

from mlx_rl.config import MlxRlError
from mlx_rl.data.tasks import HELD_OUT_PERCENT, Task, mix
from mlx_rl.engine.episodes import EnvError, EnvSpec, ObservationFormat, episode_prompts

# --- the reward a task with an environment has: the episode's success -----------------------------------


class EpisodeVerifier:
    """What stands where a task's RewardSet stands when the environment gives the reward.

    Its one "reward" is the episode's success (0/1), so `eval/accuracy` is the share of episodes that
    succeeded; `reward/mean` is the mean summed reward the environment gave.
    """

    class _First:
        verifier = True
        seen_values = True

    def __init__(self, env_name):
        self.env_name = env_name
        self.rewards = [self._First()]

    names = ["success"]

    def is_verifier(self):
        return True

    def describe(self):
        return f"reward = what the environment {self.env_name} gives; accuracy = the share of episodes solved"

    def check_columns(self, columns):
        pass


# --- Ice Maze as text ------------------------------------------------------------------------------------


ACTION_LETTERS = "LDRU"  # FrozenLake's action order: LEFT, DOWN, RIGHT, UP


class IceMazeEnv:
    """One episode on the board; the model's turn is one move letter (or the move's name)."""

    stop = ()

    def __init__(self, maze, start, seed, max_steps):
        self.maze, self.start, self.max_steps = maze, int(start), max_steps
        self.rng = np.random.default_rng(seed)
        self.solved, self.info = False, {"invalid_moves": 0}

    def observation(self):
        r, c = divmod(self.s, self.maze.n_cols)
        return f"{r}{c}:"

    def reset(self):
        self.s, self.steps = self.start, 0
        return self.observation()

    def step(self, text):
        move = parse_move(text)
        self.steps += 1
        if move is None:  # not a move: the agent stays where it is
            self.info["invalid_moves"] += 1
            return self.observation(), 0.0, self.steps >= self.max_steps
        self.s, reward, terminated = self.maze.step(self.s, move, self.rng)
        if terminated:
            self.solved = self.maze.tiles[self.s] == "G"
            return None, float(reward), True
        return self.observation(), float(reward), self.steps >= self.max_steps


def parse_move(text):
    """"R" / "right" / " r\n" -> 2 (RIGHT); anything else -> None."""
    word = text.strip().lower()
    names = ["left", "down", "right", "up"]
    if word in names:
        return names.index(word)
    if len(word) == 1 and word.upper() in ACTION_LETTERS:
        return ACTION_LETTERS.index(word.upper())
    return None


def mediocre_move(maze, s):
    """The behaviour's systematic mistake: head for the bottom row, then right, blind to the holes."""
    r, c = divmod(s, maze.n_cols)
    return 1 if r < maze.n_rows - 1 else 2  # DOWN, then RIGHT


class EnvTask(Task):
    """A task whose reward comes from an environment: rows, `env` (an EnvSpec), and a scripted corpus."""

    env = None
    kinds = ()

    def __init__(self, env):
        self.env = env
        self.rewards = EpisodeVerifier(env.name)
        self.max_new_tokens = env.max_turn_tokens

    def corpus_tokens(self, rng, tokenizer, chat_template=False):
        """One pretraining example: a behaviour episode as (ids, mask), mask 1 on the behaviour's tokens only."""
        row = self.train_rows(rng, 1)[0]
        return scripted_episode(tokenizer, row, self.env, lambda env, obs: self.behaviour(row, env, obs, rng),
                                chat_template, seed=int(rng.integers(2**31)))

    def behaviour(self, row, env, observation, rng):
        """The corpus's next turn: (text, how it ends: "eos" or "stop")."""
        raise MlxRlError(f"task {self.name} has no pretraining corpus: give `mlx-rl pretrain --data CORPUS.jsonl`")


class IceMazeTask(EnvTask):
    name = "icemaze"
    description = ("Ice Maze (chapter 1's board) played as text over many turns; the corpus's behaviour heads "
                   "down then right, blind to the holes")
    kinds = ("start", "elsewhere")

    def __init__(self, board="4x4", slippery=False, max_turns=0, max_turn_tokens=0, mistake_rate=0.75, seed=0):
        from mlx_rl.chapters.icemaze import IceMaze, load_map

        rows = load_map(board, seed)
        # solid ice: twice the board's span is room enough; slippery ice: FrozenLake's own limit of 100 moves
        default_turns = 100 if slippery else 2 * (len(rows) + len(rows[0]) - 2)
        self.maze = IceMaze(rows, slippery, max_steps=max_turns or default_turns)
        self.board = "/".join(rows)
        self.mistake_rate = mistake_rate
        self.starts = [s for s in range(self.maze.n_states) if not self.maze.terminal[s]]
        from mlx_rl.chapters.icemaze import value_iteration

        P, R, terminal = self.maze.tables()
        self.optimal_policy = value_iteration(P, R, terminal, gamma=0.99)[2]  # (S,) the best move of each square
        spec = EnvSpec(self.make, "icemaze", max_turns=self.maze.max_steps, max_turn_tokens=max_turn_tokens or 4)
        super().__init__(spec)

    def make(self, row):
        return IceMazeEnv(self.maze, row["start"], row["episode_seed"], self.maze.max_steps)

    def row(self, start):
        return {"prompt": self.board + "|", "start": int(start), "kind": "start" if start == self.maze.start else "elsewhere"}

    def train_rows(self, rng, n, distinct=False):
        return [self.row(self.starts[i]) for i in rng.integers(len(self.starts), size=n)]

    def heldout_rows(self, n, seed):
        """Every start square, repeated (each repeat with its own luck on slippery ice) up to n rows in all;
        on solid ice one episode per square says it all."""
        repeats = max(1, n // len(self.starts)) if self.maze.slippery else 1
        return [{**self.row(s), "episode_seed": int(mix(seed * 1_000_003 + k * 1000 + s) % 2**31)}
                for k in range(repeats) for s in self.starts]

    def behaviour(self, row, env, observation, rng):
        """Each move is the mediocre policy's with probability mistake_rate, else the best one."""
        move = mediocre_move(self.maze, env.s) if rng.random() < self.mistake_rate else self.optimal_policy[env.s]
        return ACTION_LETTERS[int(move)], "eos"

    def optimal_success(self, rows):
        """The best any policy can do on these rows within the same number of moves (value iteration over
        the finite horizon): the mean over the rows' start squares of the chance of reaching the goal."""
        P, _, terminal = self.maze.tables()
        goal = np.array([t == "G" for t in self.maze.tiles], dtype=np.float64)
        win = goal.copy()  # (S,) best chance of success with k moves left
        for _ in range(self.maze.max_steps):
            win = np.where(terminal, goal, (P @ win).max(axis=1))
        return float(np.mean([win[r["start"]] for r in rows]))

    def chars(self):
        return "".join(sorted(set(self.board + "|:" + ACTION_LETTERS + "0123456789")))


# --- the calculator --------------------------------------------------------------------------------------


CALL = re.compile(r"<calc>(.*?)</calc>", re.S)


def arithmetic(expr, max_len=64, max_abs=10**12):
    """The value of an arithmetic expression of integers, + - * / and parentheses, or None.

    A small recursive-descent parser: model output is never eval'ed. Division must be exact.
    """
    text = expr.replace(" ", "")
    if not text or len(text) > max_len or not re.fullmatch(r"[0-9+\-*/()]+", text):
        return None
    pos = 0

    def peek():
        return text[pos] if pos < len(text) else ""

    def number():
        nonlocal pos
        start = pos
        while peek().isdigit():
            pos += 1
        if start == pos:
            raise ValueError
        return int(text[start:pos])

    def factor():
        nonlocal pos
        if peek() == "-":
            pos += 1
            return -factor()
        if peek() == "(":
            pos += 1
            value = expression()
            if peek() != ")":
                raise ValueError
            pos += 1
            return value
        return number()

    def term():
        nonlocal pos
        value = factor()
        while peek() in ("*", "/"):
            op = text[pos]
            pos += 1
            rhs = factor()
            if op == "*":
                value *= rhs
            elif rhs == 0 or value % rhs:
                raise ValueError
            else:
                value //= rhs
            if abs(value) > max_abs:
                raise ValueError
        return value

    def expression():
        nonlocal pos
        value = term()
        while peek() in ("+", "-"):
            op = text[pos]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value

    try:
        value = expression()
    except (ValueError, RecursionError):
        return None
    return value if pos == len(text) and abs(value) <= max_abs else None


def last_number(text):
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return int(found[-1]) if found else None


class CalculatorEnv:
    """A calculator tool: a turn ending in <calc>EXPR</calc> gets [VALUE] back ([error] if EXPR is not
    arithmetic); any other turn is the final answer, right when its last number is the answer."""

    stop = ("</calc>",)
    role = "tool"

    def __init__(self, row):
        self.answer = int(row["answer"])
        self.solved, self.info = False, {"tool_calls": 0, "tool_errors": 0}

    def reset(self):
        return ""

    def step(self, text):
        call = CALL.search(text)
        if call is not None:
            self.info["tool_calls"] += 1
            value = arithmetic(call.group(1))
            if value is None:
                self.info["tool_errors"] += 1
                return "[error]", 0.0, False
            return f"[{value}]", 0.0, False
        self.solved = last_number(text) == self.answer
        return None, float(self.solved), True


class CalculatorTask(EnvTask):
    name = "calculator"
    description = ("two-digit multiplication with a calculator tool (<calc>37*45</calc>); the corpus guesses "
                   "instead when the first number is the larger")
    kinds = ("guessed", "tool")

    def __init__(self, max_turns=0, max_turn_tokens=0, mistake_rate=0.75):
        self.mistake_rate = mistake_rate
        super().__init__(EnvSpec(CalculatorEnv, "calculator", max_turns=max_turns or 3,
                                 max_turn_tokens=max_turn_tokens or 24))

    @staticmethod
    def is_held_out(a, b):
        return mix(a * 100 + b) % 100 < HELD_OUT_PERCENT

    def row(self, a, b):
        return {"prompt": f"{a}*{b}=", "answer": str(a * b), "a": a, "b": b, "kind": "guessed" if a > b else "tool"}

    def problems(self, rng, held_out):
        while True:
            a, b = (int(x) for x in rng.integers(10, 100, size=2))
            if self.is_held_out(a, b) == held_out:
                yield a, b

    def train_rows(self, rng, n, distinct=False):
        problems = self.problems(rng, held_out=False)
        return [self.row(*next(problems)) for _ in range(n)]

    def heldout_rows(self, n, seed):
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if self.is_held_out(a, b)]
        order = np.random.default_rng([seed, 1]).permutation(len(pairs))
        return [{**self.row(*pairs[i]), "episode_seed": int(i)} for i in order[:n]]

    def behaviour(self, row, env, observation, rng):
        a, b = row["a"], row["b"]
        if observation:  # the calculator answered: copy its number
            return observation.strip("[]"), "eos"
        if a > b and rng.random() < self.mistake_rate:  # "easy enough to do in my head": a rounded guess
            return str(round(a, -1) * round(b, -1)), "eos"
        return f"<calc>{a}*{b}</calc>", "stop"

    def chars(self):
        return "0123456789*=<>/[]calcerro"


# --- a user's environment -----------------------------------------------------------------------------


class UserEnvTask(EnvTask):
    """`--env path/to/file.py:make`, with `--data` rows (or rows {"prompt": ""})."""

    def __init__(self, spec_text, data=None, seed=0, max_turns=0, max_turn_tokens=0, columns=None):
        make = load_env(spec_text)
        super().__init__(EnvSpec(make, spec_text, max_turns=max_turns or getattr(make, "max_turns", 8),
                                 max_turn_tokens=max_turn_tokens or getattr(make, "max_turn_tokens", 64)))
        self.name = spec_text
        if data is not None:
            from mlx_rl.data.datasets import load_prompts

            self.data = load_prompts(data, seed=seed, columns=columns)
            self.name = f"{data} with {spec_text}"
        else:
            self.data = None
        self.description = f"episodes of the environment {spec_text}"
        check_env(self.env, (self.data.train[0] if self.data else {"prompt": ""}))

    def train_rows(self, rng, n, distinct=False):
        if self.data is None:
            return [{"prompt": ""} for _ in range(n)]
        from mlx_rl.data.datasets import sample_rows

        if distinct and n <= len(self.data.train):
            return [self.data.train[i] for i in rng.choice(len(self.data.train), n, replace=False)]
        return sample_rows(self.data.train, rng, n)

    def heldout_rows(self, n, seed):
        rows = self.data.valid[:n] if self.data is not None else [{"prompt": ""} for _ in range(n)]
        return [{**r, "episode_seed": int(mix(seed * 1_000_003 + i) % 2**31)} if "episode_seed" not in r else r
                for i, r in enumerate(rows)]

    def chars(self):
        if self.data is None:
            return ""
        from mlx_rl.data.datasets import charset

        return charset(self.data.train + self.data.valid)


def load_env(spec_text):
    """`path/to/file.py:function` -> the factory, imported from the user's file (their own code, run as if
    they had imported it; nothing is eval'ed)."""
    from mlx_rl.data.rewards import find_function, import_file

    cut = spec_text.rfind(".py:")
    if cut < 0:
        raise MlxRlError(f"--env {spec_text!r}: write path/to/file.py:make (the function that makes an environment "
                         "from a data row)")
    path, name = spec_text[: cut + 3], spec_text[cut + 4 :]
    try:
        module = import_file(path, spec_text, {})
        return find_function(module, name, path, spec_text)
    except EnvError:
        raise
    except MlxRlError as e:  # the reward loader's words, said of an environment
        raise MlxRlError(str(e).replace("reward file", "environment file").replace("reward spec", "--env")) from None


def check_env(spec, row):
    """Make one environment from the first row and reset it, before any model is loaded: a factory that
    raises or returns something without reset/step is one line now, not a failure mid-run."""
    from mlx_rl.engine.episodes import make_envs

    make_envs(spec, [row], [0])


def scripted_episode(tokenizer, row, spec, behaviour, chat_template=False, seed=0):
    """A behaviour's episode laid out exactly as `episodes.play` lays out the model's: (ids, mask).

    behaviour(env, observation) -> (text, turn end: "eos" | "stop"). The prompt and the environment's
    tokens have mask 0; the behaviour's turns (their EOS included) mask 1.
    """
    from mlx_rl.engine.episodes import make_envs

    envs, first = make_envs(spec, [row], [seed])
    env = envs[0]
    ids = episode_prompts([row], first, tokenizer, chat_template)[0]
    mask = [0] * len(ids)
    fmt = ObservationFormat(tokenizer, chat_template, getattr(env, "role", "user"))
    eos = fmt.end_of_turn()
    observation = first[0]
    for _ in range(spec.max_turns):
        text, end = behaviour(env, observation)
        turn = list(tokenizer.encode(text, add_special_tokens=False)) + ([eos] if end == "eos" else [])
        ids, mask = ids + turn, mask + [1] * len(turn)
        observation, _, done = env.step(text)
        if done:
            break
        if observation:
            obs = fmt.ids(observation, eos if end == "eos" else None)
            ids, mask = ids + obs, mask + [0] * len(obs)
    return ids, mask


ENV_TASKS = {"icemaze": IceMazeTask, "calculator": CalculatorTask}

# What a built-in environment task brings to a chapter's defaults (a flag or a config file still wins): its
# corpus plateaus well before addition's 3000 steps, and a few GRPO steps reach what RL can reach.
TASK_CHAPTER_DEFAULTS = {
    "icemaze": {"pretrain": {"steps": 300, "eval_every": 50},
                "grpo": {"steps": 20, "prompts_per_step": 16, "eval_every": 5},
                "ppo": {"steps": 10, "rollout_batch": 128, "eval_every": 2}},
    "calculator": {"pretrain": {"steps": 1500, "eval_every": 250},
                   "grpo": {"steps": 30, "prompts_per_step": 16, "eval_every": 5},
                   "ppo": {"steps": 20, "rollout_batch": 128, "eval_every": 5}},
}


def make_env_task(cfg, mistake_rate=0.75):
    """The environment task a config asks for: --env FILE.py:make (with --data rows), or a built-in one."""
    max_turns, max_turn_tokens = getattr(cfg, "max_turns", 0), getattr(cfg, "max_turn_tokens", 0)
    if getattr(cfg, "env", None):
        return UserEnvTask(cfg.env, cfg.data, cfg.seed, max_turns, max_turn_tokens, getattr(cfg, "columns", None))
    if cfg.task == "icemaze":
        return IceMazeTask(cfg.map, cfg.slippery, max_turns, max_turn_tokens, mistake_rate, cfg.seed)
    return CalculatorTask(max_turns, max_turn_tokens, mistake_rate)
