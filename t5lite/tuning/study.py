"""The sweep's Optuna study, shared by its workers through SWEEP_DIR/study.journal, and a worker's loop.

    SWEEP_DIR/study.journal     the study: every trial, its params, reported values and state (an
                                Optuna journal file: appends under a lock file, which works on NFS)
    SWEEP_DIR/trial_NNN/        a trial's MODEL_DIR (cross-validation: trial_NNN/fold_K/, one a fold)
    SWEEP_DIR/trial_NNN.log     the trial's training output; its worker touches it while it runs

Grid and random sweeps put all their trials in the study when it is made (so trial NNN is the same
combination or sample however many workers run it); a Bayesian sweep asks Optuna's TPE sampler for
each new trial's params, from the trials finished so far. A worker claims one trial at a time, under
SWEEP_DIR/claim.lock, until the sweep has its trials.

Resuming: finished trials (complete, pruned, failed) stay as they are. A trial whose worker is gone
(the process ended on this host, or its log went untouched for STALE_SECONDS) or was stopped is
marked failed and queued again with the same params and MODEL_DIR: its retry continues from the run's
last checkpoint. Failed trials whose run failed (not interrupted) are not retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.trial import TrialState

from t5lite.errors import UserError
from t5lite.tuning import space as space_lib
from t5lite.tuning import trials as trials_lib

JOURNAL = "study.journal"
CLAIM_LOCK = "claim"  # SWEEP_DIR/claim.lock while a worker claims a trial
STUDY_NAME = "t5lite_sweep"
STALE_SECONDS = 300.0  # a running trial whose log is untouched this long (its worker is gone) is retried
SEARCHES = ("grid", "random", "bayes")
PRUNERS = ("median", "none")

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial event


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep's settings. The identity (all but trials and the pruner's) must match to resume a study."""

    sweep_dir: str
    search: str  # grid, random or bayes
    params: tuple[space_lib.Param, ...]
    plan: trials_lib.Plan
    mode: str = "min"
    trials: int = 4  # random / bayes: how many the study should have (grid: every combination)
    seed: int = 0
    pruner: str = "median"
    startup_trials: int = 4  # nothing is pruned, and TPE samples at random, until this many have finished
    prune_warmup_steps: int = 0  # nor before this step

    def identity(self) -> dict:
        return json.loads(json.dumps({
            "search": self.search, "space": space_lib.describe(self.params), "mode": self.mode, "seed": self.seed,
            "plan": dataclasses.asdict(self.plan)}))

    def planned(self) -> list[dict[str, object]]:
        """The trials of a grid or random sweep, in order (bayes: none)."""
        if self.search == "grid":
            return space_lib.grid_points(self.params)
        if self.search == "random":
            return space_lib.sample_random(self.params, self.trials, self.seed)
        return []

    def path(self, *parts: str) -> str:
        return os.path.join(self.sweep_dir, *parts)


@contextlib.contextmanager
def claim_lock(sweep: Sweep) -> Iterator[None]:
    """One worker at a time makes the study or claims a trial (on any host sharing SWEEP_DIR)."""
    lock = JournalFileSymlinkLock(sweep.path(CLAIM_LOCK))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def open_study(sweep: Sweep, worker_index: int = 0) -> optuna.Study:
    """The study in SWEEP_DIR (made, with its planned trials, if new); fails if SWEEP_DIR holds another
    sweep's. The sampler's seed comes from --seed, worker_index and the trials the study has: workers,
    and the same worker when a sweep is continued, would otherwise draw the same params again."""
    os.makedirs(sweep.sweep_dir, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(sweep.path(JOURNAL)))  # its lock: a symlink, safe on NFS
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials,
                                          n_warmup_steps=sweep.prune_warmup_steps)
              if sweep.pruner == "median" else optuna.pruners.NopPruner())
    with claim_lock(sweep):
        exists = STUDY_NAME in optuna.study.get_all_study_names(storage)
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, pruner=pruner,
                                    direction="minimize" if sweep.mode == "min" else "maximize", load_if_exists=True)
        seed = random.Random(f"{sweep.seed}/{worker_index}/{len(study.trials)}").getrandbits(32)
        study.sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup_trials,
                                                    constant_liar=True)
                         if sweep.search == "bayes" else optuna.samplers.RandomSampler(seed=seed))
        if not exists:
            study.set_user_attr("sweep", sweep.identity())
            study.set_user_attr("planned", 0)
        elif study.user_attrs.get("sweep") != sweep.identity():
            raise UserError(f"{sweep.path(JOURNAL)} holds the study of another sweep ("
                            f"{_differences(study.user_attrs.get('sweep') or {}, sweep.identity())}). Resume it "
                            "with its own flags, or give a new --sweep_dir.")
        planned = sweep.planned()
        for params in planned[study.user_attrs["planned"]:]:  # random: raising --trials adds samples
            study.enqueue_trial(params)
        study.set_user_attr("planned", max(len(planned), study.user_attrs["planned"]))
    return study


def _differences(stored: dict, given: dict) -> str:
    keys = sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))
    return "; ".join(f"{k}: {stored.get(k)!r} there, {given.get(k)!r} now" for k in keys)


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials that were interrupted and queued again (each retry records `retry_of`)."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


class Worker:
    """Claims trials of the study and runs them, one at a time, until the sweep has all its trials."""

    def __init__(self, sweep: Sweep, study: optuna.Study, label: str = "[sweep]"):
        self.sweep, self.study, self.label = sweep, study, label
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8]

    def run(self) -> int:
        """Runs trials until none is left to claim; -> how many it ran. SIGTERM stops it as Ctrl-C does:
        the running trial's run checkpoints, the trial is queued again, and the exception propagates."""

        def stop(signum, frame):
            raise trials_lib.Stopped(f"signal {signum}")

        main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
        previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
        ran = 0
        try:
            while (claimed := self.claim()) is not None:
                self.run_one(*claimed)
                ran += 1
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        return ran

    # --- Claiming ----------------------------------------------------------------------------------
    def claim(self) -> tuple[optuna.Trial, dict[str, str], str] | None:
        """The next trial (a queued one first), its bindings {name: gin source} and MODEL_DIR name, or None."""
        with claim_lock(self.sweep):
            self.requeue_interrupted()
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            retried = retried_numbers(trials)
            counted = sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))
            if not waiting and (self.sweep.search != "bayes" or counted >= self.sweep.trials):
                return None
            trial = self.study.ask()
            model_dir = trial.user_attrs.get("model_dir") or f"trial_{trial.number:03d}"
            trial.set_user_attr("model_dir", model_dir)
            trial.set_user_attr("worker", f"{self.host}:{self.pid}:{self.token}")
            values = {p.name: p.suggest(trial) for p in self.sweep.params}
        return trial, {p.name: p.gin_source(values[p.name]) for p in self.sweep.params}, model_dir

    def requeue_interrupted(self) -> None:
        """Running trials whose worker is gone: failed, and queued again (same params and MODEL_DIR)."""
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host, pid, token = (t.user_attrs.get("worker", "") + "::").split(":")[:3]
            log = self.sweep.path(t.user_attrs.get("model_dir", f"trial_{t.number:03d}") + ".log")
            heartbeat = os.path.getmtime(log) if os.path.exists(log) else t.datetime_start.timestamp()
            gone = host == self.host and (not _alive(int(pid or 0)) or (int(pid) == self.pid and token != self.token))
            if gone or now - heartbeat > STALE_SECONDS:
                self.requeue(t.number)

    def requeue(self, number: int) -> None:
        """Trial `number` (running) fails, and a copy of it is queued: same params, same MODEL_DIR."""
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}  # fixed: grid, random, retries
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        self.study.enqueue_trial(params, user_attrs={"retry_of": number,
                                                     "model_dir": trial.user_attrs.get("model_dir")})
        print(f"{self.label} trial {number} was interrupted: queued again", flush=True)

    # --- Running -----------------------------------------------------------------------------------
    def run_one(self, trial: optuna.Trial, bindings: dict[str, str], model_dir: str) -> None:
        metric = self.sweep.plan.metric
        shown = ", ".join(f"{k}={v}" for k, v in bindings.items())
        print(f"{self.label} trial {trial.number}: {shown} ({self.sweep.path(model_dir)})", flush=True)

        def report(value: float, step: int) -> bool:
            trial.report(value, step)
            print(f"{self.label} trial {trial.number} step {step}: {metric} {value:.6g}", flush=True)
            return trial.should_prune()

        try:
            outcome = trials_lib.run_trial(self.sweep.plan, bindings, os.path.abspath(self.sweep.path(model_dir)),
                                           self.sweep.path(model_dir + ".log"), report)
        except (KeyboardInterrupt, trials_lib.Stopped):
            with claim_lock(self.sweep):
                self.requeue(trial.number)
            raise
        except UserError as e:
            trial.set_user_attr("error", str(e))
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("steps", outcome.steps)
        if outcome.fold_values:
            trial.set_user_attr("fold_values", outcome.fold_values)
        if outcome.std is not None and outcome.state == "complete":
            trial.set_user_attr("std", outcome.std)
        if outcome.state == "complete":
            self.study.tell(trial, outcome.value)
            spread = f" (mean of {len(outcome.fold_values)} folds, std {outcome.std:.4g})" if outcome.std is not None \
                else ""
            print(f"{self.label} trial {trial.number} complete: {metric} {outcome.value:.6g}{spread}", flush=True)
        elif outcome.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            print(f"{self.label} trial {trial.number} pruned at step {outcome.steps}", flush=True)
        else:
            trial.set_user_attr("error", outcome.error)
            self.study.tell(trial, state=TrialState.FAIL)
            print(f"{self.label} trial {trial.number} failed: {outcome.error}", flush=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
