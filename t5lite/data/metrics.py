"""Metric functions for seqio Tasks (`metric_fns=[...]`).

seqio calls a prediction metric as fn(targets, predictions) and a score metric as fn(targets,
scores), both lists over the examples of a split, targets and predictions after the task's
postprocess_fn; scores are the model's log-likelihoods of the targets (natural log, summed over
target tokens). Each returns {name: float}. Percentages (0-100) as in T5 for accuracy, F1, exact
match, BLEU and ROUGE.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import sacrebleu
import seqio
from rouge_score import rouge_scorer

from t5lite.errors import UserError

Metrics = dict[str, float]


def _check_lengths(targets: Sequence, outputs: Sequence) -> None:
    if len(targets) != len(outputs):
        raise UserError(f"{len(targets)} targets but {len(outputs)} predictions or scores.")


def accuracy(targets: Sequence[Hashable], predictions: Sequence[Hashable]) -> Metrics:
    """Percentage of predictions equal to their target."""
    _check_lengths(targets, predictions)
    return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions, strict=True)]))}


def _f1_of_class(targets: Sequence, predictions: Sequence, label: Hashable) -> float:
    true_positives = sum(t == label and p == label for t, p in zip(targets, predictions, strict=True))
    predicted, actual = sum(p == label for p in predictions), sum(t == label for t in targets)
    if true_positives == 0:
        return 0.0
    precision, recall = true_positives / predicted, true_positives / actual
    return 2 * precision * recall / (precision + recall)


def macro_f1(targets: Sequence[Hashable], predictions: Sequence[Hashable]) -> Metrics:
    """F1 averaged over the classes seen in the targets (a prediction outside them counts as wrong)."""
    _check_lengths(targets, predictions)
    labels = sorted(set(targets), key=str)
    return {"macro_f1": 100.0 * float(np.mean([_f1_of_class(targets, predictions, c) for c in labels]))}


def binary_f1(targets: Sequence[Hashable], predictions: Sequence[Hashable], positive_label: Hashable = 1) -> Metrics:
    """F1 of the positive class (bind positive_label with functools.partial for text labels)."""
    _check_lengths(targets, predictions)
    return {"f1": 100.0 * _f1_of_class(targets, predictions, positive_label)}


def normalize_squad_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1(prediction: str, truth: str) -> float:
    prediction_tokens = normalize_squad_answer(prediction).split()
    truth_tokens = normalize_squad_answer(truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(prediction_tokens), num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str] | str], predictions: Sequence[str]) -> Metrics:
    """SQuAD exact match and token F1, each the max over an example's reference answers."""
    _check_lengths(targets, predictions)
    em, f1 = [], []
    for answers, prediction in zip(targets, predictions, strict=True):
        answers = [answers] if isinstance(answers, str) else list(answers)
        em.append(max(normalize_squad_answer(prediction) == normalize_squad_answer(a) for a in answers))
        f1.append(max(_squad_f1(prediction, a) for a in answers))
    return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def bleu(targets: Sequence[Sequence[str] | str], predictions: Sequence[str]) -> Metrics:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing); targets may be lists."""
    _check_lengths(targets, predictions)
    references = [[t] if isinstance(t, str) else list(t) for t in targets]
    num_refs = {len(r) for r in references}
    if len(num_refs) > 1:
        raise UserError(f"bleu: every example needs the same number of references, got {sorted(num_refs)}.")
    # sacrebleu wants one stream per reference position: refs[j][i] = j-th reference of example i.
    streams = [list(r) for r in zip(*references, strict=True)]
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), streams).score)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> Metrics:
    """Mean ROUGE-1/2/L F-measure (rouge-score, with Porter stemming as in T5)."""
    _check_lengths(targets, predictions)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(t, p) for t, p in zip(targets, predictions, strict=True)]
    return {name: 100.0 * float(np.mean([s[name].fmeasure for s in scores])) for name in ROUGE_TYPES}


def bits_per_byte(targets: Sequence[str], scores: Sequence[float]) -> Metrics:
    """-sum(log2 p(targets)) / UTF-8 bytes of the targets: a tokenizer-independent LM measure."""
    _check_lengths(targets, scores)
    num_bytes = sum(len(t.encode("utf-8")) for t in targets)
    if num_bytes == 0:
        raise UserError("bits_per_byte: the targets are empty.")
    return {"bits_per_byte": float(-np.sum(scores) / math.log(2) / num_bytes)}


def token_perplexity(vocabulary: seqio.Vocabulary, add_eos: bool = True) -> Callable[..., Metrics]:
    """A score metric: exp(-sum(scores) / number of target tokens), tokens counted with `vocabulary`.

    add_eos: whether the task's targets end with EOS (then scored, so counted).
    """

    def perplexity(targets: Sequence[str], scores: Sequence[float]) -> Metrics:
        _check_lengths(targets, scores)
        num_tokens = sum(len(vocabulary.encode(t)) + int(add_eos) for t in targets)
        return {"perplexity": float(np.exp(-np.sum(scores) / max(num_tokens, 1)))}

    return perplexity


def target_perplexity(targets: Sequence[str], scores: Sequence[float]) -> Metrics:
    """exp(-mean over examples of log p(target)): the perplexity per target (e.g. per LAMBADA word,
    as lm-evaluation-harness reports it), independent of how many tokens a target has."""
    _check_lengths(targets, scores)
    if not len(scores):
        raise UserError("target_perplexity: no scores.")
    return {"target_perplexity": float(np.exp(-np.mean(scores)))}


def rank_classification(targets: Sequence[tuple[int, bool, int]], scores: Sequence[float]) -> Metrics:
    """Multiple choice by likelihood. One scored row per (question, choice).

    targets: (question_id, is_correct, choice_bytes) per row; the prediction for a question is
    its highest-scoring choice. accuracy ranks by log p(choice); length_normalized_accuracy
    ranks by log p(choice) / choice_bytes (favours no length, as lm-evaluation-harness acc_norm);
    chance_accuracy is the expected accuracy of a uniformly random pick among a question's rows,
    the baseline to read both against (25 for four choices).
    """
    _check_lengths(targets, scores)
    questions: dict[int, list[tuple[float, float, bool]]] = collections.defaultdict(list)
    for (question_id, is_correct, choice_bytes), score in zip(targets, scores, strict=True):
        questions[int(question_id)].append((float(score), float(score) / max(int(choice_bytes), 1), bool(is_correct)))
    plain = [choices[int(np.argmax([c[0] for c in choices]))][2] for choices in questions.values()]
    normalized = [choices[int(np.argmax([c[1] for c in choices]))][2] for choices in questions.values()]
    chance = [np.mean([c[2] for c in choices]) for choices in questions.values()]
    return {"accuracy": 100.0 * float(np.mean(plain)),
            "length_normalized_accuracy": 100.0 * float(np.mean(normalized)),
            "chance_accuracy": 100.0 * float(np.mean(chance))}


def rank_classification_target(target: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """seqio postprocess_fn of a scored multiple-choice task: a target row -> (question_id, is_correct,
    choice_bytes) for rank_classification. The task's rows (one per choice) carry int features
    `question_id` and `is_correct`."""
    if not is_target:
        return target
    return int(example["question_id"]), bool(example["is_correct"]), len(target.encode("utf-8"))


def _strip_punctuation(word: str) -> str:
    return word.strip(string.punctuation + "“”‘’")


def last_word_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> Metrics:
    """LAMBADA: percentage of continuations whose first word is the target word (punctuation ignored)."""
    _check_lengths(targets, predictions)
    hits = []
    for target, prediction in zip(targets, predictions, strict=True):
        words = prediction.split()
        hits.append(bool(words) and _strip_punctuation(words[0]) == _strip_punctuation(target.strip()))
    return {"last_word_accuracy": 100.0 * float(np.mean(hits))}
