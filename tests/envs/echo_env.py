"""A user's environment for the tests: two model turns, each answered with what the model wrote, reversed.

The episode is solved when the model's second turn contains the row's `answer`; each turn is paid 0.25 for
being short (at most 3 characters), so a learning signal exists even for a random model.
"""


class Echo:
    stop = ["!"]
    info_keys = ("echoes",)

    def __init__(self, row):
        self.answer = row.get("answer", "")
        self.turn = 0
        self.info = {"echoes": 0}

    def reset(self):
        return "go:"

    def step(self, text):
        self.turn += 1
        reward = 0.25 if len(text) <= 3 else 0.0
        if self.turn >= 2:
            self.solved = bool(self.answer) and self.answer in text
            return None, reward + float(self.solved), True
        self.info["echoes"] += 1
        return "<" + text[::-1] + ">", reward, False


def make(row):
    return Echo(row)


make.max_turns = 4
make.max_turn_tokens = 6
