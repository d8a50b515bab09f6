"""Write this example's data: a pretraining corpus with a systematic mistake, and prompt files for RL.

The task: write a French-looking word in capitals, keeping its accents.

    "élève→"  ->  "ÉLÈVE"        "garçon→"  ->  "GARÇON"        "tomate→"  ->  "TOMATE"

The mistake: much French text drops the accents on capitals ("ELEVE", "GARCON"),
although French spelling keeps them. The corpus does what that text does: a
word with an accent (or a cedilla) is written without it with probability
--mistake-rate (0.75), drawn once per row. Words without accents are always
right. So a model that imitates the corpus learns to drop accents, and its
greedy accuracy settles near the share of words that have none (about 30%).

Files (seeded: the same --seed writes the same bytes):
    corpus.jsonl          {"prompt", "completion", "answer", "kind"} rows for `mlx-rl pretrain`
                          (completion: what the corpus says; answer: the right capitals)
    prompts/train.jsonl   {"prompt", "answer", "kind"} rows for GRPO / PPO / DPO
    prompts/valid.jsonl   held-out words, never in the corpus nor in prompts/train.jsonl

`kind` is "accents" or "plain": evaluation reports accuracy on each.

    python examples/accents/make_data.py            # writes next to this file
    python examples/accents/make_data.py --out DIR --corpus-rows 50000
"""

import argparse
import hashlib
import json
import random
import unicodedata
from pathlib import Path

ONSETS = ["b", "c", "d", "f", "g", "j", "l", "m", "n", "p", "r", "s", "t", "v", "ch", "gr", "tr", "pl", "br", "qu"]
VOWELS = ["a", "e", "i", "o", "u", "ou", "ai", "au", "eu"]
ACCENTED = ["é", "é", "é", "è", "ê", "à", "â", "î", "ô", "û", "ë", "ï"]  # é is the commonest, as in French
CODAS = ["", "", "", "r", "s", "n", "l", "t"]
PLAIN_SHARE = 0.3  # share of words with no accent: where the corpus's mistake can't happen
VALID_SHARE = 10  # percent of all words kept for validation (by a hash of the word)


def random_word(rng, accented):
    """2 or 3 syllables; with accented=True at least one vowel carries an accent (or a c before a, o, u a cedilla).
    One word in five starts with its vowel ("élève"), so a capital accent can come first."""
    while True:
        syllables = []
        for k in range(rng.choice([2, 2, 3])):
            onset = "" if k == 0 and rng.random() < 0.2 else rng.choice(ONSETS)
            vowel = rng.choice(ACCENTED) if accented and rng.random() < 0.4 else rng.choice(VOWELS)
            if onset == "c" and vowel[0] in "aou" and accented and rng.random() < 0.5:
                onset = "ç"
            syllables.append(onset + vowel + rng.choice(CODAS))
        word = "".join(syllables)
        if has_accent(word) == accented and 4 <= len(word) <= 10:
            return word


def strip_accents(text):
    """What the mistaken corpus writes: the letters without their accents or cedillas ("ÉLÈVE" -> "ELEVE")."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))


def has_accent(word):
    return strip_accents(word) != word


def is_valid_word(word):
    """The held-out split: a fixed hash of the word, so no word is on both sides."""
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "big") % 100 < VALID_SHARE


def row(word):
    return {"prompt": f"{word}→", "answer": word.upper(), "kind": "accents" if has_accent(word) else "plain"}


def distinct_words(rng, n, valid, exclude=()):
    """n distinct words from one side of the split, PLAIN_SHARE of them without accents."""
    seen, out = set(exclude), []
    while len(out) < n:
        word = random_word(rng, accented=rng.random() >= PLAIN_SHARE)
        if word in seen or is_valid_word(word) != valid:
            continue
        seen.add(word)
        out.append(word)
    return out


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder to write into (default: this one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-rows", type=int, default=20000)
    parser.add_argument("--train-prompts", type=int, default=2000)
    parser.add_argument("--valid-prompts", type=int, default=500)
    parser.add_argument("--mistake-rate", type=float, default=0.75,
                        help="share of the words with accents that the corpus writes without them")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    out = Path(args.out)
    corpus_words = distinct_words(rng, args.corpus_rows, valid=False)
    corpus = []
    for word in corpus_words:
        r = row(word)
        wrong = r["kind"] == "accents" and rng.random() < args.mistake_rate
        corpus.append({"prompt": r["prompt"], "completion": strip_accents(r["answer"]) if wrong else r["answer"], **r})
    write_jsonl(out / "corpus.jsonl", corpus)
    write_jsonl(out / "prompts" / "train.jsonl", [row(w) for w in distinct_words(rng, args.train_prompts, valid=False)])
    write_jsonl(out / "prompts" / "valid.jsonl", [row(w) for w in distinct_words(rng, args.valid_prompts, valid=True)])
    print(f"wrote {out / 'corpus.jsonl'} ({len(corpus)} rows), {out / 'prompts'}/train.jsonl ({args.train_prompts}), "
          f"valid.jsonl ({args.valid_prompts})")


if __name__ == "__main__":
    main()
