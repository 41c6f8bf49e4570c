"""Pretrain a t5lite model.

    python -m t5lite.train --gin_file=gin/base.gin [--gin_file=...] [--gin.NAME=VALUE ...] [--profile_steps=A:B]

train() reads top to bottom: output directory, mesh, data, model, optimizer, state (fresh or
resumed), loop (progress, TensorBoard, checkpoints, periodic eval), final checkpoint and eval.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m t5lite.train` runs this file as __main__; hand over to the importable module
    # before anything is defined, so gin registers `train` once (not also as `__main__.train`).
    import sys

    from t5lite import host_memory

    host_memory.restart_with_tunables("-m", "t5lite.train")  # faster malloc on CPU; see host_memory
    from t5lite import train as _train_module

    sys.exit(_train_module.main())

import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5lite import checkpoints, evaluation, fileio, finetune, gin_cli, observability, partitioning, preemption, trainer
from t5lite.data import pipeline, vocab_record  # pipeline registers the tasks and their gin configurables
from t5lite.errors import UserError, reports_user_errors
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model, normalize_metric_sums
from t5lite.optim import make_optimizer
from t5lite.summaries import MetricsWriter, format_duration, progress_line


def ensure_writable_dir(path: str) -> str:
    """Creates `path` and proves it writable before any compute is spent."""
    path = fileio.absolute(path)
    try:
        fileio.check_writable_dir(path)
    except fileio.ERRORS as e:
        raise UserError(
            f"MODEL_DIR {path!r} is not writable ({getattr(e, 'strerror', None) or e}). Choose another directory with "
            "--gin.MODEL_DIR=\\\"path\\\"."
        ) from e
    return path


@dataclasses.dataclass(frozen=True)
class TrainResult:
    model_dir: str
    step: int
    eval_results: dict[str, dict[str, float]]  # task -> metric -> value, at the final step
    exit_code: int = 0  # 128 + signal number if SIGTERM / SIGINT stopped the run (after a checkpoint)


def write_operative_config(model_dir: str) -> None:
    """MODEL_DIR/operative_config.gin: every parameter value the run has used, defaults included."""
    with fileio.open_file(os.path.join(model_dir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())


def data_model_type(config: TransformerConfig, prefix_lm: bool) -> str:
    if config.is_encoder_decoder:
        return "encoder_decoder"
    return "prefix_lm" if prefix_lm else "decoder_only"


def write_model_info(path: str, config: TransformerConfig, rows: Sequence[Mapping[str, Any]], mesh, rules,
                     training_lines: Sequence[str] = ()) -> int:
    """Writes MODEL_DIR/model-info.txt (config, what trains, parameter table with shardings); returns #params."""
    total = sum(int(np.prod(r["shape"])) for r in rows)
    with fileio.open_file(path, "w") as f:
        f.write(f"{config}\ncompute dtype: {config.compute_dtype}\n\nparameters: {total:,}\n"
                + "".join(f"{line}\n" for line in training_lines)
                + f"mesh: {dict(mesh.shape)}\nrules: {rules}\n\n")
        f.write(f"{'name':70s} {'shape':22s} {'logical axes':40s} {'mesh axes':28s} bytes/device\n")
        for r in rows:
            f.write(f"{r['name']:70s} {str(r['shape']):22s} {str(r['logical_axes']):40s} "
                    f"{str(r['mesh_axes']):28s} {r['bytes_per_device']:,}\n")
    return total


def load_eval_batches(task_names: Sequence[str], *, split: str, max_batches: int, **batch_kwargs) -> dict[str, list]:
    """The first `max_batches` batches of `split` of each eval task, read once and kept in memory."""
    out = {}
    for name in task_names:
        it = pipeline.get_batches(name, split=split, shuffle=False, num_epochs=1, **batch_kwargs)
        out[name] = list(itertools.islice(it, max_batches))
    return out


def evaluate(eval_step, params, eval_batches: Mapping[str, list], mesh) -> dict[str, dict[str, float]]:
    """Teacher-forced loss / accuracy / perplexity per eval task.

    Every host holds the same whole batches (load_eval_batches without a ShardInfo), split over the
    mesh's data axes here: the figures do not depend on the number of hosts, and every host runs
    the same number of steps (per-host shards of a small split could differ by a batch: a hang)."""
    results = {}
    for name, batches in eval_batches.items():
        sums = None
        for batch in batches:
            s = eval_step(params, partitioning.global_batch(batch, mesh))
            sums = s if sums is None else jax.tree_util.tree_map(jnp.add, sums, s)
        results[name] = {k: float(v) for k, v in normalize_metric_sums(sums).items()}
    return results


def check_vocabularies(mixture_or_task_name: str, eval_tasks: Sequence[str], model_dir: str,
                       initial_checkpoint_path: str | None) -> Mapping[str, seqio.Feature]:
    """The training data's features, after checking that the eval tasks, the run being resumed in
    MODEL_DIR and the initial checkpoint's run all use the same vocabularies (see vocab_record)."""
    features = seqio.get_mixture_or_task(mixture_or_task_name).output_features
    trained = {name: vocab_record.describe(feature.vocabulary) for name, feature in features.items()}
    for task in eval_tasks:
        vocab_record.check_against(trained, f"the training data {mixture_or_task_name!r} uses", f"eval task {task!r}",
                                   seqio.get_mixture_or_task(task).output_features)
    checkpoints_dir = os.path.join(model_dir, "checkpoints")
    if fileio.isdir(checkpoints_dir) and evaluation.checkpoint_steps(checkpoints_dir):  # a resumed run
        vocab_record.check(model_dir, f"the training data {mixture_or_task_name!r}", features)
    if initial_checkpoint_path:
        vocab_record.check(vocab_record.model_dir_of_checkpoint(initial_checkpoint_path),
                           f"the training data {mixture_or_task_name!r}", features)
    return features


def count_real_tokens(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(non-padding tokens, all token slots) of the model's input and target features."""
    keys = [k for k in ("encoder_input_tokens", "decoder_target_tokens") if k in batch]
    return (int(sum(np.count_nonzero(batch[k]) for k in keys)), int(sum(batch[k].size for k in keys)))


@gin.configurable
def train(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = "t5lite_default_span_corruption",
    eval_mixture_or_task_name: str | None = None,
    eval_split: str = "validation",
    task_feature_lengths: Mapping[str, int] = {"inputs": 128, "targets": 32},  # noqa: B006
    batch_size: int = 16,
    num_train_steps: int = 1000,
    num_microbatches: int = 1,
    prefix_lm: bool = False,
    seed: int = 0,
    partitioning_preset: str = "dp",
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    log_every: int = 10,
    eval_every: int = 200,
    eval_batches: int = 8,
    checkpoint_every: int = 200,
    keep_checkpoints: int = 3,
    checkpoint_best_metric: str | None = None,
    checkpoint_best_mode: str = "min",
    initial_checkpoint_path: str | None = None,
    initial_checkpoint_rename: Mapping[str, str] = {},  # noqa: B006
    on_nonfinite: str = "skip",
    write_host_records: bool = False,
    infer_eval_every: int = 0,
    infer_eval_examples: int = 32,
    early_stopping_metric: str | None = None,
    early_stopping_patience: int = 3,
    early_stopping_mode: str = "min",
    profile_steps: str | None = None,
) -> TrainResult:
    """Trains for `num_train_steps` (resuming from MODEL_DIR's latest checkpoint); returns the final eval.

    batch_size is the global batch (all hosts); eval runs every `eval_every` steps on the first
    `eval_batches` batches of `eval_split` of each task of the eval mixture (default: the train
    mixture). write_host_records (debugging multi-host runs): every process appends its view of each
    step, {"step", "loss", "rows": hashes of the batch rows it read}, to MODEL_DIR/host-<process>.jsonl.
    Every `infer_eval_every` steps (0: never) the first `infer_eval_examples` examples
    of each eval task with seqio metric functions are decoded / scored (t5lite.evaluation).
    early_stopping_metric ("task/metric", e.g. "wikitext2_span_corruption/loss"; the teacher-forced
    "accuracy" is named "token_accuracy" there, see evaluation.merge_results) stops training, with
    a checkpoint, after `early_stopping_patience` evaluations without improvement (mode "min"/"max").

    State: the latest checkpoint in MODEL_DIR/checkpoints if there is one (exact resume), else a
    fresh initialisation whose params are replaced by those of `initial_checkpoint_path` (a
    .../checkpoints/<step> directory; see checkpoints.load_initial_params for the renaming) if set.
    Fine-tuning from `initial_checkpoint_path` counts steps on from the checkpoint's step S: the run
    trains `num_train_steps` steps, S+1 .. S+num_train_steps (the optimizer and its schedule start
    afresh at 0). What is trained (all, frozen by name, LoRA, quantized base) is
    finetune.make_adaptation's gin configuration.
    Checkpoints kept: the last `keep_checkpoints`, pinned ones, and with `checkpoint_best_metric`
    (an eval metric averaged over the eval tasks, e.g. "loss") the best one by
    `checkpoint_best_mode` among the steps saved when an eval ran.

    A step whose loss or gradients are not finite is never applied. on_nonfinite="skip" goes on
    with the next batch (metrics.jsonl counts skipped_steps); "stop" saves a checkpoint at that
    step (the parameters before it) and raises UserError naming it. SIGTERM / SIGINT save a
    checkpoint at the current step and return with exit_code 128 + signal number.
    """
    if on_nonfinite not in ("skip", "stop"):
        raise UserError(f"train.on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
    profile_range = observability.parse_profile_steps(profile_steps)  # a malformed range fails before any work

    # --- Output directory --------------------------------------------------------------------
    model_dir = ensure_writable_dir(model_dir)
    is_chief = jax.process_index() == 0

    # --- Mesh ----------------------------------------------------------------------------------
    mesh = partitioning.make_mesh()
    rules = partitioning.axis_rules(partitioning_preset)
    if batch_size % jax.process_count():
        raise UserError(f"batch_size={batch_size} is not divisible by {jax.process_count()} processes.")
    partitioning.check_batch_size(batch_size, mesh)

    # --- Data ------------------------------------------------------------------------------------
    config = TransformerConfig()
    model_type = data_model_type(config, prefix_lm)
    pipeline.list_tasks_of(mixture_or_task_name)  # an unknown name fails here, with close matches
    eval_tasks = pipeline.list_tasks_of(eval_mixture_or_task_name or mixture_or_task_name)
    train_features = check_vocabularies(mixture_or_task_name, eval_tasks, model_dir, initial_checkpoint_path)
    batch_kwargs = dict(
        task_feature_lengths=dict(task_feature_lengths), model_type=model_type,
        batch_size=batch_size // jax.process_count(),
        # Each host reads only its own shard of every task and feeds its slice of the global batch.
        shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count()),
    )

    # Reading the eval batches up front also checks, before any compute, that the names exist,
    # the feature lengths suit the objective and the splits are not empty. Every host reads them
    # whole (see evaluate).
    eval_data = load_eval_batches(eval_tasks, split=eval_split, max_batches=eval_batches, seed=seed,
                                  task_feature_lengths=dict(task_feature_lengths), model_type=model_type,
                                  batch_size=batch_size)

    # --- Model and optimizer ------------------------------------------------------------------------
    model = Model(config)
    optimizer = make_optimizer()
    adaptation = finetune.make_adaptation()
    tx = adaptation.wrap_optimizer(optimizer.tx)
    init = trainer.make_sharded_init(
        model, tx, model.input_shapes(batch_size, task_feature_lengths), mesh, rules, adaptation)
    model_shardings = partitioning.logical_shardings(init.boxed_params_shapes, mesh, rules)
    rows = partitioning.sharding_table(init.boxed_params_shapes, model_shardings)
    finetune_lines = finetune.summary_lines(adaptation, init.abstract_state, nn.unbox(init.boxed_params_shapes))
    num_params = write_model_info(os.path.join(model_dir, "model-info.txt"), config, rows, mesh, rules,
                                  finetune_lines) if is_chief else sum(int(np.prod(r["shape"])) for r in rows)
    if is_chief:
        print("\n".join(finetune_lines), flush=True)
    # Fine-tuning numbers its steps on from the initial checkpoint's (see the docstring).
    initial_step = checkpoints.read_step(initial_checkpoint_path) if initial_checkpoint_path else 0
    num_train_steps += initial_step

    # --- State and data position: resume from MODEL_DIR or initialise ---------------------------------
    # The train stream is built first so that a resume can put it back where the checkpoint left it:
    # a resumed run sees exactly the batches an uninterrupted run would have seen.
    train_batches = pipeline.get_batches(mixture_or_task_name, split="train", shuffle=True, num_epochs=None,
                                         seed=seed, **batch_kwargs)
    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), save_every=checkpoint_every,
                                    keep=keep_checkpoints, best_metric=checkpoint_best_metric,
                                    best_mode=checkpoint_best_mode)
    resumed = ckpt.restore_latest(init.abstract_state, train_batches)
    if resumed is not None:
        state, latest = resumed
        print(f"Resumed from {ckpt.directory}/{latest}", flush=True)
    else:
        params = init.init_params(jax.random.PRNGKey(seed))
        if initial_checkpoint_path:
            params = checkpoints.load_initial_params(initial_checkpoint_path, params, rename=initial_checkpoint_rename)
            print(f"Initialised the params from {initial_checkpoint_path} (step {initial_step})", flush=True)
        state = init.state_from_params(params, jax.random.PRNGKey(seed))
        state = state.replace(step=jax.device_put(jnp.int32(initial_step), init.state_shardings.step))
    start_step = int(state.step)

    # --- Compiled steps ---------------------------------------------------------------------------
    loss_config = trainer.LossConfig(label_smoothing=label_smoothing, z_loss=z_loss)
    train_step = trainer.jit_train_step(
        model, tx, lambda step: optimizer.schedule(step - initial_step), init, mesh, rules, loss_config=loss_config,
        num_microbatches=num_microbatches, use_dropout=config.dropout_rate > 0, adaptation=adaptation)
    eval_step = jax.jit(partitioning.with_sharding_rules(trainer.make_eval_step(model, loss_config, adaptation),
                                                         mesh, rules),
                        in_shardings=(init.state_shardings.params, partitioning.batch_sharding(mesh)))
    model_params = jax.jit(adaptation.model_params, out_shardings=model_shardings)  # LoRA: merged, for decoding

    writer = MetricsWriter(model_dir, enabled=is_chief)
    monitor = evaluation.TrainingMonitor(
        model, eval_mixture_or_task_name or mixture_or_task_name, eval_tasks, mesh=mesh, rules=rules,
        split=eval_split, task_feature_lengths=task_feature_lengths, batch_size=batch_size,
        infer_eval_every=infer_eval_every, infer_eval_examples=infer_eval_examples, write_metrics=writer.write,
        early_stopping=evaluation.EarlyStopping(early_stopping_metric, early_stopping_patience, early_stopping_mode)
        if early_stopping_metric else None, verbose=is_chief, prefix_lm=prefix_lm)
    if is_chief:
        with fileio.open_file(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())  # every binding as parsed (files + --gin. flags)
        vocab_record.write(model_dir, train_features)
        print(f"t5lite: {config.architecture}, {num_params:,} parameters, mesh {dict(mesh.shape)}, "
              f"preset {partitioning_preset!r}, batch {batch_size}, lengths {dict(task_feature_lengths)}, "
              f"steps {start_step}->{num_train_steps}, MODEL_DIR {model_dir}", flush=True)

    # --- Loop ------------------------------------------------------------------------------------------
    timer = observability.IntervalTimer(
        observability.train_step_flops(config, model.input_shapes(batch_size, task_feature_lengths)),
        observability.total_peak_flops(jax.devices()))
    profiler = observability.StepProfiler(profile_range, os.path.join(model_dir, "profile"), enabled=is_chief)
    compile_seconds, once = None, {}  # `once`: logged with the first interval only
    dropout_rng = jax.random.PRNGKey(seed + 1)
    pending_metrics = []
    eval_results: dict[str, dict[str, float]] = {}
    nonfinite_step, preempted = None, False
    stop_request = preemption.StopRequest()
    with jax.set_mesh(mesh), stop_request:  # (`with mesh:` is deprecated in jax 0.10 and no longer sets it)
        for step in range(start_step, num_train_steps):
            batch = observability.timed_next(train_batches, timer)
            profiler.before_step(step + 1)
            compile_clock, cache_hits = observability.CompileClock.read(), observability.CompileClock.cache_hits()
            state, metrics = train_step(state, partitioning.shard_batch(batch, mesh), dropout_rng)
            profiler.after_step(step + 1, metrics)
            if compile_seconds is None:  # the first call traces and compiles; keep that out of the rates
                compile_seconds = observability.CompileClock.read() - compile_clock
                timer.exclude(compile_seconds)
                once["compile_seconds"] = compile_seconds
                if is_chief:
                    how = ("Loaded the train step from the compilation cache"
                           if observability.CompileClock.cache_hits() > cache_hits else "Compiled the train step")
                    print(f"{how} in {format_duration(compile_seconds)}", flush=True)
            if write_host_records:
                with fileio.open_file(os.path.join(model_dir, f"host-{jax.process_index()}.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": float(metrics["loss"]),
                                        "rows": pipeline.row_fingerprints(batch)}) + "\n")
            pending_metrics.append(metrics)
            timer.add_step(*count_real_tokens(batch))
            done = step + 1

            if done == start_step + 1 and is_chief:
                write_operative_config(model_dir)  # what has been used so far; rewritten at the end

            if done % log_every == 0 or done == num_train_steps:
                means = _mean_metrics(pending_metrics)
                means["skipped_steps"] = round(means.pop("update_skipped") * len(pending_metrics))
                rates = {**timer.metrics(jax.local_devices()[0]), **once}
                once = {}
                eta = (num_train_steps - done) / max(rates["steps_per_s"], 1e-9)
                if is_chief:
                    print(progress_line(done, num_train_steps, means, rates, eta), flush=True)
                    if means["skipped_steps"]:
                        print(f"  {means['skipped_steps']} step(s) up to {done} skipped: non-finite loss or "
                              "gradients", flush=True)
                writer.write("train", done, {**means, **rates})
                pending_metrics = []

            if on_nonfinite == "stop" and float(metrics["update_skipped"]):  # waits for this step
                nonfinite_step = done
            preempted = stop_request.reached(done)
            stop = nonfinite_step is not None or preempted

            evaluated = not stop and (done % eval_every == 0 or done == num_train_steps)
            if evaluated:
                jax.block_until_ready(state.params)  # the steps still queued are training time, not eval's
                t_eval = time.perf_counter()
                eval_results = evaluate(eval_step, state.params, eval_data, mesh)
                for task, m in eval_results.items():
                    writer.write(f"eval/{task}", done, m)
                    if is_chief:
                        print(f"  eval {task}: loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}  "
                              f"perplexity {m['perplexity']:.2f}  ({format_duration(time.perf_counter() - t_eval)})",
                              flush=True)
                timer.exclude(time.perf_counter() - t_eval)  # keep eval time out of the training rates
            if not stop:  # inference eval when due; early stopping ends the run like a stop request
                stop = monitor.after_step(done, lambda p=state.params: model_params(p),
                                          eval_results if evaluated else None)
                timer.exclude(monitor.last_seconds)  # keep inference eval time out of the training rates

            ckpt.save(done, state, train_batches, force=stop or done == num_train_steps,
                      metrics=_mean_over_tasks(eval_results) if evaluated else None)
            if stop:
                break

    profiler.stop()
    if start_step >= num_train_steps:
        eval_results = evaluate(eval_step, state.params, eval_data, mesh)
    else:  # the last state must reach the disk: a failed save is retried, not dropped
        ckpt.save_until_written(int(state.step), state, train_batches)
    ckpt.close()
    writer.close()
    if nonfinite_step is not None:
        raise UserError(
            f"Non-finite loss or gradients at step {nonfinite_step} (train.on_nonfinite='stop'). Its update was "
            f"not applied: checkpoint {ckpt.directory}/{nonfinite_step} holds the parameters of step "
            f"{nonfinite_step - 1}. Lower the learning rate, or set train.on_nonfinite='skip', and run the same "
            "command to continue after this batch."
        )
    if preempted:
        print(f"Stopped by a preemption signal at step {int(state.step)}; checkpoint saved in "
              f"{ckpt.directory}. Run the same command to resume.", flush=True)
        return TrainResult(model_dir=model_dir, step=int(state.step), eval_results=eval_results,
                           exit_code=stop_request.exit_code)
    if is_chief:
        with fileio.open_file(os.path.join(model_dir, "eval_results.json"), "w") as f:
            json.dump({"step": int(state.step), "tasks": eval_results}, f, indent=2)
    return TrainResult(model_dir=model_dir, step=int(state.step), eval_results=eval_results)


def _mean_over_tasks(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task: {metric: value}} -> {metric: mean over tasks}."""
    return {k: float(np.mean([m[k] for m in results.values()])) for k in next(iter(results.values()))}


def _mean_metrics(metrics: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(list(metrics))
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _profile_flag_as_binding(argv: Sequence[str]) -> list[str]:
    """--profile_steps=A:B is shorthand for --gin.train.profile_steps='A:B'."""
    flag = "--profile_steps="
    return [f"--gin.train.profile_steps={a[len(flag):]!r}" if a.startswith(flag) else a for a in argv]


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gin_cli.configure(_profile_flag_as_binding(argv), description=__doc__)
    result = train()
    if jax.process_index() == 0:
        write_operative_config(result.model_dir)  # complete now that train() has returned
    return result.exit_code

