"""A calculator tool for a chat model: a user's environment, the way `--env examples/calculator/env.py:make` loads it.

The model may write <calc>EXPRESSION</calc>; its turn ends there (the stop string), the calculator's answer
comes back as a "tool" message ("[1665]", or "[error]" for what is not arithmetic), and the model goes on.
Any turn without a call is its final answer: the episode is solved when the last number in it is the row's
`answer`. The expression is read by mlx-rl's small arithmetic parser: the model's text is never eval'ed.

    mlx-rl grpo --model M --env examples/calculator/env.py:make --data examples/calculator/prompts --chat-template
"""

import re

from mlx_rl.data.envs import arithmetic

CALL = re.compile(r"<calc>(.*?)</calc>", re.S)


class Calculator:
    stop = ["</calc>"]  # a call ends the model's turn: the tool answers before it goes on
    role = "tool"  # the chat role of the tool's answers

    def __init__(self, row):
        self.answer = int(row["answer"])
        self.solved = False
        self.info = {"tool_calls": 0, "tool_errors": 0}  # logged as env/tool_calls, env/tool_errors

    def reset(self):
        return ""  # the question is the row's prompt: nothing to add

    def step(self, text):
        call = CALL.search(text)
        if call:
            self.info["tool_calls"] += 1
            value = arithmetic(call.group(1))
            if value is None:
                self.info["tool_errors"] += 1
                return "[error]", 0.0, False
            return f"[{value}]", 0.0, False
        numbers = re.findall(r"-?\d+", text.replace(",", ""))
        self.solved = bool(numbers) and int(numbers[-1]) == self.answer  # strict: the final number
        return None, float(self.solved), True


def make(row):
    return Calculator(row)


make.max_turns = 3  # a call, perhaps a second, and the answer
make.max_turn_tokens = 32
