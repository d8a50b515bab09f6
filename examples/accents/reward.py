"""Rewards for the accents example, in TRL's signature: fn(prompts, completions, **columns) -> list[float | None].

`answer` is a column of the data (the right capitals), so it arrives as a keyword
list, one value per completion. A completion is a string, or for a chat prompt
TRL's conversational form [{"role": "assistant", "content": text}]: both work.

    --reward examples/accents/reward.py:correct --reward examples/accents/reward.py:accents --reward-weights 1,0.5

`correct` comes first because it is a 0/1 verifier: its mean is the accuracy
that evaluation reports. `accents` is partial credit, so that an answer with
two accents of three right beats one with none.
"""


def text(completion):
    """The completion's text: the string, or the content of its last message (conversational data)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct(completions, answer, **kwargs):
    """1.0 when the completion is exactly the right capitals (spaces around it ignored), else 0.0."""
    return [float(text(c).strip() == a) for c, a in zip(completions, answer)]


def accents(completions, answer, **kwargs):
    """The share of the answer's accented capitals (É, È, Ç, ...) that the completion writes in their place.

    None for a word with no accent: this reward does not apply to it, so it is left
    out of that completion's total (and of this reward's mean), instead of counting as 0.
    """
    out = []
    for c, a in zip(completions, answer):
        wanted = [i for i, ch in enumerate(a) if not ch.isascii()]
        if not wanted:
            out.append(None)
            continue
        got = text(c).strip()
        out.append(sum(i < len(got) and got[i] == a[i] for i in wanted) / len(wanted))
    return out
