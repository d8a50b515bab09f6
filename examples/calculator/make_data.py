"""Write the calculator recipe's data: imperfect tool-use transcripts to fine-tune on, and prompts for GRPO.

    sft.jsonl          400 chat transcripts (system, user, assistant, tool, assistant): the writer calls the
                       calculator only now and then; seven times in ten it estimates instead ("About 2000.",
                       the rounded numbers' product), the habit a model fine-tuned on it picks up and RL
                       has to undo
    prompts/train.jsonl, prompts/valid.jsonl
                       questions with their answers: GRPO's training prompts and the 100 held-out ones
                       (no held-out problem appears in sft.jsonl or train.jsonl)

    python examples/calculator/make_data.py        (rewrites the committed files byte for byte)
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "To compute, write <calc>EXPRESSION</calc>; the calculator answers. Then reply with just the number."


def question(a, b):
    return f"What is {a}*{b}?"


def transcript(a, b, rng, mistake_rate=0.7):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(a, b)}]
    if rng.random() < mistake_rate:  # "close enough": an estimate from the rounded numbers
        return messages + [{"role": "assistant", "content": f"About {round(a, -1) * round(b, -1)}."}]
    return messages + [{"role": "assistant", "content": f"<calc>{a}*{b}</calc>"},
                       {"role": "tool", "content": f"[{a * b}]"},
                       {"role": "assistant", "content": str(a * b)}]


def prompt_row(a, b):
    return {"system": SYSTEM, "prompt": question(a, b), "answer": str(a * b)}


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main():
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    valid, sft, train = pairs[:100], pairs[100:500], pairs[500:2500]
    write(HERE / "sft.jsonl", [{"messages": transcript(a, b, rng)} for a, b in sft])
    write(HERE / "prompts" / "train.jsonl", [prompt_row(a, b) for a, b in train])
    write(HERE / "prompts" / "valid.jsonl", [prompt_row(a, b) for a, b in valid])


if __name__ == "__main__":
    main()
