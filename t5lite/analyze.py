"""Error analysis of an evaluation: where the model is wrong, and how the errors are distributed.

    python -m t5lite.analyze runs/base/eval                              # the latest step evaluated there
    python -m t5lite.analyze runs/base/eval --step=600 --compare=runs/base2/eval --top=10

Reads the per-example records `python -m t5lite.eval` writes (EVAL_DIR/examples_step_<N>/<task>.jsonl)
and, per task, prints and writes (EVAL_DIR/analysis_step_<N>/report.md, with PNG plots beside it):
- the worst examples: multiple choice by margin (log p of the right choice minus the best other:
  the most confidently wrong first); scored tasks by loss (-log p of the target); decoded tasks,
  the wrong predictions;
- for multiple choice: the confusion matrix of right vs chosen choice position, accuracy by
  prompt-length bucket (quartiles of input tokens) and by category (MMLU subject, HellaSwag activity),
  and calibration: the expected calibration error (10 bins of the chosen choice's probability,
  softmax over the choices) and a reliability diagram;
- with --compare EVAL_DIR2 (same step, or --compare_step): the questions whose correctness flipped.
matplotlib draws the plots (requirements-test.txt pins it); without it the report has no pictures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from t5lite.errors import UserError, reports_user_errors

EXAMPLES_DIR = re.compile(r"^examples_step_(\d+)$")
CALIBRATION_BINS = 10


def latest_step(eval_dir: str) -> int:
    steps = [int(m.group(1)) for name in (os.listdir(eval_dir) if os.path.isdir(eval_dir) else [])
             if (m := EXAMPLES_DIR.match(name))]
    if not steps:
        raise UserError(f"{eval_dir} holds no examples_step_<N>/ records: run python -m t5lite.eval with "
                        f"--gin.evaluate.output_dir=\\\"{eval_dir}\\\" first.")
    return max(steps)


def read_records(eval_dir: str, step: int) -> dict[str, list[dict[str, Any]]]:
    """task -> its per-example records, from EVAL_DIR/examples_step_<step>/<task>.jsonl."""
    folder = os.path.join(eval_dir, f"examples_step_{step}")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist (steps with records: {latest_step(eval_dir)} is the latest).")
    records = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                records[name.removesuffix(".jsonl")] = [json.loads(line) for line in f if line.strip()]
    return records


def questions_of(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multiple-choice rows grouped into questions: prompt, choices, scores, gold, chosen, correct,
    margin, confidence (softmax probability of the chosen choice), input_tokens, category."""
    grouped: dict[int, list[dict]] = {}
    for row in rows:
        grouped.setdefault(int(row["question_id"]), []).append(row)
    out = []
    for question_id, choices in grouped.items():
        scores = np.array([c["score"] for c in choices], np.float64)
        gold = next((i for i, c in enumerate(choices) if c["is_correct"]), None)
        if gold is None:
            continue  # cut short by num_examples: not a whole question
        chosen = int(np.argmax(scores))
        others = np.delete(scores, gold)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        out.append({"question_id": question_id, "inputs": choices[gold]["inputs"],
                    "choices": [c["targets"] for c in choices], "scores": scores.tolist(), "gold": gold,
                    "chosen": chosen, "correct": chosen == gold,
                    "margin": float(scores[gold] - others.max()) if len(others) else 0.0,
                    "confidence": float(probs[chosen]), "input_tokens": int(choices[gold].get("input_tokens", 0)),
                    "category": choices[gold].get("category", "")})
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool],
                               bins: int = CALIBRATION_BINS) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width confidence bins: sum over bins of (n_bin / n) * |accuracy - mean confidence|;
    and the bins (low, high, n, accuracy, confidence) for a reliability diagram."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence >= low) & (confidence <= high)
        n = int(inside.sum())
        if n:
            accuracy, mean_confidence = float(correct[inside].mean()), float(confidence[inside].mean())
            ece += n / len(confidence) * abs(accuracy - mean_confidence)
            table.append({"low": float(low), "high": float(high), "n": n, "accuracy": accuracy,
                          "confidence": mean_confidence})
    return float(ece), table


def _length_buckets(questions: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    lengths = np.array([q["input_tokens"] for q in questions])
    edges = np.unique(np.quantile(lengths, [0, 0.25, 0.5, 0.75, 1.0]).round().astype(int))
    out = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = i == len(edges) - 2
        members = [q for q in questions if low <= q["input_tokens"] < high or (last and q["input_tokens"] == high)]
        if members:
            out.append((f"{low}-{high}", len(members), 100.0 * float(np.mean([q["correct"] for q in members]))))
    return out


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _plot_reliability(table: list[dict[str, float]], task: str, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    ax.bar([(b["low"] + b["high"]) / 2 for b in table], [b["accuracy"] for b in table], width=1 / CALIBRATION_BINS,
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], "o", color="C3", label="mean confidence")
    ax.set(xlabel="confidence of the chosen choice", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{task}: reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def analyze_task(task: str, rows: list[dict[str, Any]], *, top: int, out_dir: str,
                 compare_rows: list[dict[str, Any]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of one task's report and its figures (for the JSON summary)."""
    lines, summary = [f"## {task}", ""], {"examples": len(rows)}
    if rows and "question_id" in rows[0] and "score" in rows[0]:
        questions = questions_of(rows)
        if not questions:
            return lines + ["No whole question in the records.", ""], summary
        accuracy = 100.0 * float(np.mean([q["correct"] for q in questions]))
        ece, table = expected_calibration_error([q["confidence"] for q in questions], [q["correct"] for q in questions])
        summary.update(questions=len(questions), accuracy=accuracy, ece=ece)
        lines += [f"{len(questions)} questions, accuracy {accuracy:.2f}%, expected calibration error {ece:.4f}.", "",
                  f"### Worst {top} by margin (log p right - best other)", "",
                  "| margin | prompt (end) | right | chosen |", "|---|---|---|---|"]
        for q in sorted(questions, key=lambda q: q["margin"])[:top]:
            lines.append(f"| {q['margin']:.3f} | {_short(q['inputs'])} | {_short(q['choices'][q['gold']], 40)} | "
                         f"{_short(q['choices'][q['chosen']], 40)} |".replace("\n", " "))
        width = max(len(q["choices"]) for q in questions)
        matrix = np.zeros((width, width), int)
        for q in questions:
            matrix[q["gold"], q["chosen"]] += 1
        summary["confusion"] = matrix.tolist()
        lines += ["", "### Confusion matrix (rows: right choice position, columns: chosen)", "",
                  "| right \\ chosen | " + " | ".join(str(i) for i in range(width)) + " |",
                  "|---|" + "---|" * width]
        lines += [f"| {i} | " + " | ".join(str(v) for v in matrix[i]) + " |" for i in range(width)]
        lines += ["", "### Accuracy by prompt length (input tokens)", "", "| tokens | questions | accuracy |",
                  "|---|---|---|"]
        buckets = _length_buckets(questions)
        summary["by_length"] = buckets
        lines += [f"| {b} | {n} | {a:.2f} |" for b, n, a in buckets]
        categories = sorted({q["category"] for q in questions} - {""})
        if categories:
            by_category = {c: [q["correct"] for q in questions if q["category"] == c] for c in categories}
            summary["by_category"] = {c: 100.0 * float(np.mean(v)) for c, v in by_category.items()}
            lines += ["", "### Accuracy by category (lowest first)", "", "| category | questions | accuracy |",
                      "|---|---|---|"]
            for c in sorted(categories, key=lambda c: summary["by_category"][c]):
                lines.append(f"| {c} | {len(by_category[c])} | {summary['by_category'][c]:.2f} |")
        lines += ["", "### Calibration", "", "| confidence | questions | accuracy | mean confidence |",
                  "|---|---|---|---|"]
        lines += [f"| {b['low']:.1f}-{b['high']:.1f} | {b['n']} | {b['accuracy']:.3f} | {b['confidence']:.3f} |"
                  for b in table]
        png = f"{task}_reliability.png"
        if _plot_reliability(table, task, os.path.join(out_dir, png)):
            lines += ["", f"![reliability diagram of {task}]({png})"]
        if compare_rows is not None:
            lines += ["", *_flips(questions, questions_of(compare_rows), top)]
    elif rows and "score" in rows[0]:
        losses = sorted(rows, key=lambda r: r["score"])
        summary["mean_loss"] = -float(np.mean([r["score"] for r in rows]))
        lines += [f"{len(rows)} examples, mean loss {summary['mean_loss']:.3f} nats.", "",
                  f"### Worst {top} by loss", "", "| loss | inputs (end) | target |", "|---|---|---|"]
        lines += [f"| {-r['score']:.3f} | {_short(r['inputs'])} | {_short(r['targets'], 40)} |" for r in losses[:top]]
    if rows and "prediction" in rows[0]:
        wrong = [r for r in rows if not r.get("correct")]
        summary["exact_match"] = 100.0 * (1 - len(wrong) / len(rows))
        lines += ["", f"### Wrong predictions ({len(wrong)} of {len(rows)}), first {top}", "",
                  "| inputs (end) | target | prediction |", "|---|---|---|"]
        lines += [f"| {_short(r['inputs'])} | {_short(r['targets'], 40)} | {_short(r['prediction'], 40)} |"
                  for r in wrong[:top]]
    return lines + [""], summary


def _flips(questions: list[dict], other: list[dict], top: int) -> list[str]:
    before = {q["question_id"]: q for q in other}
    became_wrong = [q for q in questions if q["question_id"] in before and before[q["question_id"]]["correct"]
                    and not q["correct"]]
    became_right = [q for q in questions if q["question_id"] in before and not before[q["question_id"]]["correct"]
                    and q["correct"]]
    lines = [f"### Flipped against --compare: {len(became_right)} now right, {len(became_wrong)} now wrong", ""]
    for label, flipped in (("now wrong", became_wrong), ("now right", became_right)):
        lines += [f"{label}:", ""] + [f"- {_short(q['inputs'])} -> {_short(q['choices'][q['chosen']], 40)}"
                                      for q in flipped[:top]] + [""]
    return lines


def analyze(eval_dir: str, *, step: int | None = None, compare: str | None = None, compare_step: int | None = None,
            top: int = 10, output_dir: str | None = None) -> str:
    """Writes the report (report.md, summary.json, PNGs) and returns the path of report.md."""
    step = latest_step(eval_dir) if step is None else step
    records = read_records(eval_dir, step)
    other = None
    if compare:
        other = read_records(compare, compare_step if compare_step is not None else step)
    out_dir = output_dir or os.path.join(eval_dir, f"analysis_step_{step}")
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# Error analysis: {eval_dir}, step {step}" + (f", compared with {compare}" if compare else ""), ""]
    summaries = {}
    for task, rows in records.items():
        task_lines, summaries[task] = analyze_task(task, rows, top=top, out_dir=out_dir,
                                                   compare_rows=(other or {}).get(task) if compare else None)
        lines += task_lines
    report = os.path.join(out_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summaries, f, indent=2, default=lambda x: x if not isinstance(x, float) or math.isfinite(x) else None)
    print("\n".join(lines))
    print(f"report: {report}")
    return report


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", help="an eval output directory (with examples_step_<N>/)")
    parser.add_argument("--step", type=int, default=None, help="the step to analyse (default: the latest)")
    parser.add_argument("--compare", default=None, help="another eval directory: list the flipped questions")
    parser.add_argument("--compare_step", type=int, default=None, help="its step (default: --step's)")
    parser.add_argument("--top", type=int, default=10, help="examples per list")
    parser.add_argument("--output_dir", default=None, help="default: EVAL_DIR/analysis_step_<N>")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    analyze(args.eval_dir, step=args.step, compare=args.compare, compare_step=args.compare_step, top=args.top,
            output_dir=args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
