"""Near-duplicate detection against datasketch: throughput (MB/s), recall of planted near duplicates, false
positives. In one run, on one corpus:
  t5lite in-process    t5lite.data.dedup.deduplicate(mode="near"): what python -m t5lite.data.dedup runs
  t5lite Beam          python -m t5lite.data.pipelines dedup on the DirectRunner, 2 worker processes
  datasketch           MinHash(num_perm) over the same 5-word shingles, MinHashLSH(threshold, num_perm), each
                       candidate verified (estimated Jaccard >= threshold) as t5lite verifies; a document
                       with a verified candidate before it is dropped

    python bench/dedup_throughput.py [--input=WikiText-2 train] [--copies=0.1] [--max_documents=N]

The corpus: the paragraphs of WikiText-2 train (lines of at least --min_words words, exact repeats removed;
the embedded corpus's file unless --input), then, for a --copies fraction of them, a copy with 1%, 2% or 3%
of its words replaced (5-word-shingle Jaccard about 0.90, 0.82, 0.74 to the original), in random order after
all originals. Scored against the exact shingle Jaccard, the same for every tool:
  recall            planted copies with Jaccard >= threshold to their original that were dropped
  false positives   dropped documents with no earlier document at Jaccard >= threshold
Throughput is corpus megabytes (UTF-8) over wall seconds, each tool from its text to its kept set (Beam:
pipeline start to output files, worker start-up included). Prints a JSON report and a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from t5lite.data import dedup  # noqa: E402
from t5lite.data.ngrams import word_ngrams  # noqa: E402

MUTATION_RATES = (0.01, 0.02, 0.03)
SHINGLE_WORDS = 5


def load_paragraphs(path: str, min_words: int) -> list[str]:
    """WikiText paragraphs: lines that are no heading, with at least min_words words, each text once."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return list(dict.fromkeys(line for line in lines if len(line.split()) >= min_words and not line.startswith("=")))


def plant_copies(paragraphs: list[str], fraction: float, seed: int) -> tuple[list[str], dict[int, int]]:
    """(corpus, {copy index: original index}): the paragraphs, then mutated copies of a fraction of them."""
    rng = np.random.default_rng(seed)
    originals = rng.choice(len(paragraphs), int(len(paragraphs) * fraction), replace=False)
    vocabulary = sorted({w for p in paragraphs[:2000] for w in p.split()})
    corpus, planted, seen = list(paragraphs), {}, set(paragraphs)
    for n, i in enumerate(originals):
        words = paragraphs[i].split()
        rate = MUTATION_RATES[n % len(MUTATION_RATES)]
        for k in rng.choice(len(words), max(1, round(rate * len(words))), replace=False):
            words[k] = vocabulary[rng.integers(len(vocabulary))]
        copy = " ".join(words)
        if copy not in seen:  # a text occurs once: kept sets map back to indices
            seen.add(copy)
            planted[len(corpus)] = int(i)
            corpus.append(copy)
    order = rng.permutation(np.arange(len(paragraphs), len(corpus)))  # copies in random order, after all originals
    reordered = corpus[: len(paragraphs)] + [corpus[j] for j in order]
    new_index = {int(j): len(paragraphs) + n for n, j in enumerate(order)}
    return reordered, {new_index[c]: o for c, o in planted.items()}


class Jaccard:
    """Exact 5-word-shingle Jaccard similarity between documents of a corpus (the ground truth)."""

    def __init__(self, corpus: list[str]):
        self.shingles = [set(word_ngrams(text, SHINGLE_WORDS)) for text in corpus]
        self._index = collections.defaultdict(list)  # shingle -> documents holding it
        for i, shingles in enumerate(self.shingles):
            for s in shingles:
                self._index[s].append(i)

    def __call__(self, i: int, j: int) -> float:
        a, b = self.shingles[i], self.shingles[j]
        return len(a & b) / max(len(a | b), 1)

    def has_earlier_near_duplicate(self, i: int, threshold: float) -> bool:
        candidates = {j for s in self.shingles[i] for j in self._index[s] if j < i}
        return any(self(i, j) >= threshold for j in candidates)


def score(dropped: set[int], planted: dict[int, int], truth: Jaccard, threshold: float) -> dict:
    similarity = {c: truth(c, o) for c, o in planted.items()}
    near_planted = [c for c, j in similarity.items() if j >= threshold]
    clear = [c for c, j in similarity.items() if j >= threshold + 0.05]  # away from the estimates' noise
    found = sum(c in dropped for c in near_planted)
    false_positives = sum(not truth.has_earlier_near_duplicate(i, threshold) for i in dropped)
    return {"dropped": len(dropped), "recall": found / max(len(near_planted), 1), "planted_found": found,
            "planted_near_duplicates": len(near_planted),
            f"recall_at_jaccard_{threshold + 0.05:.2f}": sum(c in dropped for c in clear) / max(len(clear), 1),
            "false_positives": false_positives}


def run_t5lite(corpus: list[str], threshold: float) -> set[int]:
    kept, _ = dedup.deduplicate(corpus, mode="near", threshold=threshold)
    kept_set = set(kept)
    return {i for i, text in enumerate(corpus) if text not in kept_set}


def run_beam(corpus: list[str], threshold: float, workers: int) -> set[int]:
    from t5lite.data import pipelines  # noqa: PLC0415  (apache-beam: only here)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus) + "\n")
        # The worker processes import t5lite.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        with contextlib.redirect_stdout(io.StringIO()):
            code = pipelines.main(["dedup", f"--input={path}", f"--output={tmp}/kept", "--mode=near",
                                   f"--threshold={threshold}", f"--direct_num_workers={workers}",
                                   "--direct_running_mode=multi_processing"])
        if code:
            raise RuntimeError(f"the Beam pipeline exited {code}")
        kept = {line for shard in glob.glob(f"{tmp}/kept-*-of-*") for line in open(shard, encoding="utf-8")
                .read().splitlines()}
    return {i for i, text in enumerate(corpus) if text not in kept}


def run_datasketch(corpus: list[str], threshold: float, num_perm: int) -> set[int]:
    from datasketch import MinHash, MinHashLSH  # noqa: PLC0415

    lsh, signatures, dropped = MinHashLSH(threshold=threshold, num_perm=num_perm), [], set()
    for i, text in enumerate(corpus):
        m = MinHash(num_perm=num_perm)
        m.update_batch([s.encode("utf-8") for s in set(word_ngrams(text, SHINGLE_WORDS))])
        if any(signatures[j].jaccard(m) >= threshold for j in lsh.query(m)):
            dropped.add(i)
        lsh.insert(i, m)
        signatures.append(m)
    return dropped


def timed(fn, *args) -> tuple[float, set[int]]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    from t5lite.data.embedded_corpus import corpus_dir  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=os.path.join(corpus_dir(), "wikitext-2", "train.txt.gz"))
    parser.add_argument("--min_words", type=int, default=20)
    parser.add_argument("--copies", type=float, default=0.1, help="fraction of paragraphs copied with changes")
    parser.add_argument("--max_documents", type=int, help="use the first N paragraphs")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--beam_workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)

    paragraphs = load_paragraphs(args.input, args.min_words)[: args.max_documents]
    corpus, planted = plant_copies(paragraphs, args.copies, args.seed)
    megabytes = sum(len(t.encode("utf-8")) + 1 for t in corpus) / 1e6
    num_perm = dedup.MinHasher().num_permutations
    runs = {
        "t5lite in-process": timed(run_t5lite, corpus, args.threshold),
        f"t5lite Beam DirectRunner, {args.beam_workers} processes": timed(run_beam, corpus, args.threshold,
                                                                          args.beam_workers),
        "datasketch MinHash + MinHashLSH": timed(run_datasketch, corpus, args.threshold, num_perm),
    }
    truth = Jaccard(corpus)
    results = {name: {"seconds": round(seconds, 2), "mb_per_s": round(megabytes / seconds, 3),
                      **score(dropped, planted, truth, args.threshold)}
               for name, (seconds, dropped) in runs.items()}
    report = {"corpus": {"documents": len(corpus), "megabytes": round(megabytes, 2), "planted_copies": len(planted),
                         "input": args.input}, "threshold": args.threshold, "num_perm": num_perm,
              "load_average": [round(x, 2) for x in os.getloadavg()], "cpu": platform.processor() or platform.machine(),
              "results": results}
    print(json.dumps(report, indent=2))
    clear = f"recall_at_jaccard_{args.threshold + 0.05:.2f}"
    print(f"\n| tool | seconds | MB/s | recall (planted, Jaccard >= {args.threshold}) | recall (Jaccard >= "
          f"{args.threshold + 0.05:.2f}) | false positives | dropped |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']} | {r['mb_per_s']:.2f} | {r['recall']:.3f} ({r['planted_found']} / "
              f"{r['planted_near_duplicates']}) | {r[clear]:.3f} | {r['false_positives']} | {r['dropped']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
