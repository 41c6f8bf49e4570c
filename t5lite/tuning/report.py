"""A sweep's results: SWEEP_DIR/results.md and results.csv (a row a trial, best first) and results.png
(the metric against each hyperparameter). matplotlib draws the plot (requirements-test.txt pins it);
without it the sweep writes the tables only.

Columns: trial, one per hyperparameter, the metric (with cross-validation its mean over the folds,
then its population standard deviation and the folds' values), state, steps (trained, over all folds).
A pruned trial shows the value and step of the evaluation it was pruned at; state is complete,
pruned, failed, interrupted (queued again as a later trial), running or waiting.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState

from t5lite.tuning.space import Param
from t5lite.tuning.study import retried_numbers

STATE_ORDER = ("complete", "pruned", "running", "waiting", "failed", "interrupted")


def state_of(trial: optuna.trial.FrozenTrial, retried: set[int]) -> str:
    if trial.state == TrialState.FAIL:
        return "interrupted" if trial.number in retried else "failed"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting"}[trial.state]


def value_of(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's value; for one not complete, the last value it reported (if any)."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def ordered_trials(study: optuna.Study, mode: str) -> list[tuple[optuna.trial.FrozenTrial, str]]:
    """(trial, state) best first: complete trials by value, then pruned ones by their last value, then the rest."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    sign = 1 if mode == "min" else -1

    def key(item):
        trial, state = item
        value = value_of(trial)
        return STATE_ORDER.index(state), value is None, sign * (value or 0.0), trial.number

    return sorted(((t, state_of(t, retried)) for t in trials), key=key)


def results_table(study: optuna.Study, params: Sequence[Param], metric: str, mode: str,
                  cv_folds: int = 0) -> list[dict[str, str]]:
    """The rows of results.md / results.csv, best first, as {column: text}; floats in full."""
    rows = []
    for trial, state in ordered_trials(study, mode):
        fixed = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        row = {"trial": str(trial.number)}
        row.update({p.name: p.gin_source(fixed[p.name]) if p.name in fixed else "" for p in params})
        value = value_of(trial)
        row[metric] = "" if value is None else repr(value)
        if cv_folds:
            std = trial.user_attrs.get("std") if state == "complete" else None
            row[f"{metric} std"] = "" if std is None else repr(std)
            row["fold values"] = " ".join(f"{v:.6g}" for v in trial.user_attrs.get("fold_values", []))
        row["state"] = state
        row["steps"] = str(trial.user_attrs.get("steps", max(trial.intermediate_values, default="")))
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    """A Markdown table; floats shown to 6 significant digits."""

    def short(text: str) -> str:
        try:
            return f"{float(text):.6g}" if "." in text or "e" in text else text
        except ValueError:
            return text

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(short(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(sweep_dir: str, rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    """Writes SWEEP_DIR/results.md and results.csv (each whole, then renamed: workers may write at once);
    -> the Markdown table."""
    table = markdown(rows, columns)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, content in (("results.md", table), ("results.csv", text.getvalue())):
        _write_atomically(os.path.join(sweep_dir, name), content)
    return table


def plot_results(path: str, study: optuna.Study, params: Sequence[Param], metric: str, mode: str) -> bool:
    """PNG of the metric against each hyperparameter: complete trials as dots, pruned ones as crosses
    at their last reported value. -> False (nothing written) without matplotlib or a trial to show."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [(t, s) for t, s in ordered_trials(study, mode) if s in ("complete", "pruned") and value_of(t) is not None]
    if not shown or not params:
        return False
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False, sharey=True)
    for ax, p in zip(axes[0], params, strict=True):
        for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "gray")):
            points = [(t.params[p.name], value_of(t)) for t, s in shown if s == state and p.name in t.params]
            if not points:
                continue
            xs = [p.choices.index(x) if p.kind == "choice" else x for x, _ in points]
            ax.scatter(xs, [y for _, y in points], marker=marker, color=color, label=state)
        if p.kind == "choice":
            ax.set_xticks(range(len(p.choices)), [c if len(c) < 12 else c[:11] + "…" for c in p.choices])
        elif p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.name)
    values = [value_of(t) for t, _ in shown]
    if min(values) > 0 and max(values) > 10 * min(values):  # a diverged trial would flatten the rest
        axes[0][0].set_yscale("log")
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _write_atomically(path, buffer.getvalue())
    return True


def _write_atomically(path: str, content: str | bytes) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    os.replace(temporary, path)
