"""How much of an eval set's text its model saw in training: word n-gram overlap (13 words, as in GPT-3).

Reports, per eval set, the percentage of examples sharing at least one n-gram with the training corpus
and the percentage of their n-grams that occur in it. `python -m t5lite.data.dedup --contamination` runs
it for tasks; `python -m t5lite.eval` puts it beside the benchmark scores.

N-grams are kept as 64-bit hashes: with the 31-bit hash MinHash uses, a 50-word eval row against the
1.9M 13-grams of t5lite's default corpus came out "contaminated" by a collision 4% of the time (the
first benchmark table showed 1-7% for every task; none of the flagged n-grams was in the corpus).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from t5lite.data.ngrams import stable_hash64, word_ngrams


@dataclasses.dataclass(frozen=True)
class ContaminationReport:
    eval_name: str
    examples: int
    contaminated_examples: int
    ngrams: int
    overlapping_ngrams: int

    @property
    def percent_examples(self) -> float:
        return 100.0 * self.contaminated_examples / max(self.examples, 1)

    @property
    def percent_ngrams(self) -> float:
        return 100.0 * self.overlapping_ngrams / max(self.ngrams, 1)


def training_ngram_set(train_texts: Iterable[str], n: int = 13) -> set[int]:
    """Hashes of every word n-gram in the training corpus."""
    return {stable_hash64(g) for text in train_texts for g in word_ngrams(text, n)}


def contamination(
    eval_name: str, eval_texts: Iterable[str], train_ngrams: set[int], n: int = 13
) -> ContaminationReport:
    """How much of an eval set's text also occurs in the training corpus (word n-gram overlap)."""
    examples = contaminated = total = overlap = 0
    for text in eval_texts:
        hashes = [stable_hash64(g) for g in word_ngrams(text, n)]
        hits = sum(h in train_ngrams for h in hashes)
        examples += 1
        contaminated += hits > 0
        total += len(hashes)
        overlap += hits
    return ContaminationReport(eval_name, examples, contaminated, total, overlap)


_TRAIN_NGRAMS_CACHE: dict[tuple[str, int], set[int]] = {}


def contamination_of_tasks(train_task: str, eval_task: str, split: str, *, limit: int | None = None,
                           n: int = 13) -> dict[str, ContaminationReport]:
    """Each task of `eval_task` (a Task or Mixture) against the "train" split of every task of
    `train_task`: -> task name -> report over its first `limit` rows of `split` (None: all).

    The training n-grams are hashed once per process (the benchmark table asks for every task)."""
    from t5lite.data import pipeline  # noqa: PLC0415  (registers the built-in tasks; seqio is heavy)

    if (train_task, n) not in _TRAIN_NGRAMS_CACHE:
        ngrams: set[int] = set()
        for task in pipeline.list_tasks_of(train_task):
            ngrams |= training_ngram_set(pipeline.raw_texts(task, "train"), n)
        _TRAIN_NGRAMS_CACHE[(train_task, n)] = ngrams
    train_ngrams = _TRAIN_NGRAMS_CACHE[(train_task, n)]
    return {task: contamination(f"{task}:{split}", pipeline.raw_texts(task, split, limit=limit), train_ngrams, n)
            for task in pipeline.list_tasks_of(eval_task)}
