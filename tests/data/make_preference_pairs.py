"""Builds the shipped preference pairs (t5lite/data/corpus/preference/) from tiny Shakespeare.

    PYTHONPATH=. python tests/data/make_preference_pairs.py

A pair's prompt is a speaker's name and the first line of a speech; the chosen answer is the speech's
next line as Shakespeare wrote it, the rejected answer the same words in a shuffled order. The
preference is real (word order, not vocabulary: both answers hold the same tokens) and small models
learn it. Deterministic: the first qualifying speeches of each split, shuffles seeded by their index.
"""

from __future__ import annotations

import json
import os
import random

from t5lite.data import embedded_corpus

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "t5lite", "data", "corpus", "preference")
PAIRS = {"train": 512, "validation": 64}
MIN_WORDS, MAX_WORDS = 5, 10


def shuffled(words: list[str], rng: random.Random) -> list[str]:
    """The words in another order (the first order that differs)."""
    while True:
        out = rng.sample(words, len(words))
        if out != words:
            return out


def pairs(split: str, count: int) -> list[dict[str, str]]:
    out = []
    for document in embedded_corpus.tiny_shakespeare_documents(split):
        lines = document.split("\n")
        if len(lines) < 3 or not lines[0].endswith(":"):
            continue
        words = lines[2].split()
        if not MIN_WORDS <= len(words) <= MAX_WORDS or len(set(words)) < 3:
            continue
        rng = random.Random(len(out))
        out.append({"prompt": f"{lines[0]}\n{lines[1]}", "chosen": lines[2],
                    "rejected": " ".join(shuffled(words, rng))})
        if len(out) == count:
            break
    return out


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for split, count in PAIRS.items():
        rows = pairs(split, count)
        with open(os.path.join(OUT, f"tiny_shakespeare_{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{split}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
