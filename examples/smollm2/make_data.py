"""Write two chat tasks for an instruction-tuned model (SmolLM2-135M-Instruct), as data for `mlx-rl grpo --data`.

    addition/   "What is 37+45? Answer with just the number."        answer 82
    larger/     "Which number is larger, 37 or 45? Answer with just the number."   answer 45

a and b are whole numbers from 0 to 99 (in `larger`, never equal). Each folder gets
train.jsonl and valid.jsonl with {"prompt", "answer", "kind"} rows; the prompt is a
plain string, sent through the model's chat template with --chat-template. A pair
(a, b) is on one side of the split only (a fixed hash of the task and the pair), so
the held-out questions were never trained on. `kind` splits the held-out accuracy:
addition "carry" / "no_carry" (do the units digits carry?), larger "first" / "second"
(which of the two is the larger: a model that always repeats one position scores
about 50% and shows up as 100% on one kind and 0% on the other).

The rows are seeded: the same --seed writes the same bytes. The reward is not here:
it is the built-in `lenient_numeric` (the number after the first "=", else the
first number: a chat model often writes "37 + 45 = 82") plus a small `format:REGEX`
term for answering with the number alone; see grpo.yaml and docs/real-model.md.

    python examples/smollm2/make_data.py                 # writes next to this file
    python examples/smollm2/make_data.py --out DIR --train 2000 --valid 200
"""

import argparse
import hashlib
import json
import random
from pathlib import Path

TASKS = {
    "addition": "What is {a}+{b}? Answer with just the number.",
    "larger": "Which number is larger, {a} or {b}? Answer with just the number.",
}
VALID_PERCENT = 20  # share of the (a, b) pairs kept for validation


def is_valid_pair(task, a, b):
    """The held-out split: a fixed hash of (task, a, b), so no question is on both sides."""
    digest = hashlib.blake2b(f"{task}:{a}:{b}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % 100 < VALID_PERCENT


def row(task, a, b):
    if task == "addition":
        answer, kind = a + b, "carry" if a % 10 + b % 10 >= 10 else "no_carry"
    else:
        answer, kind = max(a, b), "first" if a > b else "second"
    return {"prompt": TASKS[task].format(a=a, b=b), "answer": answer, "kind": kind}


def rows(task, rng, n, valid):
    """n distinct questions from one side of the split, in a random order."""
    pairs = [(a, b) for a in range(100) for b in range(100)
             if (task != "larger" or a != b) and is_valid_pair(task, a, b) == valid]
    if n > len(pairs):
        raise SystemExit(f"{task}: asked for {n} {'valid' if valid else 'train'} rows, the split has {len(pairs)}")
    return [row(task, a, b) for a, b in rng.sample(pairs, n)]


def write_jsonl(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder to write into (default: this one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="training questions per task")
    parser.add_argument("--valid", type=int, default=200, help="held-out questions per task (evaluation reads the "
                        "first --eval-prompts of them)")
    args = parser.parse_args()

    for task in TASKS:
        rng = random.Random(f"{args.seed}:{task}")
        folder = Path(args.out) / task
        write_jsonl(folder / "train.jsonl", rows(task, rng, args.train, valid=False))
        write_jsonl(folder / "valid.jsonl", rows(task, rng, args.valid, valid=True))
        print(f"wrote {folder}/train.jsonl ({args.train} rows), valid.jsonl ({args.valid})")


if __name__ == "__main__":
    main()
