"""One trial of a sweep: `python -m t5lite.train` with the trial's bindings (once per fold with
cross-validation), its evaluations reported as the run writes them, stopped when they are bad.

A run writes each evaluation to MODEL_DIR/metrics.jsonl as a row {"group": "eval/TASK" (teacher-forced)
or "infer_eval/TASK" (decoded), "step": S, METRIC: value, ...}; the trial reads the rows of its metric
"TASK/METRIC" while the run trains. As in early stopping (evaluation.merge_results), the teacher-forced
"accuracy" (of next-token predictions) is named "token_accuracy", so "TASK/accuracy" is a decoded
metric. A run's value is the metric at its last evaluation; with cross-validation the trial's value is
the mean over its folds. A stopped run (pruned, or the sweep interrupted) gets SIGTERM: it saves a
checkpoint at the step it is at and exits, so a retried trial continues from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from t5lite import run_dir
from t5lite.data.splits import FoldSplit
from t5lite.errors import UserError
from t5lite.tuning.space import gin_value

TRAIN_PROGRAM: tuple[str, ...] = ("-m", "t5lite.train")  # after sys.executable; the tests put a stand-in here
POLL_SECONDS = 1.0  # how often a running trial's metrics are read (and its log touched: the heartbeat)
STOP_GRACE_SECONDS = 300.0  # a stopped run's time to save its checkpoint before it is killed
LOG_TAIL_LINES = 15

Report = Callable[[float, int], bool]  # (value, step) -> stop the trial (pruned)?


class Stopped(Exception):
    """The sweep was asked to stop (SIGTERM); the trial is retried when the sweep runs again."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every trial of a sweep shares: the base run's gin files and bindings, the metric, the folds."""

    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    metric: str  # TASK/METRIC
    cv_folds: int = 0  # 0: one run a trial on the task's own splits
    cv_stratified: bool = False
    cv_seed: int = 0  # which rows go to which fold

    def runs(self, model_dir: str) -> list[tuple[str, dict[str, str]]]:
        """(MODEL_DIR, bindings of its own) of each training run of a trial in `model_dir`."""
        if not self.cv_folds:
            return [(model_dir, {})]
        out = []
        for k in range(self.cv_folds):
            fold = FoldSplit("train", k, self.cv_folds, stratified=self.cv_stratified, seed=self.cv_seed)
            heldout = dataclasses.replace(fold, heldout=True)
            out.append((os.path.join(model_dir, f"fold_{k}"), {"DataConfig.split": gin_value(str(fold)),
                                                               "EvalConfig.split": gin_value(str(heldout))}))
        return out


def train_command(plan: Plan, bindings: Mapping[str, str], model_dir: str) -> list[str]:
    """The training command of one run; bindings: {gin name: gin source}."""
    return [sys.executable, *TRAIN_PROGRAM, *(f"--gin_file={f}" for f in plan.gin_files),
            *(f"--gin.{b}" for b in plan.bindings), *(f"--gin.{k}={v}" for k, v in bindings.items()),
            f"--gin.MODEL_DIR={gin_value(model_dir)}"]


class MetricReader:
    """The values of TASK/METRIC by step in a run's metrics.jsonl, read as the file grows."""

    def __init__(self, model_dir: str, metric: str):
        self.path = run_dir.path(model_dir, run_dir.METRICS)
        self.task, _, self.name = metric.rpartition("/")
        self.values: dict[int, float] = {}
        self.seen: set[str] = set()  # TASK/METRIC of every evaluation row read
        self.last_step = 0  # of any row (training or evaluation)
        self._offset = 0

    def poll(self) -> list[tuple[int, float]]:
        """(step, value) of the metric's rows written since the last call, by step."""
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self._offset:  # rewritten: a resumed run set aside the rows past its checkpoint
            self._offset = 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a row being written is read next time
        self._offset += len(complete)
        new = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            step = int(row.get("step", 0))
            self.last_step = max(self.last_step, step)
            kind, _, task = str(row.get("group", "")).partition("/")
            if kind not in ("eval", "infer_eval"):
                continue
            names = {("token_accuracy" if kind == "eval" and k == "accuracy" else k): v for k, v in row.items()
                     if k not in ("group", "step")}
            self.seen |= {f"{task}/{k}" for k in names}
            if task == self.task and self.name in names and step not in self.values:
                self.values[step] = float(names[self.name])
                new.append((step, self.values[step]))
        return sorted(new)

    def last_value(self) -> float | None:
        return self.values[max(self.values)] if self.values else None


@dataclasses.dataclass
class Outcome:
    """How a trial (or one run of it) ended. state: complete, pruned or failed."""

    state: str
    value: float | None = None  # the trial's: the mean over folds (pruned: the last value reported)
    fold_values: list[float] = dataclasses.field(default_factory=list)
    steps: int = 0  # trained, over all folds
    error: str = ""

    @property
    def std(self) -> float | None:
        """Population standard deviation over the folds (None without cross-validation)."""
        return statistics.pstdev(self.fold_values) if len(self.fold_values) > 1 else None


def run_trial(plan: Plan, bindings: Mapping[str, str], model_dir: str, log_path: str, report: Report) -> Outcome:
    """Trains each run of the trial in turn, reporting (value, step) of every evaluation; with folds
    the steps count on across them (fold 1's step 10 of 10-step runs is step 20), so every trial
    reports the same steps. A run that finished before (eval_results.json) is read, not rerun."""
    fold_values, offset = [], 0
    for directory, extra in plan.runs(model_dir):
        run = run_training(train_command(plan, {**bindings, **extra}, directory), directory, plan.metric, log_path,
                           lambda value, step, offset=offset: report(value, offset + step))
        offset += run.steps
        if run.state != "complete":
            return Outcome(run.state, run.value, fold_values, offset, run.error)
        fold_values.append(run.value)
    return Outcome("complete", statistics.fmean(fold_values), fold_values, offset)


def run_training(command: Sequence[str], model_dir: str, metric: str, log_path: str, report: Report) -> Outcome:
    """One training run, its output appended to log_path (touched every POLL_SECONDS: the trial's
    heartbeat). Stopped with SIGTERM when report() says so (-> pruned), or on KeyboardInterrupt /
    Stopped (re-raised). A run that ends well without the metric is a UserError naming those it has."""
    reader = MetricReader(model_dir, metric)
    if os.path.exists(run_dir.path(model_dir, run_dir.EVAL_RESULTS)):  # finished before the sweep stopped
        return _finished(reader, report)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        # A session of its own: Ctrl-C reaches the sweep alone, which then stops the run with one SIGTERM.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                exited = process.poll() is not None
                for step, value in reader.poll():
                    if report(value, step):
                        _stop(process)
                        return Outcome("pruned", value, steps=step)
                if exited:
                    break
                os.utime(log_path)
                time.sleep(POLL_SECONDS)
        except BaseException:
            _stop(process)
            raise
    if process.returncode != 0:
        return Outcome("failed", steps=reader.last_step,
                       error=f"exit code {process.returncode}; the end of {log_path}:\n{_tail(log_path)}")
    return _finished(reader, report)


def _finished(reader: MetricReader, report: Report) -> Outcome:
    for step, value in reader.poll():
        if report(value, step):
            return Outcome("pruned", value, steps=step)
    value = reader.last_value()
    if value is None:
        raise UserError(f"The run in {os.path.dirname(reader.path)} has no evaluation of "
                        f"{reader.task}/{reader.name}; its evaluations give {sorted(reader.seen) or 'nothing'}. "
                        "Choose one of them as --metric (and start the sweep again in a new --sweep_dir).")
    return Outcome("complete", value, steps=reader.last_step)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM (the run checkpoints and exits), then SIGKILL after STOP_GRACE_SECONDS."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-LOG_TAIL_LINES:])
