"""All evaluation, during training and after it: teacher-forced, decoded, scored; early stopping.

    teacher_forced_eval   loss / token accuracy / perplexity per task on batches read once
    InferenceEvaluator    seqio.Evaluator: every task with metric functions is decoded (prediction
                          metrics) and/or scored (score metrics), and its metrics computed
    EarlyStopping         watches one metric of the results
    TrainingEvaluator     what the training loop calls: all of the above when due

Used by `python -m t5lite.train` (TrainingEvaluator) and `python -m t5lite.eval`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from jax.sharding import Mesh

from t5lite import inference, partitioning, run_dir
from t5lite.data import pipeline, vocab_record
from t5lite.errors import UserError
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model, normalize_metric_sums
from t5lite.run_config import EvalConfig
from t5lite.summaries import Progress, format_duration

Results = dict[str, dict[str, float]]  # task -> metric -> value


def load_eval_batches(task_names: Sequence[str], *, split: str, max_batches: int, **batch_kwargs) -> dict[str, list]:
    """The first `max_batches` batches of `split` of each eval task, read once and kept in memory.

    Every host reads the same whole batches (no ShardInfo); teacher_forced_eval splits them over the
    mesh's data axes: the figures do not depend on the number of hosts, and every host runs the same
    number of steps (per-host shards of a small split could differ by a batch: a hang)."""
    out = {}
    for name in task_names:
        try:
            it = pipeline.get_batches(name, split=split, shuffle=False, num_epochs=1, **batch_kwargs)
            out[name] = list(itertools.islice(it, max_batches))
        except pipeline.SplitSmallerThanABatch as too_small:
            out[name] = [_one_padded_batch(name, split, too_small, **batch_kwargs)]
    return out


def _one_padded_batch(name: str, split: str, too_small: Exception, *, batch_size: int, **batch_kwargs) -> dict:
    """A split with fewer (packed) rows than one batch (COPA's 200 short rows pack into 7 rows of 576
    tokens): all its rows in one batch, filled up with empty rows, which have no target tokens and so
    add nothing to the metric sums. A split without a single row is still an error."""
    try:
        rows = list(pipeline.get_batches(name, split=split, shuffle=False, num_epochs=1, batch_size=1, **batch_kwargs))
    except pipeline.SplitSmallerThanABatch:
        raise too_small from None
    return {k: np.concatenate([row[k] for row in rows] + [np.zeros((batch_size - len(rows), *rows[0][k].shape[1:]),
                                                                   rows[0][k].dtype)])
            for k in rows[0]}


def teacher_forced_eval(eval_step, params, eval_batches: Mapping[str, list], mesh: Mesh,
                        normalize: Callable[[Mapping[str, Any]], Mapping[str, Any]] = normalize_metric_sums) -> Results:
    """Teacher-forced loss / accuracy / perplexity per eval task (see load_eval_batches).

    eval_step: (params, batch) -> metric sums (t5lite.trainer.jit_eval_step); normalize: the sums of
    all batches -> the figures (a preference run's: trainer.eval_normalizer)."""
    results = {}
    for name, batches in eval_batches.items():
        sums = None
        for batch in batches:
            s = eval_step(params, partitioning.global_batch(batch, mesh))
            sums = s if sums is None else jax.tree_util.tree_map(jnp.add, sums, s)
        results[name] = {k: float(v) for k, v in normalize(sums).items()}
    return results


def mean_over_tasks(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: value}} -> {metric: mean over tasks}."""
    return {k: float(np.mean([m[k] for m in results.values()])) for k in next(iter(results.values()))}


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
    model_dir = run_dir.model_dir_of(checkpoints_dir)
    for task in pipeline.list_tasks_of(mixture_or_task_name):
        vocab_record.check(model_dir, f"task {task!r}", seqio.get_mixture_or_task(task).output_features)


def padded_batches(dataset: tf.data.Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices [n], {feature: [batch_size, length]}) from seqio's enumerated model dataset; the last
    batch is zero-padded to batch_size (n real rows) so one compiled function serves every batch."""
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
        n = len(indices)
        padded = {k: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in features.items()}
        yield indices, padded


def _bucket(used: int, padded: int, minimum: int) -> int:
    """The smallest power of two past `used` tokens, at least `minimum`, at most the padded length."""
    return min(padded, max(minimum, 1 << max(used - 1, 0).bit_length()))


def _used_lengths(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{sequence ("encoder" / "decoder"): [rows] positions up to the last one holding anything but padding}
    of a batch of seqio model features [rows, length]."""
    used: dict[str, np.ndarray] = {}
    for name, value in features.items():
        if value.ndim != 2:
            continue
        sequence = name.split("_", 1)[0]
        last = np.where(value != 0, np.arange(1, value.shape[1] + 1), 0).max(axis=1)
        used[sequence] = np.maximum(used.get(sequence, 0), last)
    return used


def length_bucketed_batches(dataset: tf.data.Dataset, batch_size: int, minimum: int = 8
                            ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices [n], {feature: [batch_size, length]}) of seqio's enumerated model dataset, for scoring: the
    rows sorted by the length of their longest sequence (the encoder's for T5; longest first, so a batch
    too big for memory fails at once), cut into batches, each batch's longest sequence cut to the
    smallest power of two (at least `minimum`, at most the padded length) past its own last real token,
    the other sequence to the whole dataset's; the last batch is filled up with empty rows.

    Scoring pads every row to the configured lengths (512 prompt tokens in the benchmark suite) though
    most prompts are far shorter, and one long prompt would set the length of every batch. Padding is
    masked out of attention and loss, so cutting it does the same arithmetic on the real tokens in a
    fraction of the time; sorting puts rows of like length together (lm-evaluation-harness sorts its
    requests too). Powers of two of one sequence keep the compiled shapes to a handful (log2 of its
    length at most). Every process reads every row and sorts them the same way."""
    indices, features = [], []
    for index, row in dataset.batch(1024).as_numpy_iterator():
        indices.append(index)
        features.append(row)
    if not indices:
        return
    indices = np.concatenate(indices)
    features = {name: np.concatenate([f[name] for f in features]) for name in features[0]}
    padded = {name.split("_", 1)[0]: v.shape[1] for name, v in features.items() if v.ndim == 2}
    used = _used_lengths(features)
    longest = max(padded, key=padded.get)
    whole = {seq: _bucket(int(used[seq].max()), padded[seq], minimum) for seq in used}
    order = np.argsort(-used[longest], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        lengths = {**whole, longest: _bucket(int(used[longest][rows].max()), padded[longest], minimum)}
        batch = {}
        for name, value in features.items():
            value = value[rows]
            if value.ndim == 2:
                value = value[:, :lengths[name.split("_", 1)[0]]]
            batch[name] = np.pad(value, [(0, batch_size - len(rows))] + [(0, 0)] * (value.ndim - 1))
        yield indices[rows], batch


class InferenceEvaluator:
    """Decodes and scores the eval tasks (with metric functions) of a mixture on given params."""

    def __init__(
        self, model: Model, mixture_or_task_name: str, *, mesh: Mesh, rules, split: str,
        task_feature_lengths: Mapping[str, int], batch_size: int, decode_config: DecodeConfig,
        num_examples: int | None = None, seed: int = 0, prefix_lm: bool = True, verbose: bool = False,
    ):
        """mesh, rules: where the params live and the logical axis rules; batches are decoded
        data-parallel on the mesh by every process (see t5lite.inference). batch_size: global.
        prefix_lm: a decoder-only model scores targets with its prompt attended bidirectionally (as
        trained with DataConfig.prefix_lm=True); False: causally, as a causal LM was trained."""
        pipeline.list_tasks_of(mixture_or_task_name)  # an unknown name fails here, with close matches
        provider = seqio.get_mixture_or_task(mixture_or_task_name)
        check_vocabulary(model, repr(provider.name), provider.output_features)
        tasks = seqio.get_subtasks(provider)
        self.tasks_without_metrics = sorted(t.name for t in tasks if not t.metric_objs)
        self.causal_scoring = not (prefix_lm or model.config.is_encoder_decoder)
        self.verbose = verbose  # progress lines of long decoding / scoring loops (the chief process only)
        self.seconds: dict[str, float] = {}  # task -> seconds decoding and scoring it in the last evaluate()
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
        task_of = {id(ds): name for name, ds in self._evaluator.cached_model_datasets.items()}
        self.seconds = {}

        def timed(fn):
            def run(dataset, model_feature_shapes=None):
                t0 = time.perf_counter()
                out = fn(dataset, model_feature_shapes)
                task = task_of.get(id(dataset), "?")
                self.seconds[task] = self.seconds.get(task, 0.0) + time.perf_counter() - t0
                return out
            return run

        def batches(dataset: tf.data.Dataset, what: str, make_batches=padded_batches):
            """make_batches with a progress line (done / total, rate, ETA) every ~10 s of a long loop."""
            n = int(dataset.cardinality())  # seqio's cached eval datasets know their size
            total = -(-n // self._run.batch_size) if n >= 0 else None
            progress = Progress(f"  {what}", total=total, enabled=self.verbose)
            return progress.track(make_batches(dataset, self._run.batch_size))

        def predict_fn(dataset: tf.data.Dataset, model_feature_shapes=None) -> list[tuple[int, list[int]]]:
            if not decode_params:
                decode_params.append(self._run.decode_params(params))
            out = []
            for i, (indices, batch) in enumerate(batches(dataset, "decode")):
                tokens, _ = self._run.predict(decode_params[0], batch, jax.random.fold_in(rng, i))
                out.extend((int(j), row.tolist()) for j, row in zip(indices, tokens, strict=False))
            return out

        def score_fn(dataset: tf.data.Dataset, model_feature_shapes=None) -> list[tuple[int, float]]:
            out = []
            for indices, batch in batches(dataset, "score", length_bucketed_batches):
                scores = self._run.score(params, batch)
                out.extend((int(j), float(s)) for j, s in zip(indices, scores, strict=False))
            return out

        metrics, outputs = self._evaluator.evaluate(compute_metrics=True, step=step, predict_fn=timed(predict_fn),
                                                    score_fn=timed(score_fn))
        self._outputs = outputs
        return {task: {k: float(_scalar(v)) for k, v in m.items()} for task, m in metrics.result().items()}

    def example_records(self) -> dict[str, list[dict[str, Any]]]:
        """Per-example records of the last evaluate(), task -> one dict per example in split order:
        index, inputs, targets, input_tokens; score (log p(targets), for score metrics) and/or
        prediction (decoded) and correct (prediction == targets, stripped); and the int / string
        features multiple-choice rows carry (question_id, is_correct, choice_length, category)."""
        records = {}
        for task in self._evaluator.eval_tasks:
            out = getattr(self, "_outputs", {}).get(task.name, {})
            scores = out.get(seqio.metrics.ModelOutputType.SCORE)
            tokens = out.get(seqio.metrics.ModelOutputType.PREDICTION)
            vocabulary = task.output_features["targets"].vocabulary
            rows = []
            for i, ex in enumerate(self._evaluator.cached_task_datasets[task.name].as_numpy_iterator()):
                row = {"index": i, "inputs": _text(ex.get("inputs_pretokenized", b"")),
                       "targets": _text(ex.get("targets_pretokenized", b"")),
                       "input_tokens": int(len(ex["inputs"])) if "inputs" in ex else 0}
                row.update({k: _text(ex[k]) if isinstance(ex[k], bytes) else int(ex[k])
                            for k in ("question_id", "is_correct", "choice_length", "category") if k in ex})
                if scores is not None:
                    row["score"] = float(scores[i])
                if tokens is not None:
                    row["prediction"] = vocabulary.decode([int(t) for t in tokens[i]])
                    row["correct"] = int(row["prediction"].strip() == row["targets"].strip())
                rows.append(row)
            records[task.name] = rows
        return records


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _scalar(value) -> float:
    """seqio metric values may come back wrapped (metrics_lib.Scalar)."""
    return getattr(value, "value", value)


TABLE_COLUMNS = ("task", "metric", "value", "stderr", "chance", "n", "seconds", "contaminated")


def benchmark_table(results: Mapping[str, Mapping[str, float]], seconds: Mapping[str, float],
                    headline: Callable[[str], Sequence[str]],
                    contamination: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per (task, headline metric) of the results, as the harness prints them: value, stderr,
    chance, n (questions) and the seconds spent decoding and scoring the task; per-category rows
    ("task/category", e.g. MMLU's groups) after their task; a winogender gap row when both sets ran.
    contamination: task -> % of its rows sharing an n-gram with the training data (t5lite.data.dedup)."""
    contamination = contamination or {}
    rows = []
    for task in sorted(results):
        m = results[task]
        for metric in headline(task):
            if metric not in m:
                continue
            groups = sorted({k.split("/")[0] for k in m if k.endswith(f"/{metric}") and k.count("/") == 1})
            for prefix, label in (("", task), *((f"{g}/", f"{task}/{g}") for g in groups)):
                chance = m.get(f"{prefix}chance_{metric}", m.get(f"{prefix}chance_accuracy"))
                rows.append({"task": label, "metric": metric, "value": m[f"{prefix}{metric}"],
                             "stderr": m.get(f"{prefix}{metric}_stderr"), "chance": chance,
                             "n": int(m[f"{prefix}num_questions"]) if f"{prefix}num_questions" in m else None,
                             "seconds": seconds.get(task) if not prefix else None,
                             "contaminated": contamination.get(task) if not prefix else None})
    for suffix in ("", "_prefix_lm"):
        female, male = results.get(f"winogender_female{suffix}"), results.get(f"winogender_male{suffix}")
        if female and male and "accuracy" in female and "accuracy" in male:
            rows.append({"task": f"winogender{suffix} gap (female - male)", "metric": "accuracy",
                         "value": female["accuracy"] - male["accuracy"],
                         "stderr": float(np.hypot(female["accuracy_stderr"], male["accuracy_stderr"])),
                         "chance": 0.0, "n": int(female["num_questions"] + male["num_questions"]), "seconds": None,
                         "contaminated": None})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """The benchmark table as aligned text (console) or a Markdown table."""
    def cell(row, column):
        value = row[column]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        if column in ("value", "stderr", "chance", "contaminated"):
            return f"{value:.2f}"
        return f"{value:.1f}" if column == "seconds" else str(value)

    table = [[cell(r, c) for c in TABLE_COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(TABLE_COLUMNS, *table, strict=True)]
    return "\n".join("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths,
                                                                                                 strict=True)))
                     for r in [list(TABLE_COLUMNS), *table]) + "\n"


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


# (metric, printed name, digits) of a teacher-forced eval line: LM runs' and preference runs'.
PRINTED_EVAL_METRICS = (("loss", "loss", 4), ("accuracy", "accuracy", 4), ("perplexity", "perplexity", 2),
                        ("rewards/accuracies", "reward accuracy", 3), ("rewards/margins", "reward margin", 4))


class TrainingEvaluator:
    """Evaluation during training, one call per step from the loop: teacher-forced every
    EvalConfig.every steps and at the last step, inference every EvalConfig.infer_every steps and at
    the last step (infer_every 0: never), early stopping on their merged results. The last step runs
    both so that a run always ends with every metric it was configured to report (a sweep's --metric
    reads it there even when the run's length is not a multiple of infer_every)."""

    def __init__(
        self, model: Model, config: EvalConfig, *, eval_step, eval_batches: Mapping[str, list], mesh: Mesh, rules,
        mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int, last_step: int,
        write_metrics, verbose: bool, prefix_lm: bool = True,
        normalize: Callable[[Mapping[str, Any]], Mapping[str, Any]] = normalize_metric_sums,
    ):
        """eval_step, eval_batches, normalize: see teacher_forced_eval. batch_size: the global batch of
        inference evaluation (every process decodes its share). write_metrics(group, step, metrics)."""
        self.config, self.last_step, self.normalize = config, last_step, normalize
        self.eval_step, self.eval_batches, self.mesh = eval_step, eval_batches, mesh
        self.write_metrics, self.verbose = write_metrics, verbose
        self.early_stopping = None
        if config.early_stopping_metric:
            self.early_stopping = EarlyStopping(config.early_stopping_metric, config.early_stopping_patience,
                                                config.early_stopping_mode)
            self.early_stopping.check_metric_exists(list(eval_batches))
        self.inference = None
        self.last_seconds = 0.0  # spent in the last after_step call: kept out of the training rates
        if config.infer_every > 0:
            self.inference = InferenceEvaluator(
                model, mixture_or_task_name, mesh=mesh, rules=rules, split=config.split,
                task_feature_lengths=task_feature_lengths, batch_size=batch_size, decode_config=DecodeConfig(),
                num_examples=config.infer_examples, prefix_lm=prefix_lm, verbose=verbose)
            if verbose and self.inference.tasks_without_metrics:
                print(f"  inference eval: no metric functions in {', '.join(self.inference.tasks_without_metrics)}"
                      " (only their teacher-forced loss is evaluated)", flush=True)

    def evaluate(self, step: int, params) -> Results:
        """Teacher-forced results of every eval task for the train state's params; printed and written."""
        params = jax.block_until_ready(params)  # the steps still queued are training time, not eval's
        t0 = time.perf_counter()
        results = teacher_forced_eval(self.eval_step, params, self.eval_batches, self.mesh, self.normalize)
        for task, m in results.items():
            self.write_metrics(f"eval/{task}", step, m)
            if self.verbose:
                shown = "  ".join(f"{name} {m[key]:.{digits}f}"
                                  for key, name, digits in PRINTED_EVAL_METRICS if key in m)
                print(f"  eval {task}: {shown}  ({format_duration(time.perf_counter() - t0)})", flush=True)
        self.last_seconds += time.perf_counter() - t0
        return results

    def after_step(self, step: int, params, model_params) -> tuple[Results | None, bool]:
        """Runs what is due at `step`; -> (teacher-forced results or None if none ran, stop?).

        params: the train state's params. model_params: a function of them giving the model's params
        (e.g. LoRA factors merged into their base), called only when inference eval runs.
        """
        self.last_seconds = 0.0
        teacher_forced = None
        if step % self.config.every == 0 or step == self.last_step:
            teacher_forced = self.evaluate(step, params)
        inferred: Results = {}
        infer_due = self.inference is not None and (step % self.config.infer_every == 0 or step == self.last_step)
        if infer_due and self.inference.task_names:
            decode_params = jax.block_until_ready(model_params(params))  # queued steps finish first
            t0 = time.perf_counter()
            inferred = self.inference.evaluate(decode_params, step)
            self.last_seconds += time.perf_counter() - t0
            for task, metrics in inferred.items():
                self.write_metrics(f"infer_eval/{task}", step, metrics)
                if self.verbose:
                    print(f"  infer eval {task}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
        results = merge_results(teacher_forced or {}, inferred)
        if self.early_stopping is None or not results:
            return teacher_forced, False
        stop = self.early_stopping.should_stop(results)
        if stop and self.verbose:
            print(f"  early stopping at step {step}: {self.early_stopping.metric} has not improved on "
                  f"{self.early_stopping.best:.4f} for {self.early_stopping.patience} evaluations", flush=True)
        return teacher_forced, stop

