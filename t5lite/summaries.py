"""Metrics out: console progress lines, TensorBoard events and a JSON-lines log in MODEL_DIR.

Only the chief process (index 0) writes; other processes get a disabled writer.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from t5lite import fileio, run_dir


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(step: int, total: int, metrics: Mapping[str, float], rates: Mapping[str, float], eta_s: float) -> str:
    """e.g. 'step  100/1000 | loss 4.3210 | acc 0.231 | lr 1.00e-02 | 2.31 steps/s | 12.3k tok/s (9.8k real) |
    MFU 41.2% | ETA 6m30s' (MFU when `rates` has it). A preference run (no token accuracy) shows its
    reward accuracy and margin instead of 'acc', a GRPO run its mean reward (and KL, with a KL term)."""
    width = len(str(total))
    mfu = f"MFU {rates['mfu']:.1%} | " if "mfu" in rates else ""
    if "accuracy" in metrics:
        quality = f"acc {metrics['accuracy']:.3f} | "
    elif "reward" in metrics:
        quality = f"reward {metrics['reward']:.3f} | " + (f"kl {metrics['kl']:.4f} | " if "kl" in metrics else "")
    else:
        quality = f"reward acc {metrics['rewards/accuracies']:.3f} | margin {metrics['rewards/margins']:.3f} | "
    return (
        f"step {step:>{width}d}/{total} | loss {metrics['loss']:.4f} | {quality}"
        f"lr {metrics['learning_rate']:.2e} | {rates['steps_per_s']:.2f} steps/s | "
        f"{rates['tokens_per_s'] / 1e3:.1f}k tok/s ({rates['real_tokens_per_s'] / 1e3:.1f}k real) | "
        f"{mfu}ETA {format_duration(eta_s)}"
    )


class Progress:
    """A console line every `every_s` seconds of a long loop (decoding, scoring): what is done of
    the total, the rate and the time left, e.g. 'infer: 120/1059 batches | 4.10 batches/s | ETA 3m49s'.

        progress = Progress("infer", total=num_batches, enabled=is_chief)
        for batch in progress.track(batches):
            ...

    The rate is measured from the end of the first unit on, so a first call's compilation is not
    counted as the loop's speed. A loop shorter than every_s prints nothing; a longer one ends with
    a line of its total time.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "batches", every_s: float = 10.0,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic,
                 print_fn: Callable[[str], None] | None = None):
        self.label, self.total, self.unit, self.every_s, self.enabled = label, total, unit, every_s, enabled
        self.clock, self.print_fn = clock, print_fn or functools.partial(print, flush=True)
        self.done, self.printed = 0, False
        self.start = self.last_print = self.clock()
        self.first_done_at: float | None = None  # when the first unit finished (compile included)

    def rate(self, now: float) -> float | None:
        """Units per second after the first unit; None until two units are done."""
        if self.first_done_at is None or self.done < 2 or now <= self.first_done_at:
            return None
        return (self.done - 1) / (now - self.first_done_at)

    def line(self, now: float) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.label}: {self.done}{total} {self.unit}"]
        rate = self.rate(now)
        if rate is not None:
            parts.append(f"{rate:.2f} {self.unit}/s")
            if self.total is not None:
                parts.append(f"ETA {format_duration(max(self.total - self.done, 0) / rate)}")
        return " | ".join(parts)

    def update(self, n: int = 1) -> None:
        """Counts `n` more units done; prints a line if every_s has passed since the last one."""
        self.done += n
        now = self.clock()
        if self.first_done_at is None:
            self.first_done_at = now
        if self.enabled and now - self.last_print >= self.every_s:
            self.print_fn(self.line(now))
            self.last_print, self.printed = now, True

    def finish(self) -> None:
        """After the loop: its total time, if it ran long enough to print progress."""
        if self.enabled and self.printed:
            self.print_fn(f"{self.label}: {self.done} {self.unit} in {format_duration(self.clock() - self.start)}")

    def track(self, iterable: Iterable) -> Iterator:
        """Yields the items of `iterable`, counting one unit after each is processed; then finish().
        Under stops_on_interrupt, Ctrl-C raises KeyboardInterrupt here, between two items."""
        _Interrupt.loops += 1
        try:
            for item in iterable:
                yield item
                self.update()
                if _Interrupt.requested:
                    raise KeyboardInterrupt
        finally:
            _Interrupt.loops -= 1
        self.finish()


class _Interrupt:
    """Ctrl-C while a tracked loop runs stops it at its next item. Python raises KeyboardInterrupt
    wherever the main thread is; inside an object's finalizer (tf.data iterators, jax arrays being
    collected) it is printed and dropped, and the loop went on: seen once in a few runs under load."""

    requested = False
    loops = 0  # Progress.track loops running

    @classmethod
    def handle(cls, signum, frame) -> None:
        if not cls.loops:
            raise KeyboardInterrupt
        cls.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C acts at once


def stops_on_interrupt(message: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates an entry point's main(argv) -> exit code: Ctrl-C (SIGINT) ends it with `message`, one
    line on stderr, and exit code 130 (128 + SIGINT, as a shell reports a process ended by SIGINT),
    instead of a KeyboardInterrupt traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
            previous = signal.signal(signal.SIGINT, _Interrupt.handle) if main_thread else None
            _Interrupt.requested = False
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(message, file=sys.stderr, flush=True)
                return 128 + signal.SIGINT
            finally:
                if main_thread:
                    signal.signal(signal.SIGINT, previous)

        return wrapped

    return decorate


class MetricsWriter:
    """Writes scalars to MODEL_DIR/tensorboard/<group> and MODEL_DIR/metrics.jsonl.

    resumed_at: the step a resumed run starts from. The rows of later steps (written by the attempt
    that crashed, and about to be re-run) move to metrics.superseded.jsonl, so metrics.jsonl holds
    one row per group and step. A write that fails (a full disk) is one line on stderr; its rows are
    kept and written with the next ones, and training goes on.
    """

    def __init__(self, model_dir: str, enabled: bool = True, resumed_at: int | None = None):
        self.enabled = enabled
        self.model_dir = model_dir
        self.path = run_dir.path(model_dir, run_dir.METRICS)
        self._tb = {}
        self._unwritten: list[str] = []
        self._failing = False
        if enabled and resumed_at is not None and fileio.exists(self.path):
            self._set_aside_rows_after(resumed_at)

    def _set_aside_rows_after(self, step: int) -> None:
        with fileio.open_file(self.path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        keep, later = [], []
        for line in lines:
            try:
                (later if json.loads(line).get("step", 0) > step else keep).append(line)
            except ValueError:  # a row cut short by the crash
                later.append(line)
        if not later:
            return
        with fileio.open_file(run_dir.path(self.model_dir, run_dir.METRICS_SUPERSEDED), "a") as f:
            f.write("".join(line + "\n" for line in later))
        temporary = self.path + ".tmp"
        with fileio.open_file(temporary, "w") as f:
            f.write("".join(line + "\n" for line in keep))
        fileio.rename(temporary, self.path)

    def _tb_writer(self, group: str):
        import tensorflow as tf  # noqa: PLC0415  (already loaded by seqio; kept local for clarity)

        if group not in self._tb:
            directory = os.path.join(run_dir.path(self.model_dir, run_dir.TENSORBOARD), group)
            self._tb[group] = tf.summary.create_file_writer(directory)
        return self._tb[group]

    def write(self, group: str, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        import tensorflow as tf  # noqa: PLC0415

        record = {"group": group, "step": step, **{k: float(v) for k, v in scalars.items()}}
        self._unwritten.append(json.dumps(record) + "\n")
        try:
            with self._tb_writer(group).as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(name, float(value), step=step)
            with fileio.open_file(self.path, "a") as f:
                f.write("".join(self._unwritten))
            self._unwritten = []
            self._failing = False
        except fileio.ERRORS as e:
            if not self._failing:  # one line per run of failures, not one per step
                free = fileio.free_bytes(self.path)
                print(f"ERROR: cannot write the metrics of step {step} to {self.path} or "
                      f"{run_dir.TENSORBOARD}/: {getattr(e, 'strerror', None) or e}"
                      + (f" (the disk has {free / 1e6:,.1f} MB free)" if free is not None else "")
                      + ". They are kept in memory and written once writing works; training goes on.",
                      file=sys.stderr, flush=True)
            self._failing = True

    def close(self) -> None:
        if self._unwritten:  # rows a failing disk held back: one more try now
            try:
                with fileio.open_file(self.path, "a") as f:
                    f.write("".join(self._unwritten))
                self._unwritten = []
            except fileio.ERRORS as e:
                print(f"ERROR: {len(self._unwritten)} metrics rows could not be written to {self.path}: "
                      f"{getattr(e, 'strerror', None) or e}.", file=sys.stderr, flush=True)
        for w in self._tb.values():
            try:
                w.flush()
                w.close()
            except fileio.ERRORS:
                pass  # reported by write()
