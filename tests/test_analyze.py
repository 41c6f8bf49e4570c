"""python -m t5lite.analyze on per-example records with known scores: worst examples, confusion matrix,
accuracy by length and category, calibration (ECE by hand), flips against another evaluation."""

import json
import math
import os

import pytest

from t5lite import analyze
from t5lite.errors import UserError


def _write(eval_dir, step, task, questions):
    """questions: (scores per choice, gold, input_tokens, category)."""
    folder = os.path.join(eval_dir, f"examples_step_{step}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{task}.jsonl"), "w") as f:
        for qid, (scores, gold, tokens, category) in enumerate(questions):
            for i, s in enumerate(scores):
                f.write(json.dumps({"index": 0, "inputs": f"question {qid}", "targets": f" choice {i}",
                                    "input_tokens": tokens, "question_id": qid, "is_correct": int(i == gold),
                                    "choice_length": 8, "category": category, "score": s}) + "\n")


QUESTIONS = [  # two-way: probabilities from the log-likelihoods
    ([math.log(0.9), math.log(0.1)], 0, 10, "a"),   # right, confidence 0.9
    ([math.log(0.8), math.log(0.2)], 1, 20, "a"),   # wrong, confidence 0.8, margin log(.2/.8)
    ([math.log(0.3), math.log(0.7)], 1, 30, "b"),   # right, confidence 0.7
    ([math.log(0.6), math.log(0.4)], 0, 40, "b"),   # right, confidence 0.6
]


def test_report_sections_and_figures(tmp_path, capsys):
    eval_dir = str(tmp_path / "eval")
    _write(eval_dir, 5, "toy", QUESTIONS)
    report = analyze.analyze(eval_dir)
    assert report == os.path.join(eval_dir, "analysis_step_5", "report.md")
    summary = json.load(open(os.path.join(eval_dir, "analysis_step_5", "summary.json")))["toy"]
    assert summary["questions"] == 4 and summary["accuracy"] == 75.0
    # Bins: 0.6 -> (0.5, 0.6] acc 1; 0.7 -> (0.6, 0.7] acc 1; 0.8 -> (0.7, 0.8] acc 0; 0.9 -> (0.8, 0.9] acc 1.
    assert summary["ece"] == pytest.approx((0.4 + 0.3 + 0.8 + 0.1) / 4)
    assert summary["confusion"] == [[2, 0], [1, 1]]  # right 0: both chosen 0; right 1: one chosen 0
    assert summary["by_category"] == {"a": 50.0, "b": 100.0}
    text = open(report).read()
    worst = text.split("### Worst 10 by margin")[1].splitlines()[4]
    assert worst.startswith(f"| {math.log(0.2 / 0.8):.3f} | question 1 |")
    assert "### Accuracy by prompt length" in text and "### Calibration" in text
    assert os.path.getsize(os.path.join(eval_dir, "analysis_step_5", "toy_reliability.png")) > 1000
    assert "![reliability diagram of toy](toy_reliability.png)" in text
    assert "expected calibration error 0.4000" in capsys.readouterr().out


def test_compare_lists_the_questions_whose_correctness_flipped(tmp_path):
    before, after = str(tmp_path / "before"), str(tmp_path / "after")
    _write(before, 5, "toy", QUESTIONS)
    flipped = [QUESTIONS[0], ([math.log(0.1), math.log(0.9)], 1, 20, "a"), QUESTIONS[2],
               ([math.log(0.1), math.log(0.9)], 0, 40, "b")]
    _write(after, 5, "toy", flipped)
    assert analyze.main([after, f"--compare={before}"]) == 0
    text = open(os.path.join(after, "analysis_step_5", "report.md")).read()
    assert "Flipped against --compare: 1 now right, 1 now wrong" in text
    assert "now wrong:\n\n- question 3 -> choice 1" in text and "now right:\n\n- question 1 -> choice 1" in text


def test_a_directory_without_records_says_how_to_make_them(tmp_path):
    with pytest.raises(UserError, match="holds no examples_step_<N>/ records"):
        analyze.analyze(str(tmp_path))
