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
    # log p per character (-3/11 > -2/1). Question 1: the right choice wins both ways.
    targets = [(0, False, 1), (0, True, 11), (1, True, 5), (1, False, 5)]
    scores = [-2.0, -3.0, -1.0, -4.0]
    result = metrics.rank_classification(targets, scores)
    assert (result["accuracy"], result["length_normalized_accuracy"], result["chance_accuracy"]) == (50.0, 100.0, 50.0)
    # The harness's stderr: sample standard deviation of [0, 1] (n - 1) / sqrt(2) = 0.7071 / 1.4142 = 0.5.
    assert result["accuracy_stderr"] == pytest.approx(50.0)
    assert result["length_normalized_accuracy_stderr"] == 0.0 and result["num_questions"] == 2


def test_rank_classification_chance_counts_each_questions_choices():
    # Question 0 has 3 choices (chance 1/3), question 1 has 2 (chance 1/2): mean 5/12.
    targets = [(0, True, 1), (0, False, 1), (0, False, 1), (1, False, 1), (1, True, 1)]
    result = metrics.rank_classification(targets, [0.0, -1.0, -2.0, 0.0, -1.0])
    assert result["accuracy"] == 50.0 and result["chance_accuracy"] == pytest.approx(100 * 5 / 12)


def test_a_text_label_is_an_error_and_chance_is_never_100_with_two_choices():
    # The README trap: every row marked correct (bool(b"0") is True) used to give 100 / 100 / chance 100.
    with pytest.raises(UserError, match="question 0: 2 of its 2 choices are marked correct"):
        metrics.rank_classification([(0, True, 3), (0, True, 2)], [-1.0, -2.0])
    with pytest.raises(UserError, match="is_correct must be an int"):
        metrics.rank_classification_target(" no", {"question_id": 0, "is_correct": b"0"}, is_target=True)
    with pytest.raises(UserError, match="add_multiple_choice_task"):
        metrics.rank_classification_target("no", {"inputs": "q"}, is_target=True)


def test_toy_model_with_known_log_likelihoods_scores_like_the_harness():
    # Three 4-way questions; lengths in characters of " " + choice minus the delimiter (the harness's len(choice)).
    choices = [["cat", "elephant", "ox", "dog"], ["a", "bb", "ccc", "dddd"], ["yes", "no", "maybe", "never"]]
    golds = [1, 3, 0]
    lls = [[-4.0, -6.0, -3.0, -5.0], [-1.0, -2.0, -3.0, -3.5], [-2.0, -2.0, -9.0, -9.0]]
    targets = [(q, int(i == golds[q]), len(c), "") for q in range(3) for i, c in enumerate(choices[q])]
    scores = [s for row in lls for s in row]
    result = metrics.rank_classification(targets, scores)
    # acc: argmax ll -> ox (wrong), a (wrong), yes (first of the tie: right) = 1/3.
    # acc_norm: ll/len -> cat -1.33, elephant -0.75, ox -1.5, dog -1.67: elephant (right); -1, -1, -1, -0.875:
    # dddd (right); yes -0.67, no -1.0: yes (right) = 3/3.
    assert result["accuracy"] == pytest.approx(100 / 3)
    assert result["length_normalized_accuracy"] == 100.0
    assert result["accuracy_stderr"] == pytest.approx(100 * math.sqrt(1 / 3) / math.sqrt(3))  # sd of [0,0,1]
    assert result["chance_accuracy"] == 25.0 and result["num_questions"] == 3


def test_mc2_is_the_normalised_probability_of_the_true_answers():
    # Question 0: true choices 0 and 1 of three, lls log .5, log .3, log .2 -> 0.8; question 1: log 1, log 3
    # (unnormalised), the true one is second -> 3/4. Mean 0.775.
    targets = [(0, 1, 1), (0, 1, 1), (0, 0, 1), (1, 0, 1), (1, 1, 1)]
    scores = [math.log(0.5), math.log(0.3), math.log(0.2), 0.0, math.log(3)]
    result = metrics.mc2(targets, scores)
    assert result["mc2"] == pytest.approx(77.5)
    assert result["chance_mc2"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    # Far below exp's range (the harness's exp underflows to 0/0 there): the same mass, computed stably.
    far = metrics.mc2(targets, [s - 2000 for s in scores])
    assert far["mc2"] == pytest.approx(77.5)


def test_grouped_stderr_pools_the_subtasks_as_the_harness():
    # Two subjects of one group: [1, 0] and [1, 1, 0]; pooled_sample_stderr over their stderrs and sizes.
    targets, scores = [], []
    for q, (category, right) in enumerate([("g/a", 1), ("g/a", 0), ("g/b", 1), ("g/b", 1), ("g/b", 0)]):
        targets += [(q, 1, 1, category), (q, 0, 1, category)]
        scores += [0.0, -1.0] if right else [-1.0, 0.0]
    result = metrics.grouped_rank_classification(targets, scores)
    se_a, se_b = metrics.mean_stderr([1, 0]), metrics.mean_stderr([1, 1, 0])
    pooled = math.sqrt(((2 - 1) * se_a**2 * 2 + (3 - 1) * se_b**2 * 3) / (5 - 2) / 5)
    assert result["g/accuracy_stderr"] == pytest.approx(100 * pooled)
    assert result["g/accuracy"] == pytest.approx(60.0) and result["g/a/accuracy"] == 50.0
    assert result["accuracy"] == pytest.approx(60.0)


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
