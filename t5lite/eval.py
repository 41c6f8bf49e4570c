"""Evaluate checkpoints on every eval task of a mixture.

    python -m t5lite.eval --gin_file=gin/runs/eval.gin --gin.CHECKPOINT_PATH=\\"runs/base/checkpoints/900\\"
    python -m t5lite.eval --gin_file=gin/runs/eval.gin --gin.CHECKPOINT_PATH=\\"runs/base\\" --watch

Per task: the teacher-forced loss / accuracy / perplexity, and the task's seqio metrics (decoded
and/or scored; see t5lite.evaluation). CHECKPOINT_PATH is one checkpoint (MODEL_DIR/checkpoints/
<step>) or a MODEL_DIR (its latest checkpoint). --watch evaluates every checkpoint of MODEL_DIR not
evaluated yet, then polls for new ones. Results: <output_dir>/step_<step>.json, TensorBoard under
<output_dir>/tensorboard/<task> and <output_dir>/metrics.jsonl (output_dir: MODEL_DIR/eval).
Batches are split over the mesh's data axes; with several processes (--coordinator_address etc.,
or a TPU VM slice) every process reads the same examples and decodes its share of each batch,
process 0 picks the checkpoints and writes the results, which equal one process's.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from t5lite import host_memory

    host_memory.restart_with_tunables("-m", "t5lite.eval")  # faster malloc on CPU; see host_memory
    from t5lite import eval as _eval_module  # register gin configurables once, not as __main__.*

    sys.exit(_eval_module.main())

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence

import gin
import jax
import seqio

from t5lite import checkpoints, distributed, evaluation, fileio, gin_cli, partitioning, run_dir, trainer
from t5lite.data import benchmarks, contamination, pipeline
from t5lite.errors import reports_user_errors
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model, without_prefix_attention
from t5lite.run_config import LossConfig
from t5lite.summaries import MetricsWriter, stops_on_interrupt


class CheckpointEvaluator:
    """Everything built once (model, restore target, data, compiled steps); evaluates any step."""

    def __init__(
        self, *, mixture_or_task_name: str, eval_split: str, task_feature_lengths: Mapping[str, int],
        batch_size: int, num_examples: int | None, loss_batches: int, prefix_lm: bool,
        partitioning_preset: str, output_dir: str, seed: int, contamination_train_task: str | None = None,
    ):
        self.config = TransformerConfig()
        self.model = Model(self.config)
        self.mesh = partitioning.make_mesh()
        rules = partitioning.axis_rules(partitioning_preset)
        partitioning.check_batch_size(batch_size, self.mesh)
        self.is_chief = jax.process_index() == 0
        self.tasks = pipeline.list_tasks_of(mixture_or_task_name)
        self.inference = evaluation.InferenceEvaluator(
            self.model, mixture_or_task_name, mesh=self.mesh, rules=rules, split=eval_split,
            task_feature_lengths=task_feature_lengths, batch_size=batch_size, decode_config=DecodeConfig(),
            num_examples=num_examples, seed=seed, prefix_lm=prefix_lm, verbose=self.is_chief)
        for task in self.inference.tasks_without_metrics if self.is_chief else ():
            print(f"note: task {task!r} has no metric functions (seqio metric_fns): only its teacher-forced "
                  "loss is reported. Add metric_fns to the Task for decoded or scored metrics.", flush=True)
        # Tasks with inputs get prefix-LM features on a decoder-only model; a causal LM reads them causally.
        has_inputs = "inputs" in seqio.get_mixture_or_task(mixture_or_task_name).output_features
        # Every host reads the same whole batches (see evaluation.load_eval_batches).
        self.loss_batches = evaluation.load_eval_batches(
            self.tasks, split=eval_split, max_batches=loss_batches, seed=seed,
            task_feature_lengths=dict(task_feature_lengths),
            model_type=pipeline.model_type(self.config.is_encoder_decoder, prefix_lm or has_inputs),
            batch_size=batch_size)
        if self.inference.causal_scoring:
            self.loss_batches = {task: [without_prefix_attention(b) for b in batches]
                                 for task, batches in self.loss_batches.items()}
        self.abstract_params = trainer.abstract_params(self.model, self.mesh, rules)  # restore target
        self.eval_step = trainer.jit_eval_step(
            self.model, jax.tree_util.tree_map(lambda a: a.sharding, self.abstract_params), self.mesh, rules,
            loss_config=LossConfig())
        self.output_dir = output_dir
        # Computed once: the table's "contaminated" column, % of the scored rows of each task sharing a
        # 13-word n-gram with the training data (GPT-3's test), so a score can be read beside it.
        self.contamination = {} if not (contamination_train_task and self.is_chief) else {
            task: report.percent_examples for task, report in contamination.contamination_of_tasks(
                contamination_train_task, mixture_or_task_name, eval_split, limit=num_examples).items()}
        if self.is_chief:
            fileio.makedirs(output_dir)

    def results_path(self, step: int) -> str:
        return os.path.join(self.output_dir, f"step_{step}.json")

    def evaluate(self, checkpoints_dir: str, step: int) -> dict[str, dict[str, float]]:
        """Restores `step`, evaluates every task, writes JSON + TensorBoard (process 0); -> task -> metric
        -> value. Every process must call it with the same step."""
        params = checkpoints.restore_params(checkpoints_dir, step, self.abstract_params)
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):  # as train.py does (`with mesh:` no longer sets it in jax 0.10)
            loss = evaluation.teacher_forced_eval(self.eval_step, params, self.loss_batches, self.mesh)
        results = evaluation.merge_results(loss, self.inference.evaluate(params, step))
        if not self.is_chief:
            return results
        writer = MetricsWriter(self.output_dir)
        for task, metrics in results.items():
            writer.write(task, step, metrics)
            print(f"step {step} {task}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        writer.close()
        seconds = time.perf_counter() - t0
        with fileio.open_file(self.results_path(step), "w") as f:
            json.dump({"step": step, "checkpoint": os.path.join(checkpoints_dir, str(step)), "tasks": results,
                       "seconds": seconds}, f, indent=2)
        self.write_benchmark_table(step, results, seconds)
        self.write_examples(step)
        return results

    def write_examples(self, step: int) -> None:
        """Per-example records (evaluation.InferenceEvaluator.example_records) as
        <output_dir>/examples_step_<step>/<task>.jsonl, for python -m t5lite.analyze."""
        folder = os.path.join(self.output_dir, f"examples_step_{step}")
        fileio.makedirs(folder)
        for task, rows in self.inference.example_records().items():
            with fileio.open_file(os.path.join(folder, f"{task}.jsonl"), "w") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    def write_benchmark_table(self, step: int, results: Mapping[str, Mapping[str, float]], seconds: float) -> None:
        """The benchmark table (task, metric, value, stderr, chance, n, seconds) of the tasks with
        multiple-choice or LAMBADA metrics: printed, and written as benchmarks_step_<step>.{json,md}."""
        rows = evaluation.benchmark_table(results, self.inference.seconds, benchmarks.headline_metrics,
                                          self.contamination)
        if not rows:
            return
        text = evaluation.format_table(rows)
        print(text, end="", flush=True)
        stem = os.path.join(self.output_dir, f"benchmarks_step_{step}")
        with fileio.open_file(stem + ".json", "w") as f:
            json.dump({"step": step, "num_fewshot": benchmarks.num_fewshot(), "seconds": seconds, "rows": rows},
                      f, indent=2)
        with fileio.open_file(stem + ".md", "w") as f:
            f.write(f"Step {step}, MMLU {benchmarks.num_fewshot()}-shot, {seconds:.0f} s in all; values in percent, "
                    "stderr as lm-evaluation-harness (sample standard deviation / sqrt(n)); contaminated: % of "
                    "the task's scored rows sharing a 13-word n-gram with the training data.\n\n")
            f.write(evaluation.format_table(rows, markdown=True))


@gin.configurable
def evaluate(
    *,
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = "t5lite_default_span_corruption",
    eval_split: str = "validation",
    task_feature_lengths: Mapping[str, int] = {"inputs": 128, "targets": 32},  # noqa: B006
    batch_size: int = 8,
    num_examples: int | None = 64,
    loss_batches: int = 8,
    prefix_lm: bool = False,
    partitioning_preset: str = "dp",
    output_dir: str | None = None,
    seed: int = 0,
    watch: bool = False,
    watch_interval_s: float = 30.0,
    watch_timeout_s: float | None = None,
    contamination_train_task: str | None = None,
) -> dict[int, dict[str, dict[str, float]]]:
    """Evaluates one checkpoint, or (watch) every new checkpoint; -> step -> task -> metric -> value.

    prefix_lm: a decoder-only model was trained as a prefix LM (its prompt attended bidirectionally);
    False: a causal LM, which also reads the prompt of a task with inputs causally.
    num_examples: examples per task for decoded/scored metrics (None: the whole split);
    loss_batches: batches per task for the teacher-forced loss. watch_timeout_s: stop watching
    after this long without a new checkpoint (None: never). contamination_train_task: the model's
    training Task or Mixture; the benchmark table then shows how much of each task's text it contains.
    """
    checkpoints_dir, step = checkpoints.resolve_checkpoint_path(checkpoint_path)
    evaluation.check_trained_vocabulary(checkpoints_dir, mixture_or_task_name)
    output_dir = output_dir or run_dir.path(run_dir.model_dir_of(checkpoints_dir), run_dir.EVAL)
    if not watch and step is None:
        step = distributed.agree(checkpoints.latest_checkpoint_step(checkpoints_dir))
    evaluator = CheckpointEvaluator(
        mixture_or_task_name=mixture_or_task_name, eval_split=eval_split,
        task_feature_lengths=task_feature_lengths, batch_size=batch_size, num_examples=num_examples,
        loss_batches=loss_batches, prefix_lm=prefix_lm, partitioning_preset=partitioning_preset,
        output_dir=output_dir, seed=seed, contamination_train_task=contamination_train_task)
    if not watch:
        return {step: evaluator.evaluate(checkpoints_dir, step)}

    all_results = {}
    last_new = time.monotonic()
    while watch_timeout_s is None or time.monotonic() - last_new < watch_timeout_s:
        # Process 0's listing decides, so every process evaluates the same checkpoint (or waits).
        s = distributed.agree(_oldest_unevaluated_step(evaluator, checkpoints_dir) if evaluator.is_chief else -1)
        if s >= 0:
            all_results[s] = evaluator.evaluate(checkpoints_dir, s)
            last_new = time.monotonic()
        else:
            time.sleep(watch_interval_s)
    return all_results


def _oldest_unevaluated_step(evaluator: CheckpointEvaluator, checkpoints_dir: str) -> int:
    """The oldest checkpoint without a results file, or -1. A results file means an earlier run
    evaluated it: a restarted watcher resumes."""
    new = [s for s in checkpoints.checkpoint_steps(checkpoints_dir) if not fileio.exists(evaluator.results_path(s))]
    return new[0] if new else -1


@stops_on_interrupt("eval: interrupted (Ctrl-C); checkpoints evaluated before keep their results (step_<step>.json)")
@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --watch is the one flag besides gin's; it overrides evaluate.watch.
    overrides = {"watch": True} if "--watch" in argv else {}
    gin_cli.configure([a for a in argv if a != "--watch"], description=__doc__)
    evaluate(**overrides)
    return 0

