"""Hyperparameter sweeps over gin bindings: grid, random or Bayesian (Optuna TPE) search, trials in
parallel, bad trials pruned from their evaluations, k-fold cross-validation, a results table and plot.

    python -m t5lite.sweep --gin_file=gin/base.gin --sweep_dir=runs/lr_sweep \\
        --grid="make_schedule.learning_rate=[0.1, 0.3, 1.0]" --grid="BATCH_SIZE=[16, 32]" \\
        --metric=wikitext2_span_corruption/loss --mode=min
    python -m t5lite.sweep ... --random="make_schedule.learning_rate=loguniform(0.01, 1.0)" --trials=8
    python -m t5lite.sweep ... --bayes="make_schedule.learning_rate=loguniform(0.01, 1.0)" \\
        --bayes="make_schedule.warmup_steps=int(0, 500)" --trials=16 --workers=2
    python -m t5lite.sweep ... --cv_folds=5 --cv_stratified     # each trial: 5 runs, one a fold
    python -m t5lite.sweep ... --workers=8 --print_commands      # 8 worker commands, for a cluster

Every trial is `python -m t5lite.train` with the base gin files and bindings plus its own, in
SWEEP_DIR/trial_NNN; the trials live in an Optuna study in SWEEP_DIR/study.journal, shared by the
--workers local worker processes (or by workers started elsewhere on a shared filesystem). Running
the same command again continues the study: finished trials are kept, interrupted ones are run again
from their last checkpoint. The metric TASK/METRIC is read from each run's evaluations as it trains
(t5lite/tuning/trials.py); with a pruner, a trial whose evaluations fall below the median of the
finished trials' at the same step is stopped. The sweep ends with SWEEP_DIR/results.md, results.csv
(a row a trial, best first) and results.png. The parts are in t5lite/tuning/.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence

from t5lite.errors import UserError, reports_user_errors
from t5lite.tuning import report, space, study, trials


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin", action="append", default=[], dest="bindings", help="NAME=VALUE for every trial")
    parser.add_argument("--sweep_dir", required=True)
    parser.add_argument("--grid", action="append", default=[], help="NAME=[v1, v2, ...]: every combination")
    parser.add_argument("--random", action="append", default=[], help="NAME=DIST (t5lite/tuning/space.py), seeded")
    parser.add_argument("--bayes", action="append", default=[], help="NAME=DIST, sampled by Optuna's TPE")
    parser.add_argument("--trials", type=int, default=4, help="random / bayes: trials in the study (raise to extend)")
    parser.add_argument("--seed", type=int, default=0, help="of the samplers and the fold assignment")
    parser.add_argument("--metric", required=True, help="TASK/METRIC of the runs' evaluations")
    parser.add_argument("--mode", default="min", choices=["min", "max"])
    parser.add_argument("--workers", type=int, default=1, help="trials run at once, each by a worker process")
    parser.add_argument("--worker", type=int, default=None, help="run as worker I of --workers (set by the sweep "
                        "and by --print_commands)")
    parser.add_argument("--pruner", choices=study.PRUNERS, default=None,
                        help="median (default for random / bayes) or none (default for grid)")
    parser.add_argument("--startup_trials", type=int, default=4, help="finished trials before any is pruned and "
                        "before TPE stops sampling at random")
    parser.add_argument("--prune_warmup_steps", type=int, default=0, help="no trial is pruned before this step")
    parser.add_argument("--cv_folds", type=int, default=0, help="k-fold cross-validation on the task's train split: "
                        "K runs a trial, each evaluated on its held-out fold; the objective is their mean")
    parser.add_argument("--cv_stratified", action="store_true", help="folds keep the label (targets) ratios")
    parser.add_argument("--print_commands", action="store_true", help="print the --workers worker commands "
                        "(run them anywhere SWEEP_DIR is shared) instead of running")
    return parser


def build_sweep(args: argparse.Namespace) -> study.Sweep:
    given = [kind for kind in study.SEARCHES if getattr(args, kind)]
    if len(given) != 1:
        raise UserError("Give --grid, --random or --bayes specs (one kind, not none).")
    search = given[0]
    params = space.parse_grid(args.grid) if search == "grid" else space.parse_distributions(
        getattr(args, search), f"--{search}")
    if "/" not in args.metric:
        raise UserError(f"--metric={args.metric!r}: write TASK/METRIC, e.g. wikitext2_span_corruption/loss.")
    for name, minimum in (("trials", 1), ("workers", 1), ("startup_trials", 0), ("prune_warmup_steps", 0)):
        if getattr(args, name) < minimum:
            raise UserError(f"--{name} must be at least {minimum}, got {getattr(args, name)}.")
    if args.cv_folds == 1 or args.cv_folds < 0:
        raise UserError(f"--cv_folds={args.cv_folds}: use 2 or more folds (0: no cross-validation).")
    if args.cv_stratified and not args.cv_folds:
        raise UserError("--cv_stratified needs --cv_folds.")
    plan = trials.Plan(tuple(args.gin_file), tuple(args.bindings), args.metric, args.cv_folds, args.cv_stratified,
                       args.seed)
    pruner = args.pruner or ("none" if search == "grid" else "median")
    return study.Sweep(args.sweep_dir, search, tuple(params), plan, args.mode, args.trials, args.seed, pruner,
                       args.startup_trials, args.prune_warmup_steps)


def worker_command(args: argparse.Namespace, index: int, python: str = "python") -> list[str]:
    """The command of worker `index`: this sweep's flags, run as one worker."""
    flags = [*(f"--gin_file={f}" for f in args.gin_file), *(f"--gin={b}" for b in args.bindings),
             f"--sweep_dir={args.sweep_dir}", *(f"--{kind}={spec}" for kind in study.SEARCHES
                                                for spec in getattr(args, kind)),
             f"--trials={args.trials}", f"--seed={args.seed}", f"--metric={args.metric}", f"--mode={args.mode}",
             f"--startup_trials={args.startup_trials}", f"--prune_warmup_steps={args.prune_warmup_steps}",
             *([f"--pruner={args.pruner}"] if args.pruner else []),
             *([f"--cv_folds={args.cv_folds}"] if args.cv_folds else []), *(["--cv_stratified"] if args.cv_stratified
                                                                           else []), f"--worker={index}"]
    return [python, "-m", "t5lite.sweep", *flags]


def run_workers(args: argparse.Namespace) -> None:
    """--workers processes of this sweep, until all have ended. Ctrl-C reaches them (one process group);
    a SIGTERM to this process is passed on to each."""
    processes = [subprocess.Popen(worker_command(args, i, python=sys.executable)) for i in range(args.workers)]

    def forward(signum, frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [p.wait() for p in processes]
    except KeyboardInterrupt:  # the workers got it too: they stop their runs and queue their trials again
        for p in processes:
            p.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(codes):
        print(f"[sweep] worker exit codes: {codes}", file=sys.stderr, flush=True)


def write_report(sweep: study.Sweep, the_study, show: bool = True) -> bool:
    """results.md, results.csv, results.png in SWEEP_DIR and (show) the table on stdout; -> any trial complete?"""
    metric = sweep.plan.metric
    rows = report.results_table(the_study, sweep.params, metric, sweep.mode, sweep.plan.cv_folds)
    columns = ["trial", *(p.name for p in sweep.params), metric,
               *([f"{metric} std", "fold values"] if sweep.plan.cv_folds else []), "state", "steps"]
    table = report.write_results(sweep.sweep_dir, rows, columns)
    plotted = report.plot_results(sweep.path("results.png"), the_study, sweep.params, metric, sweep.mode)
    if show:
        print(table, end="")
        written = ["results.md", "results.csv"] + (["results.png"] if plotted else [])
        print(f"[sweep] {', '.join(os.path.join(sweep.sweep_dir, w) for w in written)}", flush=True)
    return any(r["state"] == "complete" for r in rows)


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sweep = build_sweep(args)
    if args.print_commands:
        print("\n".join(shlex.join(worker_command(args, i)) for i in range(args.workers)))
        return 0
    try:
        if args.workers > 1 and args.worker is None:
            the_study = study.open_study(sweep)  # made once, before its workers start
            run_workers(args)
        else:
            index = args.worker or 0
            the_study = study.open_study(sweep, index)
            label = "[sweep]" if args.worker is None else f"[sweep worker {index}]"
            study.Worker(sweep, the_study, label).run()
    except (KeyboardInterrupt, trials.Stopped):
        print(f"[sweep] stopped; run the same command to continue the study in {sweep.sweep_dir}.", file=sys.stderr,
              flush=True)
        return 128 + signal.SIGINT
    # A worker of a parallel sweep writes the files (the last one to end leaves the whole table); its
    # sweep's command, or the same command run again, prints it.
    return 0 if write_report(sweep, the_study, show=args.worker is None) else 1


if __name__ == "__main__":
    sys.exit(main())
