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
from t5lite.data.ngrams import MERSENNE_31, word_ngrams
from t5lite.errors import UserError, reports_user_errors


def normalize(text: str) -> str:
    """The text two documents must share to count as exact duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_key(text: str) -> bytes:
    """16 bytes that two documents share exactly when they are exact duplicates (blake2b of normalize())."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def exact_duplicate_mask(documents: Sequence[str]) -> np.ndarray:
    """bool [num_documents], True where a document repeats an earlier one after normalize()."""
    seen: set[bytes] = set()
    mask = np.zeros(len(documents), bool)
    for i, doc in enumerate(documents):
        key = exact_key(doc)
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
        shingles = set(word_ngrams(text, self.shingle_words))
        if not shingles:
            return np.full(self.num_permutations, MERSENNE_31, np.uint64)
        # [shingles]: ngrams.stable_hash31 of each, its digests read as one array (not int by int).
        digests = b"".join([hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest() for s in shingles])
        hashes = np.frombuffer(digests, "<u8") % np.uint64(MERSENNE_31)
        # [shingles, permutations]; a * h < 2^62, so no uint64 overflow before the modulus.
        return ((hashes[:, None] * self._a[None] + self._b[None]) % np.uint64(MERSENNE_31)).min(axis=0)


NUM_BANDS = 16  # LSH bands of near_duplicate_mask: 128 permutations / 16 = 8 rows a band


def band_keys(signature: np.ndarray, num_bands: int = NUM_BANDS) -> list[tuple[int, bytes]]:
    """The LSH buckets of a signature [num_permutations]: (band, its rows as bytes) per band."""
    rows = len(signature) // num_bands
    return [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(num_bands)]


def is_near_duplicate(signature: np.ndarray, other: np.ndarray, threshold: float) -> bool:
    """Estimated Jaccard similarity (agreeing signature rows) >= threshold."""
    return bool(np.mean(signature == other) >= threshold)


def has_words(signature: np.ndarray) -> bool:
    """False for the signature of a text without words (MinHasher.signature), which matches nothing."""
    return bool(signature[0] != MERSENNE_31)


class Clusters:
    """Union-find over document ids that orders as the corpus does: each cluster's root is its smallest
    id, the document that stays. Ids are any mutually comparable values (indices, (file, line) pairs)."""

    def __init__(self):
        self._parent: dict = {}

    def root(self, i):
        parent = self._parent
        path = []
        while parent.get(i, i) != i:
            path.append(i)
            i = parent[i]
        for j in path:  # path compression
            parent[j] = i
        return i

    def union(self, i, j) -> None:
        a, b = sorted((self.root(i), self.root(j)))
        if a != b:
            self._parent[b] = a  # the earlier document stays the representative

    def duplicates(self) -> set:
        """Ids that are not the root of their cluster: the documents to drop."""
        return {i for i in self._parent if self.root(i) != i}


def near_duplicate_mask(
    documents: Sequence[str], *, threshold: float = 0.8, num_bands: int = NUM_BANDS, hasher: MinHasher | None = None
) -> np.ndarray:
    """bool [num_documents], True for documents with a near-duplicate earlier in the list.

    Candidates share a band (num_permutations / num_bands signature rows) in an LSH table;
    a candidate pair counts if its estimated Jaccard similarity is >= threshold. Documents linked by
    such pairs, directly or through others, form a cluster whose first document stays.
    """
    hasher = hasher or MinHasher()
    if hasher.num_permutations % num_bands:
        raise UserError(f"num_permutations={hasher.num_permutations} must be a multiple of num_bands={num_bands}.")
    signatures = [hasher.signature(d) for d in documents]
    clusters = Clusters()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    for i, sig in enumerate(signatures):
        if not has_words(sig):  # no words: cannot be a near duplicate
            continue
        for key in band_keys(sig, num_bands):
            for j in buckets.setdefault(key, []):
                if clusters.root(i) != clusters.root(j) and is_near_duplicate(signatures[j], sig, threshold):
                    clusters.union(i, j)
            buckets[key].append(i)
    mask = np.zeros(len(documents), bool)
    mask[sorted(clusters.duplicates())] = True
    return mask


def deduplicate(documents: Sequence[str], *, mode: str, threshold: float = 0.8) -> tuple[list[str], dict]:
    """(kept documents in order, report) for mode "exact" or "near" (near also drops exact dups)."""
    check_mode(mode)
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
    return kept, dedup_report(mode=mode, threshold=threshold, documents=len(documents), kept=len(kept),
                              exact_duplicates=int(exact.sum()), near_duplicates=near_count,
                              characters_in=sum(map(len, documents)), characters_kept=sum(map(len, kept)))


def check_mode(mode: str) -> None:
    if mode not in ("exact", "near"):
        raise UserError(f"mode={mode!r}; choose 'exact' or 'near'.")


def dedup_report(*, mode: str, threshold: float, documents: int, kept: int, exact_duplicates: int,
                 near_duplicates: int, characters_in: int, characters_kept: int) -> dict:
    """The report of deduplicate() (and of the Beam pipeline, t5lite.data.pipelines) from its counts."""
    report = {
        "mode": mode, "documents": documents, "kept": kept,
        "exact_duplicates": exact_duplicates, "near_duplicates": near_duplicates,
        "percent_removed": 100.0 * (documents - kept) / max(documents, 1),
        "characters_in": characters_in, "characters_kept": characters_kept,
    }
    if mode == "near":
        report["threshold"] = threshold
    return report


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of what deduplicate() does and how documents are read (shared with the Beam pipeline)."""
    parser.add_argument("--mode", default="exact", choices=["exact", "near"])
    parser.add_argument("--threshold", type=float, default=0.8, help="near mode: Jaccard similarity")
    parser.add_argument("--separator", default="line", choices=["line", "blank_line"])


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], help="text file(s), .gz allowed (dedup mode)")
    parser.add_argument("--output", help="where the kept documents go (dedup mode)")
    parser.add_argument("--report", help="JSON report path (default: print only)")
    add_dedup_arguments(parser)
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
