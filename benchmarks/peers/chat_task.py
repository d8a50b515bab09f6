"""What the real-model peer benchmarks share: the chat prompts and the reward, in plain Python (no mlx-rl import).

The reward is the one bench_real_model.py gives mlx-rl: the built-in `lenient_numeric` (the number after the
first "=", else the first number, equal to the answer) + 0.1 x `format:^\\s*\\d+\\s*\\.?\\s*$` (the completion
is the number alone), written again here with the same regular expressions as mlx_rl/data/rewards.py, plus a
random tie-breaker below 0.001 so that no group is all-equal (mlx-rl skips the update of a step whose groups
all carry no signal; the peers never do, so without it mlx-rl could time a cheaper step).
"""

import json
import random
import re
from decimal import Decimal

NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")  # as mlx_rl/data/rewards.py
FORMAT = re.compile(r"^\s*\d+\s*\.?\s*$")
FORMAT_WEIGHT = 0.1


def read_rows(data, split="train"):
    """The rows of DATA/train.jsonl, or of DATA itself where it is a .jsonl file: {"prompt", "answer", ...}."""
    with open(data if str(data).endswith(".jsonl") else f"{data}/{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def text_of(completion):
    """A completion's text: a string, or TRL's conversational [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def lenient_number(text):
    m = NUMBER.search(text.split("=", 1)[-1])
    return Decimal(m.group().replace(",", "")) if m else None


def make_reward(seed=0):
    """reward(prompts, completions, answer, **kwargs) -> list of floats, TRL's signature (mlx-lm-lora's too)."""
    rng = random.Random(seed)

    def reward(prompts, completions, answer, **kwargs):
        out = []
        for completion, want in zip(completions, answer):
            text = text_of(completion)
            right = lenient_number(text) == Decimal(str(want))
            out.append(float(right) + FORMAT_WEIGHT * float(FORMAT.search(text) is not None) + 1e-3 * rng.random())
        return out

    return reward
