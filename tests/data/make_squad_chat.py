"""Writes t5lite/data/corpus/squad_chat/{train,validation}.jsonl: multi-turn chat conversations made of
the SQuAD v1.1 rows shipped in tests/data/excerpts (CC BY-SA 4.0, so these are too).

    python tests/data/make_squad_chat.py

Standard library only, deterministic. Each conversation takes up to three questions of one paragraph:
the first user turn gives the passage (the paragraph's sentences that hold the answers) and the first
question, each later user turn a further question, each assistant turn the first reference answer.
Every other conversation opens with a system turn. The splits are those of t5lite's squad_v1_1 task:
train and validation by article title (tests/data/excerpts/README.md: 41 and 7 articles).
"""

import hashlib
import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "tests", "data", "excerpts", "squad_v1.1", "dev-v1.1.json")
OUT_DIR = os.path.join(REPO, "t5lite", "data", "corpus", "squad_chat")
SPLITS = {"train": 0.8, "validation": 0.2}  # t5lite.data.downstream.SQUAD_SPLITS
QUESTIONS_PER_CONVERSATION = 3
SYSTEM = "Answer each question about the passage with a few words from it."


def hash_split(key: str) -> str:
    """t5lite.data.sources.hash_split, the split of t5lite's squad_v1_1 task for an article title."""
    point = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") / 2**64
    cumulative = 0.0
    for split, fraction in SPLITS.items():
        cumulative += fraction
        if point < cumulative:
            return split
    return next(reversed(SPLITS))


def sentences(context: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the context's sentences."""
    ends = [m.end() for m in re.finditer(r"[.!?]\"?(\s+|$)", context)]
    starts = [0, *ends[:-1]]
    return [(s, e) for s, e in zip(starts, ends, strict=True) if e > s]


def conversation(context: str, qas: list[dict], with_system: bool) -> dict:
    starts = [qa["answers"][0]["answer_start"] for qa in qas]
    passage = " ".join(context[s:e].strip() for s, e in sentences(context) if any(s <= a < e for a in starts))
    messages = [{"role": "system", "content": SYSTEM}] if with_system else []
    for i, qa in enumerate(qas):
        question = qa["question"].strip()
        messages.append({"role": "user", "content": f"Passage: {passage}\nQuestion: {question}" if i == 0
                         else question})
        messages.append({"role": "assistant", "content": qa["answers"][0]["text"].strip()})
    return {"messages": messages}


def main() -> None:
    with open(SOURCE, encoding="utf-8") as f:
        articles = json.load(f)["data"]
    out = {split: [] for split in SPLITS}
    for article in articles:
        for paragraph in article["paragraphs"]:
            qas = paragraph["qas"]
            for first in range(0, len(qas), QUESTIONS_PER_CONVERSATION):
                rows = out[hash_split(article["title"])]
                rows.append(conversation(paragraph["context"], qas[first:first + QUESTIONS_PER_CONVERSATION],
                                         with_system=len(rows) % 2 == 0))
    os.makedirs(OUT_DIR, exist_ok=True)
    for split, rows in out.items():
        with open(os.path.join(OUT_DIR, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{split}: {len(rows)} conversations, {sum(len(r['messages']) for r in rows)} messages")


if __name__ == "__main__":
    main()
