"""Deduplication and contamination checks for text corpora.

    python -m t5lite.data.dedup --input=corpus.txt[.gz] --output=deduped.txt --mode=near
    python -m t5lite.data.dedup --contamination --train_task=wikitext2_lm --eval_task=wikitext2_lm:validation

Exact mode drops documents whose normalised text (NFKC, lower case, whitespace collapsed) was
seen before. Near mode finds documents whose word-shingle Jaccard similarity is at least
`threshold` with MinHash signatures and LSH banding, and keeps the first of each cluster.
The contamination check (t5lite.data.contamination) reports, per eval set, the percentage of
examples sharing at least one word n-gram (13 words, as in GPT-3) with the training corpus, and
the percentage of their n-grams that occur in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

from t5lite.data import documents as documents_lib
from t5lite.data.contamination import contamination_of_tasks
from t5lite.data.ngrams import MERSENNE_31, stable_hash31, word_ngrams
from t5lite.errors import UserError, reports_user_errors


def normalize(text: str) -> str:
    """The text two documents must share to count as exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_duplicate_mask(documents: Sequence[str]) -> np.ndarray:
    """bool [num_documents], True where a document repeats an earlier one after normalize()."""
    seen: set[bytes] = set()
    mask = np.zeros(len(documents), bool)
    for i, doc in enumerate(documents):
        key = hashlib.blake2b(normalize(doc).encode("utf-8"), digest_size=16).digest()
        mask[i] = key in seen
        seen.add(key)
    return mask


class MinHasher:
    """MinHash over word shingles: signature[j] = min over shingles of (a_j * h + b_j) mod p."""

    def __init__(self, num_permutations: int = 128, shingle_words: int = 5, seed: int = 0):
        self.num_permutations = num_permutations
        self.shingle_words = shingle_words
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, MERSENNE_31, num_permutations, dtype=np.uint64)
        self._b = rng.integers(0, MERSENNE_31, num_permutations, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """uint64 [num_permutations]; all-max for a text without words (never matches)."""
        hashes = np.array([stable_hash31(s) for s in set(word_ngrams(text, self.shingle_words))], np.uint64)
        if hashes.size == 0:
            return np.full(self.num_permutations, MERSENNE_31, np.uint64)
        # [shingles, permutations]; a * h < 2^62, so no uint64 overflow before the modulus.
        return ((hashes[:, None] * self._a[None] + self._b[None]) % MERSENNE_31).min(axis=0)


def near_duplicate_mask(
    documents: Sequence[str], *, threshold: float = 0.8, num_bands: int = 16, hasher: MinHasher | None = None
) -> np.ndarray:
    """bool [num_documents], True for documents with a near-duplicate earlier in the list.

    Candidates share a band (num_permutations / num_bands signature rows) in an LSH table;
    a candidate pair counts if its estimated Jaccard similarity is >= threshold.
    """
    hasher = hasher or MinHasher()
    if hasher.num_permutations % num_bands:
        raise UserError(f"num_permutations={hasher.num_permutations} must be a multiple of num_bands={num_bands}.")
    rows = hasher.num_permutations // num_bands
    signatures = np.stack([hasher.signature(d) for d in documents]) if documents else np.zeros((0, 1))
    first_of_cluster = np.arange(len(documents))  # union-find parent
    buckets: dict[tuple[int, bytes], list[int]] = {}

    def root(i: int) -> int:
        while first_of_cluster[i] != i:
            first_of_cluster[i] = first_of_cluster[first_of_cluster[i]]
            i = first_of_cluster[i]
        return i

    for i, sig in enumerate(signatures):
        if sig[0] == MERSENNE_31:  # no words: cannot be a near duplicate
            continue
        for band in range(num_bands):
            key = (band, sig[band * rows : (band + 1) * rows].tobytes())
            for j in buckets.setdefault(key, []):
                if root(i) != root(j) and np.mean(signatures[j] == sig) >= threshold:
                    a, b = sorted((root(i), root(j)))
                    first_of_cluster[b] = a  # the earlier document stays the representative
            buckets[key].append(i)
    return np.array([root(i) != i for i in range(len(documents))], bool)


def deduplicate(documents: Sequence[str], *, mode: str, threshold: float = 0.8) -> tuple[list[str], dict]:
    """(kept documents in order, report) for mode "exact" or "near" (near also drops exact dups)."""
    if mode not in ("exact", "near"):
        raise UserError(f"mode={mode!r}; choose 'exact' or 'near'.")
    exact = exact_duplicate_mask(documents)
    dropped = exact.copy()
    near_count = 0
    if mode == "near":
        remaining = [i for i in range(len(documents)) if not exact[i]]
        near = near_duplicate_mask([documents[i] for i in remaining], threshold=threshold)
        for i, is_dup in zip(remaining, near, strict=True):
            dropped[i] |= is_dup
        near_count = int(near.sum())
    kept = [d for d, drop in zip(documents, dropped, strict=True) if not drop]
    report = {
        "mode": mode, "documents": len(documents), "kept": len(kept),
        "exact_duplicates": int(exact.sum()), "near_duplicates": near_count,
        "percent_removed": 100.0 * (len(documents) - len(kept)) / max(len(documents), 1),
        "characters_in": sum(map(len, documents)), "characters_kept": sum(map(len, kept)),
    }
    if mode == "near":
        report["threshold"] = threshold
    return kept, report


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], help="text file(s), .gz allowed (dedup mode)")
    parser.add_argument("--output", help="where the kept documents go (dedup mode)")
    parser.add_argument("--report", help="JSON report path (default: print only)")
    parser.add_argument("--mode", default="exact", choices=["exact", "near"])
    parser.add_argument("--threshold", type=float, default=0.8, help="near mode: Jaccard similarity")
    parser.add_argument("--separator", default="line", choices=["line", "blank_line"])
    parser.add_argument("--contamination", action="store_true", help="n-gram overlap of eval sets vs a train set")
    parser.add_argument("--train_task", help="contamination: training task or mixture (its 'train' split)")
    parser.add_argument("--eval_task", action="append", default=[], help="contamination: TASK[:SPLIT] (repeatable)")
    parser.add_argument("--ngram", type=int, default=13)
    args = parser.parse_args(argv)
    report = _run_contamination(args) if args.contamination else _run_dedup(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    return 0


def _run_dedup(args) -> dict:
    if not args.input or not args.output:
        raise UserError("Dedup mode needs --input=FILE (repeatable) and --output=FILE.")
    documents = [d for path in args.input for d in documents_lib.read_documents(path, separator=args.separator)]
    kept, report = deduplicate(documents, mode=args.mode, threshold=args.threshold)
    joiner = "\n\n" if args.separator == "blank_line" else "\n"
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(joiner.join(kept) + "\n")
    return {"inputs": args.input, "output": args.output, **report}


def _run_contamination(args) -> dict:
    if not args.train_task or not args.eval_task:
        raise UserError("Contamination mode needs --train_task=NAME and --eval_task=NAME[:SPLIT].")
    results = []
    for spec in args.eval_task:
        name, _, split = spec.partition(":")
        for r in contamination_of_tasks(args.train_task, name, split or "validation", n=args.ngram).values():
            results.append({**dataclasses.asdict(r), "percent_examples": round(r.percent_examples, 3),
                            "percent_ngrams": round(r.percent_ngrams, 3)})
    return {"train_task": args.train_task, "ngram": args.ngram, "eval": results}


if __name__ == "__main__":
    sys.exit(main())
