"""Metric functions against hand-computed values and the reference definitions."""

import functools
import math

import pytest

from t5lite.data import metrics
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError


def test_accuracy():
    assert metrics.accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == {"accuracy": 75.0}


def test_macro_f1_by_hand():
    # a: P 1/2 R 1/2 -> 0.5; b: P 2/3 R 1 -> 0.8; c: never predicted -> 0. Mean 1.3 / 3.
    result = metrics.macro_f1(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"])
    assert result["macro_f1"] == pytest.approx(100 * 1.3 / 3)


def test_binary_f1_by_hand():
    # TP 2, predicted positive 3, actual positive 3 -> P = R = 2/3.
    assert metrics.binary_f1([1, 0, 1, 1], [1, 1, 0, 1])["f1"] == pytest.approx(100 * 2 / 3)
    yes_f1 = functools.partial(metrics.binary_f1, positive_label="yes")
    assert yes_f1(["yes", "no"], ["no", "no"])["f1"] == 0.0


def test_squad_normalisation_and_scores_follow_the_official_script():
    assert metrics.normalize_squad_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_squad_answer("an apple, a pear") == "apple pear"
    result = metrics.squad(
        [["Denver Broncos", "The Denver Broncos"], ["Denver Broncos"]],
        ["denver broncos.", "the Carolina Panthers and Denver"],
    )
    # Example 2: prediction tokens {carolina, panthers, and, denver}, truth {denver, broncos}:
    # overlap 1, P 1/4, R 1/2, F1 1/3.
    assert result["em"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 1 / 3) / 2)


def test_bleu_matches_a_hand_computed_value():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty).
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    result = metrics.bleu(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert result["bleu"] == pytest.approx(expected, abs=1e-3)
    assert metrics.bleu([["a b c d e", "x"]], ["a b c d e"])["bleu"] == pytest.approx(100.0)


def test_rouge_by_hand():
    result = metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
    # ROUGE-1: P 3/3, R 3/6; ROUGE-2: P 2/2, R 2/5; ROUGE-L: LCS 3 -> as ROUGE-1.
    assert result["rouge1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert result["rouge2"] == pytest.approx(100 * 2 * 0.4 / 1.4)
    assert result["rougeL"] == pytest.approx(100 * 2 * 0.5 / 1.5)


def test_bits_per_byte_and_perplexity_from_scores():
    # 8 bits per 4-byte target -> 2 bits per byte.
    assert metrics.bits_per_byte(["abcd", "efgh"], [-8 * math.log(2)] * 2)["bits_per_byte"] == pytest.approx(2.0)
    vocabulary = get_default_vocabulary()
    targets = ["hello world", "to be or not to be"]
    num_tokens = sum(len(vocabulary.encode(t)) + 1 for t in targets)  # + EOS each
    perplexity = metrics.token_perplexity(vocabulary)
    assert perplexity(targets, [-num_tokens * math.log(4) / 2] * 2)["perplexity"] == pytest.approx(4.0)


def test_rank_classification_plain_and_length_normalised():
    # Question 0: the short wrong choice has the higher log p, the long right one the higher
    # log p per byte (-3/11 > -2/1). Question 1: the right choice wins both ways.
    targets = [(0, False, 1), (0, True, 11), (1, True, 5), (1, False, 5)]
    scores = [-2.0, -3.0, -1.0, -4.0]
    assert metrics.rank_classification(targets, scores) == {"accuracy": 50.0, "length_normalized_accuracy": 100.0,
                                                            "chance_accuracy": 50.0}


def test_rank_classification_chance_counts_each_questions_choices():
    # Question 0 has 3 choices (chance 1/3), question 1 has 2 (chance 1/2): mean 5/12.
    targets = [(0, True, 1), (0, False, 1), (0, False, 1), (1, False, 1), (1, True, 1)]
    result = metrics.rank_classification(targets, [0.0, -1.0, -2.0, 0.0, -1.0])
    assert result["accuracy"] == 50.0 and result["chance_accuracy"] == pytest.approx(100 * 5 / 12)


def test_target_perplexity_is_per_target_not_per_token():
    # log p of the two targets: -log 2 and -log 8 -> mean -log 4 -> perplexity 4, whatever their lengths.
    result = metrics.target_perplexity(["a", "a much longer target"], [-math.log(2), -math.log(8)])
    assert result["target_perplexity"] == pytest.approx(4.0)


def test_last_word_accuracy_ignores_punctuation_and_takes_the_first_word():
    result = metrics.last_word_accuracy(["dog", "house", "Paris"], ["dog.", "the house", " “Paris” he said"])
    assert result["last_word_accuracy"] == pytest.approx(200 / 3)


def test_mismatched_lengths_are_user_errors():
    with pytest.raises(UserError, match="2 targets but 1"):
        metrics.accuracy(["a", "b"], ["a"])
