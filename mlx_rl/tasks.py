"""Verifiable tasks: generated data, a reward that parses (never evaluates) text, and accuracy.

A task gives the pretraining corpus, seeded and disjoint train / held-out
prompts, `reward(prompt, completion)` and `is_correct(prompt, completion)`.

The corpus is imperfect on purpose, like human data. In `addition`, an example
that needs a carry is written with the carry forgotten with probability
`mistake_rate` (default 0.75, drawn afresh every time a problem is sampled). A
model that imitates the corpus perfectly learns the mistake: its greedy answer
to a carry problem is the wrong one, so held-out accuracy settles near the
share of problems without a carry (about 30% for two digits), while sampling
at temperature 1 still finds the right answer now and then. Imitation cannot
get past that plateau; a reward can. That is what the RL chapters show.

Formats (chosen because a 1M-parameter model learns them in a minute):
  addition  "07+45=" -> "250"    operands zero-padded, sum written units first
                                 (reversed), the order in which carries are made
  sort      "sort:53913=" -> "13359"   the corpus drops repeated digits ("1359")
"""

import numpy as np

from mlx_rl.config import MlxRlError

HELD_OUT_PERCENT = 10  # share of the problem space kept out of training


def mix(x):
    """A fixed integer hash (splitmix64), used to split problems into train / held-out."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Task:
    """Base class: subclasses define problem sampling, the right answer and the corpus mistake."""

    name = ""
    description = ""

    def __init__(self, mistake_rate=0.75):
        if not 0.0 <= mistake_rate <= 1.0:
            raise MlxRlError(f"mistake_rate must be in [0, 1], got {mistake_rate}")
        self.mistake_rate = mistake_rate

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

    def parse(self, prompt):
        raise NotImplementedError

    @property
    def max_new_tokens(self):
        raise NotImplementedError

    # --- shared ---
    def is_held_out(self, problem):
        return mix(self.problem_id(problem)) % 100 < HELD_OUT_PERCENT

    def prompts(self, split, n, seed):
        """n distinct prompts from one split ("train" or "heldout"), reproducible from seed."""
        want_held_out = split == "heldout"
        rng = np.random.default_rng([seed, 1 if want_held_out else 0])
        seen, out = set(), []
        for _ in range(200 * n):
            p = self.random_problem(rng)
            if self.is_held_out(p) != want_held_out:
                continue
            key = self.problem_id(p)
            if key in seen:
                continue
            seen.add(key)
            out.append(self.prompt(p))
            if len(out) == n:
                return out
        return out

    def train_problem(self, rng):
        """A random problem from the train split (never a held-out one)."""
        while True:
            p = self.random_problem(rng)
            if not self.is_held_out(p):
                return p

    def corpus_example(self, rng):
        """One (prompt, completion) pair of pretraining text, from the train split, mistakes included."""
        p = self.train_problem(rng)
        wrong = self.mistaken_answer(p)
        if wrong is not None and rng.random() < self.mistake_rate:
            return self.prompt(p), wrong
        return self.prompt(p), self.answer(p)

    def correct_completion(self, prompt):
        return self.answer(self.parse(prompt))

    def is_correct(self, prompt, completion):
        return completion.strip() == self.correct_completion(prompt)

    def reward(self, prompt, completion):
        """1 for an exact answer, plus 0.1 for each character in its right place."""
        target = self.correct_completion(prompt)
        got = completion.strip()
        partial = sum(a == b for a, b in zip(got, target)) / len(target)
        return float(got == target) + 0.1 * len(target) * partial

    def has_mistake(self, prompt):
        """Does the corpus's mistake apply to this prompt? (for per-kind accuracy)"""
        return self.mistaken_answer(self.parse(prompt)) is not None


class Addition(Task):
    name = "addition"
    description = "a+b with zero-padded operands; the sum is written units first; the corpus forgets carries"

    def __init__(self, digits=2, mistake_rate=0.75):
        super().__init__(mistake_rate)
        if not 1 <= digits <= 6:
            raise MlxRlError(f"addition digits must be between 1 and 6, got {digits}")
        self.digits = digits

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

    def parse(self, prompt):
        left, sep, rest = prompt.partition("+")
        right, eq, _ = rest.partition("=")
        if not (sep and eq and left.isdigit() and right.isdigit()):
            raise MlxRlError(f"not an addition prompt: {prompt!r}")
        return int(left), int(right)

    @property
    def max_new_tokens(self):
        return self.digits + 2  # the digits of the sum, and EOS


class Sort(Task):
    name = "sort"
    description = "sort a list of digits; the corpus writes repeated digits only once"

    def __init__(self, length=5, mistake_rate=0.75):
        super().__init__(mistake_rate)
        if not 2 <= length <= 12:
            raise MlxRlError(f"sort length must be between 2 and 12, got {length}")
        self.length = length

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

    def parse(self, prompt):
        if not (prompt.startswith("sort:") and prompt.endswith("=") and prompt[5:-1].isdigit()):
            raise MlxRlError(f"not a sort prompt: {prompt!r}")
        return tuple(int(d) for d in prompt[5:-1])

    @property
    def max_new_tokens(self):
        return self.length + 1


TASKS = {"addition": Addition, "sort": Sort}


def get_task(name, **kwargs):
    if name not in TASKS:
        raise MlxRlError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name](**kwargs)
