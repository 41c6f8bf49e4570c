"""Inference evaluation of a model on the eval tasks of a mixture, and early stopping.

InferenceEvaluator runs seqio.Evaluator: every task with metric functions is decoded
(prediction metrics) and/or scored (score metrics) by t5lite.model.models.Model, and its
metrics computed. Used by `python -m t5lite.eval` and, every train.infer_eval_every steps, by
training. EarlyStopping watches one metric of the evaluation results.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf
from jax.sharding import Mesh

from t5lite import checkpoints, fileio, inference
from t5lite.data import pipeline, vocab_record
from t5lite.errors import UserError
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model

Results = dict[str, dict[str, float]]  # task -> metric -> value


def resolve_checkpoint_path(path: str) -> tuple[str, int | None]:
    """CHECKPOINT_PATH -> (checkpoints directory, step or None for 'the latest / every one')."""
    path = fileio.absolute(path).rstrip("/")
    if not fileio.isdir(path):
        raise UserError(f"CHECKPOINT_PATH {path!r} does not exist. Pass MODEL_DIR/checkpoints/<step> or a MODEL_DIR.")
    name = os.path.basename(path)
    if name.isdigit():
        return os.path.dirname(path), int(name)
    if fileio.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def checkpoint_steps(checkpoints_dir: str) -> list[int]:
    """Finished checkpoints in a directory, read afresh and read-only: a Checkpointer here would
    clean up (delete) the save a running training has in flight."""
    return sorted(ocp.path.step.checkpoint_steps(checkpoints_dir))


def latest_checkpoint_step(checkpoints_dir: str) -> int:
    steps = checkpoint_steps(checkpoints_dir)
    if not steps:
        raise UserError(f"No checkpoint in {checkpoints_dir!r}.")
    return steps[-1]


def restore_params(checkpoints_dir: str, step: int, abstract_params: Any) -> Any:
    """The params of checkpoint `step`, read-only (see checkpoint_steps), placed on the shardings of
    `abstract_params` (ShapeDtypeStructs of the configured model's params)."""
    path = os.path.join(checkpoints_dir, str(step))
    params = checkpoints.read_params(path)
    expected = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract_params)
    try:
        found = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
    except Exception:  # noqa: BLE001  (any unreadable leaf is a mismatch to report)
        found = None
    if found != expected:
        raise UserError(f"Checkpoint {path} cannot be restored into the configured model: its parameters "
                        "differ in names or shapes (another model or vocabulary size). Use the gin files "
                        "the checkpoint was trained with.")
    return jax.tree_util.tree_map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params,
                                  abstract_params)


def eval_feature_converter(model: Model, has_inputs: bool) -> seqio.FeatureConverter:
    """Unpacked features for the model: enc-dec; prefix LM for decoder-only tasks with inputs; else LM."""
    if model.config.is_encoder_decoder:
        model_type = "encoder_decoder"
    else:
        model_type = "prefix_lm" if has_inputs else "decoder_only"
    return pipeline.FEATURE_CONVERTERS[model_type](pack=False)


def check_vocabulary(model: Model, source: str, output_features: Mapping[str, seqio.Feature]) -> None:
    """Data whose vocabulary has more ids than the model's embedding rows cannot be evaluated."""
    for name, feature in output_features.items():
        if feature.vocabulary.vocab_size > model.config.vocab_size:
            raise UserError(
                f"{source} feature {name!r} uses a vocabulary of {feature.vocabulary.vocab_size} ids, "
                f"but the model has TransformerConfig.vocab_size={model.config.vocab_size}. Evaluate with the "
                "vocabulary and gin files the model was trained with.")


def check_trained_vocabulary(checkpoints_dir: str, mixture_or_task_name: str) -> None:
    """UserError if a task of the mixture uses another vocabulary than the checkpoints' run was
    trained with (MODEL_DIR/vocabulary.json; see vocab_record)."""
    model_dir = vocab_record.model_dir_of_checkpoint(checkpoints_dir)
    for task in pipeline.list_tasks_of(mixture_or_task_name):
        vocab_record.check(model_dir, f"task {task!r}", seqio.get_mixture_or_task(task).output_features)


def padded_batches(dataset: tf.data.Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices [n], {feature: [batch_size, length]}) from seqio's enumerated model dataset; the last
    batch is zero-padded to batch_size (n real rows) so one compiled function serves every batch."""
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
        n = len(indices)
        padded = {k: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in features.items()}
        yield indices, padded


class InferenceEvaluator:
    """Decodes and scores the eval tasks (with metric functions) of a mixture on given params."""

    def __init__(
        self, model: Model, mixture_or_task_name: str, *, mesh: Mesh, rules, split: str,
        task_feature_lengths: Mapping[str, int], batch_size: int, decode_config: DecodeConfig,
        num_examples: int | None = None, seed: int = 0, prefix_lm: bool = True,
    ):
        """mesh, rules: where the params live and the logical axis rules; batches are decoded
        data-parallel on the mesh by every process (see t5lite.inference). batch_size: global.
        prefix_lm: a decoder-only model scores targets with its prompt attended bidirectionally (as
        trained with train.prefix_lm=True); False: causally, as a causal LM was trained."""
        pipeline.list_tasks_of(mixture_or_task_name)  # an unknown name fails here, with close matches
        provider = seqio.get_mixture_or_task(mixture_or_task_name)
        check_vocabulary(model, repr(provider.name), provider.output_features)
        tasks = seqio.get_subtasks(provider)
        self.tasks_without_metrics = sorted(t.name for t in tasks if not t.metric_objs)
        self.causal_scoring = not (prefix_lm or model.config.is_encoder_decoder)
        lengths = {k: v for k, v in task_feature_lengths.items() if k in provider.output_features}
        self.decode_config = dataclasses.replace(decode_config, max_decode_length=lengths["targets"])
        self._evaluator = seqio.Evaluator(
            mixture_or_task_name, eval_split=split,
            feature_converter=eval_feature_converter(model, "inputs" in provider.output_features),
            sequence_length=lengths, num_examples=num_examples, seed=seed, async_compute_metrics=False,
        )
        self._run = inference.BatchInference(model, mesh, rules, batch_size=batch_size,
                                             decode_config=self.decode_config,
                                             bidirectional_prompt=not self.causal_scoring)

    @property
    def task_names(self) -> list[str]:
        """Tasks that will be evaluated (those with metric functions and the split)."""
        return [t.name for t in self._evaluator.eval_tasks]

    def evaluate(self, params, step: int, rng: jax.Array | None = None) -> Results:
        """Metrics of every evaluated task for `params`, e.g. {"task": {"accuracy": 71.0}}."""
        if not self.task_names:
            return {}
        rng = jax.random.PRNGKey(step) if rng is None else rng
        decode_params = []  # split per layer once, by the first task that decodes

        def predict_fn(dataset: tf.data.Dataset, model_feature_shapes=None) -> list[tuple[int, list[int]]]:
            if not decode_params:
                decode_params.append(self._run.decode_params(params))
            out = []
            for i, (indices, batch) in enumerate(padded_batches(dataset, self._run.batch_size)):
                tokens, _ = self._run.predict(decode_params[0], batch, jax.random.fold_in(rng, i))
                out.extend((int(j), row.tolist()) for j, row in zip(indices, tokens, strict=False))
            return out

        def score_fn(dataset: tf.data.Dataset, model_feature_shapes=None) -> list[tuple[int, float]]:
            out = []
            for indices, batch in padded_batches(dataset, self._run.batch_size):
                scores = self._run.score(params, batch)
                out.extend((int(j), float(s)) for j, s in zip(indices, scores, strict=False))
            return out

        metrics, _ = self._evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                              score_fn=score_fn)
        return {task: {k: float(_scalar(v)) for k, v in m.items()} for task, m in metrics.result().items()}


def _scalar(value) -> float:
    """seqio metric values may come back wrapped (metrics_lib.Scalar)."""
    return getattr(value, "value", value)


MODES = ("min", "max")


@dataclasses.dataclass
class EarlyStopping:
    """Stops after `patience` evaluations in a row without improving `metric` ("task/metric_name")."""

    metric: str
    patience: int = 3
    mode: str = "min"
    best: float | None = None
    evals_without_improvement: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"early_stopping_mode={self.mode!r}; choose one of {MODES}.")
        if "/" not in self.metric:
            raise UserError(f"early_stopping_metric={self.metric!r}: write 'task_name/metric_name'.")
        if self.patience < 1:
            raise UserError(f"early_stopping_patience must be at least 1, got {self.patience}.")

    def value_in(self, results: Mapping[str, Mapping[str, float]]) -> float | None:
        """The monitored value if `results` (task -> metric -> value) has it."""
        task, name = self.metric.rsplit("/", 1)
        return results.get(task, {}).get(name)

    def should_stop(self, results: Mapping[str, Mapping[str, float]]) -> bool:
        """Records an evaluation (one that lacks the metric is ignored); True when patience is spent."""
        value = self.value_in(results)
        if value is None:
            return False
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best, self.evals_without_improvement = value, 0
        else:
            self.evals_without_improvement += 1
        return self.evals_without_improvement >= self.patience

    def check_metric_exists(self, available: Sequence[str]) -> None:
        """Fails early if no evaluation will ever produce the metric's task."""
        task = self.metric.rsplit("/", 1)[0]
        if task not in available:
            raise UserError(f"early_stopping_metric={self.metric!r}: no evaluated task {task!r}; "
                            f"evaluated tasks: {', '.join(sorted(available))}.")


def merge_results(teacher_forced: Mapping[str, Mapping[str, float]],
                  inferred: Mapping[str, Mapping[str, float]]) -> Results:
    """Per-task union of teacher-forced and inference metrics. The teacher-forced "accuracy" (of
    next-token predictions) becomes "token_accuracy", so it never hides a task's own accuracy."""
    merged: Results = {}
    for task, metrics in teacher_forced.items():
        merged[task] = {("token_accuracy" if k == "accuracy" else k): v for k, v in metrics.items()}
    for task, metrics in inferred.items():
        merged.setdefault(task, {}).update(metrics)
    return merged


class TrainingMonitor:
    """What training runs besides teacher-forced eval: inference evaluation every
    `infer_eval_every` steps (0: never) and early stopping; one call per step from the loop."""

    def __init__(
        self, model: Model, eval_mixture_or_task_name: str, eval_tasks: Sequence[str], *, mesh: Mesh, rules,
        split: str, task_feature_lengths: Mapping[str, int], batch_size: int, infer_eval_every: int,
        infer_eval_examples: int, early_stopping: EarlyStopping | None, write_metrics, verbose: bool,
        prefix_lm: bool = True,
    ):
        """batch_size: the global batch of inference evaluation (every process decodes its share)."""
        self.infer_eval_every, self.early_stopping = infer_eval_every, early_stopping
        self.write_metrics, self.verbose = write_metrics, verbose
        if early_stopping is not None:
            early_stopping.check_metric_exists(eval_tasks)
        self.inference = None
        self.last_seconds = 0.0  # spent in the last after_step call
        if infer_eval_every > 0:
            self.inference = InferenceEvaluator(
                model, eval_mixture_or_task_name, mesh=mesh, rules=rules, split=split,
                task_feature_lengths=task_feature_lengths, batch_size=batch_size, decode_config=DecodeConfig(),
                num_examples=infer_eval_examples, prefix_lm=prefix_lm)
            if verbose and self.inference.tasks_without_metrics:
                print(f"  inference eval: no metric functions in {', '.join(self.inference.tasks_without_metrics)}"
                      " (only their teacher-forced loss is evaluated)", flush=True)

    def after_step(self, step: int, params, teacher_forced: Results | None) -> bool:
        """Runs inference eval if due; -> whether early stopping says to stop.

        params: the model's params, or a function returning them (called only when inference eval
        runs: e.g. LoRA factors merged into their base). teacher_forced: this step's teacher-forced
        results, if the loop evaluated at this step.
        """
        inferred: Results = {}
        self.last_seconds = 0.0
        if self.inference is not None and self.inference.task_names and step % self.infer_eval_every == 0:
            params = jax.block_until_ready(params() if callable(params) else params)  # queued steps finish first
            t0 = time.perf_counter()
            inferred = self.inference.evaluate(params, step)
            self.last_seconds = time.perf_counter() - t0
            for task, metrics in inferred.items():
                self.write_metrics(f"infer_eval/{task}", step, metrics)
                if self.verbose:
                    print(f"  infer eval {task}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        results = merge_results(teacher_forced or {}, inferred)
        if self.early_stopping is None or not results:
            return False
        stop = self.early_stopping.should_stop(results)
        if stop and self.verbose:
            print(f"  early stopping at step {step}: {self.early_stopping.metric} has not improved on "
                  f"{self.early_stopping.best:.4f} for {self.early_stopping.patience} evaluations", flush=True)
        return stop
