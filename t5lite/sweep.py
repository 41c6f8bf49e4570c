"""Hyperparameter sweeps over gin bindings: one training run per trial, then a results table.

    python -m t5lite.sweep --gin_file=gin/base.gin --sweep_dir=runs/lr_sweep \\
        --grid="make_schedule.learning_rate=[0.1, 0.3, 1.0]" --grid="BATCH_SIZE=[16, 32]" \\
        --metric=wikitext2_span_corruption/loss --mode=min
    python -m t5lite.sweep ... --random="make_schedule.learning_rate=loguniform(0.01, 1.0)" --trials=8
    python -m t5lite.sweep ... --print_commands        # one command per trial, for a cluster

Each trial trains with the base gin files plus its bindings into SWEEP_DIR/trial_NNN (so an
interrupted sweep resumes: finished trials are read, not rerun). The table (SWEEP_DIR/
results.tsv and stdout) lists every trial's bindings and its final eval metric TASK/METRIC.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
from collections.abc import Sequence

from t5lite import run_dir
from t5lite.errors import UserError, reports_user_errors


def parse_grid(specs: Sequence[str]) -> list[dict[str, object]]:
    """["NAME=[v1, v2]", ...] -> the cartesian product as a list of {NAME: value}."""
    axes = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        try:
            parsed = ast.literal_eval(values.strip()) if sep else None
        except (ValueError, SyntaxError) as e:
            raise UserError(f"--grid {spec!r}: the values must be a Python list literal ({e}).") from e
        if not isinstance(parsed, list) or not parsed:
            raise UserError(f"--grid {spec!r}: write NAME=[value, ...] with at least one value.")
        axes.append([(name.strip(), v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)]


def sample_random(specs: Sequence[str], trials: int, seed: int) -> list[dict[str, object]]:
    """["NAME=uniform(a, b)" | "NAME=loguniform(a, b)" | "NAME=choice([...])"] -> `trials` samples."""
    rng = random.Random(seed)
    parsed = []
    for spec in specs:
        name, _, dist = spec.partition("=")
        kind, _, args = dist.strip().partition("(")
        try:
            values = ast.literal_eval(f"({args}") if args else None
        except (ValueError, SyntaxError) as e:
            raise UserError(f"--random {spec!r}: could not read the arguments ({e}).") from e
        if kind not in ("uniform", "loguniform", "choice"):
            raise UserError(f"--random {spec!r}: use uniform(a, b), loguniform(a, b) or choice([...]).")
        parsed.append((name.strip(), kind, values))

    def draw(kind, values):
        if kind == "choice":
            return rng.choice(values)
        low, high = values
        return rng.uniform(low, high) if kind == "uniform" else math.exp(rng.uniform(math.log(low), math.log(high)))

    return [{name: draw(kind, values) for name, kind, values in parsed} for _ in range(trials)]


def gin_value(value: object) -> str:
    """A Python value as gin source (strings quoted, floats exact)."""
    return repr(value)


def trial_command(
    gin_files: Sequence[str], bindings: Sequence[str], trial: dict[str, object], model_dir: str
) -> list[str]:
    return [sys.executable, "-m", "t5lite.train", *(f"--gin_file={f}" for f in gin_files),
            *(f"--gin.{b}" for b in bindings), *(f"--gin.{k}={gin_value(v)}" for k, v in trial.items()),
            f"--gin.MODEL_DIR={gin_value(model_dir)}"]


def trial_metric(model_dir: str, metric: str) -> float | None:
    """TASK/METRIC from the trial's eval_results.json, or None if it has not finished."""
    path = run_dir.path(model_dir, run_dir.EVAL_RESULTS)
    if not os.path.exists(path):
        return None
    task, _, name = metric.rpartition("/")
    with open(path) as f:
        tasks = json.load(f)["tasks"]
    if task not in tasks or name not in tasks[task]:
        raise UserError(f"{path} has no {metric!r}; it has {[f'{t}/{m}' for t in tasks for m in tasks[t]]}.")
    return float(tasks[task][name])


def results_table(trials: Sequence[dict[str, object]], values: Sequence[float | None], metric: str, mode: str) -> str:
    names = sorted({k for t in trials for k in t})
    order = sorted(range(len(trials)), key=lambda i: (values[i] is None,
                                                      (values[i] or 0.0) * (1 if mode == "min" else -1)))
    rows = ["\t".join(["trial", *names, metric])]
    for i in order:
        shown = "failed" if values[i] is None else f"{values[i]:.6g}"
        rows.append("\t".join([f"trial_{i:03d}", *(gin_value(trials[i].get(n, "")) for n in names), shown]))
    return "\n".join(rows)


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin", action="append", default=[], dest="bindings", help="NAME=VALUE for every trial")
    parser.add_argument("--sweep_dir", required=True)
    parser.add_argument("--grid", action="append", default=[])
    parser.add_argument("--random", action="append", default=[])
    parser.add_argument("--trials", type=int, default=4, help="random search: number of trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", required=True, help="TASK/METRIC from eval_results.json")
    parser.add_argument("--mode", default="min", choices=["min", "max"])
    parser.add_argument("--print_commands", action="store_true")
    args = parser.parse_args(argv)
    if bool(args.grid) == bool(args.random):
        raise UserError("Give --grid specs or --random specs (not both, not neither).")
    trials = parse_grid(args.grid) if args.grid else sample_random(args.random, args.trials, args.seed)
    os.makedirs(args.sweep_dir, exist_ok=True)
    dirs = [os.path.abspath(os.path.join(args.sweep_dir, f"trial_{i:03d}")) for i in range(len(trials))]
    commands = [trial_command(args.gin_file, args.bindings, t, d) for t, d in zip(trials, dirs, strict=True)]
    if args.print_commands:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    values = []
    for i, (command, model_dir) in enumerate(zip(commands, dirs, strict=True)):
        value = trial_metric(model_dir, args.metric)
        if value is None:  # not finished before: run (or resume) it
            print(f"[sweep] trial {i + 1}/{len(trials)}: {trials[i]}", flush=True)
            done = subprocess.run(command)
            value = trial_metric(model_dir, args.metric) if done.returncode == 0 else None
        values.append(value)
    table = results_table(trials, values, args.metric, args.mode)
    with open(os.path.join(args.sweep_dir, "results.tsv"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0 if any(v is not None for v in values) else 1


if __name__ == "__main__":
    sys.exit(main())
