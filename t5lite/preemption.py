"""Preemption: SIGTERM or SIGINT asks the train loop to checkpoint the current step and stop.

    with StopRequest() as stop:
        for step in ...:
            ...train one step...
            if stop.reached(step):
                save a checkpoint at `step`; exit with stop.exit_code

One process: the first SIGTERM / SIGINT sets a flag that the loop reads after the step in
flight; a second one acts as usual (Ctrl-C twice stops at once). Several processes: every host
must save the same step, so the loop asks jax's preemption sync point, which the coordination
service (jax.distributed.initialize) triggers on all hosts when any host gets SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns SIGTERM / SIGINT into a request the loop checks once per step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, signal.Handlers] = {}

    def __enter__(self) -> StopRequest:
        # signal.signal works only in the main thread (elsewhere, e.g. a notebook worker, the
        # defaults stay); with several processes jax's own SIGTERM notifier must keep the signal.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore_handlers()

    def reached(self, step: int) -> bool:
        """Whether to checkpoint `step` and stop (all processes agree on the step)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number: a shell's code for a process ended by that signal (143 = SIGTERM)."""
        return 128 + (self.signum or signal.SIGTERM)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore_handlers()  # a second signal is not deferred

    def _restore_handlers(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
