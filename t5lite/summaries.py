"""Metrics out: console progress lines, TensorBoard events and a JSON-lines log in MODEL_DIR.

Only the chief process (index 0) writes; other processes get a disabled writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from t5lite import fileio


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(step: int, total: int, metrics: Mapping[str, float], rates: Mapping[str, float], eta_s: float) -> str:
    """e.g. 'step  100/1000 | loss 4.3210 | acc 0.231 | lr 1.00e-02 | 2.31 steps/s | 12.3k tok/s | ETA 6m30s'."""
    width = len(str(total))
    return (
        f"step {step:>{width}d}/{total} | loss {metrics['loss']:.4f} | acc {metrics['accuracy']:.3f} | "
        f"lr {metrics['learning_rate']:.2e} | {rates['steps_per_s']:.2f} steps/s | "
        f"{rates['tokens_per_s'] / 1e3:.1f}k tok/s ({rates['real_tokens_per_s'] / 1e3:.1f}k real) | "
        f"ETA {format_duration(eta_s)}"
    )


class MetricsWriter:
    """Writes scalars to MODEL_DIR/tensorboard/<group> and MODEL_DIR/metrics.jsonl."""

    def __init__(self, model_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.model_dir = model_dir
        self._tb = {}
        self._jsonl = fileio.open_file(os.path.join(model_dir, "metrics.jsonl"), "a") if enabled else None

    def _tb_writer(self, group: str):
        import tensorflow as tf  # noqa: PLC0415  (already loaded by seqio; kept local for clarity)

        if group not in self._tb:
            self._tb[group] = tf.summary.create_file_writer(os.path.join(self.model_dir, "tensorboard", group))
        return self._tb[group]

    def write(self, group: str, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        import tensorflow as tf  # noqa: PLC0415

        with self._tb_writer(group).as_default():
            for name, value in scalars.items():
                tf.summary.scalar(name, float(value), step=step)
        record = {"group": group, "step": step, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        for w in self._tb.values():
            w.flush()
            w.close()
        if self._jsonl:
            self._jsonl.close()
