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


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean as lm-evaluation-harness computes it: sample standard deviation
    (n - 1) / sqrt(n); NaN for fewer than two values."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """The harness's standard error of a group weighted by size (lm_eval pooled_sample_stderr)."""
    pooled_variance = sum((n - 1) * se**2 * n for se, n in zip(stderrs, sizes, strict=True)) / (sum(sizes) - len(sizes))
    return float(math.sqrt(pooled_variance / sum(sizes)))


MultipleChoiceRow = tuple  # (question_id, is_correct, choice_length[, category]); see rank_classification_target


def _questions(targets: Sequence[MultipleChoiceRow], scores: Sequence[float]) -> list[dict[str, Any]]:
    """Rows grouped by question, in row order: {"scores", "lengths", "correct", "category"} each."""
    _check_lengths(targets, scores)
    questions: dict[int, dict[str, Any]] = {}
    for row, score in zip(targets, scores, strict=True):
        question_id, is_correct, length = int(row[0]), row[1], int(row[2])
        if isinstance(is_correct, str | bytes) or int(is_correct) not in (0, 1):
            raise UserError(f"question {question_id}: is_correct must be 0 or 1, got {is_correct!r}. A multiple-choice "
                            "label is an integer index into the choices (see tasks.add_multiple_choice_task).")
        q = questions.setdefault(question_id, {"scores": [], "lengths": [], "correct": [],
                                               "category": row[3] if len(row) > 3 else ""})
        q["scores"].append(float(score))
        q["lengths"].append(max(length, 1))
        q["correct"].append(int(is_correct))
    return list(questions.values())


def _single_answer(questions: list[dict[str, Any]]) -> None:
    for i, q in enumerate(questions):
        if sum(q["correct"]) != 1:
            raise UserError(
                f"question {i}: {sum(q['correct'])} of its {len(q['correct'])} choices are marked correct, but "
                "accuracy needs exactly one. The label must be one integer index into the choices (a text label "
                "such as \"0\" or \"yes\" is not); tasks.add_multiple_choice_task checks this. (Or num_examples, "
                "which counts rows, cut the question's choices short: evaluate whole questions.)")


def _accuracy_figures(questions: list[dict[str, Any]]) -> dict[str, Any]:
    plain = [q["correct"][int(np.argmax(q["scores"]))] for q in questions]
    normalized = [q["correct"][int(np.argmax(np.divide(q["scores"], q["lengths"])))] for q in questions]
    return {"accuracy": 100.0 * float(np.mean(plain)), "accuracy_stderr": 100.0 * mean_stderr(plain),
            "length_normalized_accuracy": 100.0 * float(np.mean(normalized)),
            "length_normalized_accuracy_stderr": 100.0 * mean_stderr(normalized),
            "chance_accuracy": 100.0 * float(np.mean([1 / len(q["correct"]) for q in questions])),
            "num_questions": float(len(questions))}


def rank_classification(targets: Sequence[MultipleChoiceRow], scores: Sequence[float]) -> Metrics:
    """Multiple choice by likelihood, as lm-evaluation-harness: one scored row per (question, choice).

    targets: (question_id, is_correct, choice_length[, category]) per row, in choice order (see
    rank_classification_target). accuracy (the harness's acc) takes a question's highest log p(choice),
    the first on a tie; length_normalized_accuracy (acc_norm) ranks by log p / choice_length, the
    choice's length in characters; their *_stderr are the harness's standard errors (sample standard
    deviation / sqrt(n)); chance_accuracy is the mean of 1 / number of choices (25 for four).
    num_questions: n. Every question needs exactly one correct row (else a UserError: a text label).
    With categories, "<category>/<figure>" per category as well.
    """
    questions = _questions(targets, scores)
    _single_answer(questions)
    result = _accuracy_figures(questions)
    categories = sorted({q["category"] for q in questions} - {""})
    for category in categories:
        figures = _accuracy_figures([q for q in questions if q["category"] == category])
        result.update({f"{category}/{k}": v for k, v in figures.items()})
    return result


def grouped_rank_classification(targets: Sequence[MultipleChoiceRow], scores: Sequence[float]) -> Metrics:
    """rank_classification of a group of subtasks, as the harness's MMLU group: categories are
    "<group>/<subtask>"; a group's accuracy is over its questions (weight_by_size) and its standard
    error is pooled from its subtasks' (pooled_stderr), and the overall one from the groups'."""
    result = rank_classification(targets, scores)
    questions = _questions(targets, scores)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for category in sorted({q["category"] for q in questions}):
        if "/" in category:
            groups[category.split("/")[0]].append(category)
    group_sizes, group_stderrs = [], {"accuracy": [], "length_normalized_accuracy": []}
    for group, subtasks in sorted(groups.items()):
        figures = _accuracy_figures([q for q in questions if q["category"].split("/")[0] == group])
        result.update({f"{group}/{k}": v for k, v in figures.items()})
        sizes = [int(result[f"{s}/num_questions"]) for s in subtasks]
        group_sizes.append(sum(sizes))
        for name, stderrs in group_stderrs.items():
            result[f"{group}/{name}_stderr"] = pooled_stderr([result[f"{s}/{name}_stderr"] for s in subtasks], sizes)
            stderrs.append(result[f"{group}/{name}_stderr"])
    if groups:
        for name, stderrs in group_stderrs.items():
            result[f"{name}_stderr"] = pooled_stderr(stderrs, group_sizes)
    return result


def mc2(targets: Sequence[MultipleChoiceRow], scores: Sequence[float]) -> Metrics:
    """TruthfulQA MC2 as lm-evaluation-harness: per question, the probability mass of the true choices
    after normalising exp(log-likelihood) over the question's choices; mean over questions (percent).
    Computed stably (max subtracted first): the same value, where the harness's exp underflows to 0/0
    for log-likelihoods below about -745. chance_mc2: equal probability for every choice."""
    questions = _questions(targets, scores)
    masses, chance = [], []
    for q in questions:
        lls = np.asarray(q["scores"], np.float64)
        p = np.exp(lls - lls.max())
        masses.append(float(p[np.asarray(q["correct"]) == 1].sum() / p.sum()))
        chance.append(sum(q["correct"]) / len(q["correct"]))
    return {"mc2": 100.0 * float(np.mean(masses)), "mc2_stderr": 100.0 * mean_stderr(masses),
            "chance_mc2": 100.0 * float(np.mean(chance)), "num_questions": float(len(questions))}


def rank_classification_target(target: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """seqio postprocess_fn of a scored multiple-choice task: a target row -> (question_id, is_correct,
    choice_length, category) for rank_classification / mc2. The task's rows (one per choice) carry int
    features `question_id` and `is_correct`, and optionally `choice_length` (characters; default the
    target's) and `category` (see t5lite/data/multiple_choice.py)."""
    if not is_target:
        return target
    if not example or "question_id" not in example or "is_correct" not in example:
        raise UserError("rank_classification needs one row per (question, choice) with int features question_id "
                        "and is_correct: register the task with tasks.add_multiple_choice_task.")
    is_correct = example["is_correct"]
    if isinstance(is_correct, str | bytes):
        raise UserError(f"is_correct must be an int 0 or 1, got {is_correct!r}: a multiple-choice label is an integer "
                        "index into the choices (tasks.add_multiple_choice_task).")
    length = example.get("choice_length")
    category = example.get("category", "")
    category = category.decode("utf-8") if isinstance(category, bytes) else str(category)
    return (int(example["question_id"]), int(is_correct), int(length) if length is not None else len(target),
            category)


def _strip_punctuation(word: str) -> str:
    return word.strip(string.punctuation + "“”‘’")


def last_word_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> Metrics:
    """LAMBADA: percentage of continuations whose first word is the target word (punctuation ignored)."""
    _check_lengths(targets, predictions)
    hits = []
    for target, prediction in zip(targets, predictions, strict=True):
        words = prediction.split()
        hits.append(bool(words) and _strip_punctuation(words[0]) == _strip_punctuation(target.strip()))
    return {"last_word_accuracy": 100.0 * float(np.mean(hits)), "last_word_accuracy_stderr": 100.0 * mean_stderr(hits),
            "num_questions": float(len(hits))}
