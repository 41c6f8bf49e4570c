"""Pretrain or fine-tune a t5lite model.

    python -m t5lite.train --gin_file=gin/base.gin [--gin_file=...] [--gin.NAME=VALUE ...] [--profile_steps=A:B]

gin builds a run_config.TrainConfig; train(run) reads top to bottom: output directory, mesh, data,
the train program (trainer.build_train_program), state (fresh or resumed), then TrainLoop: one step
at a time, with logging, evaluation and checkpoint blocks, then the final checkpoint and eval.
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
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5lite import (
    adaptation,
    checkpoints,
    evaluation,
    fileio,
    gin_cli,
    observability,
    partitioning,
    preemption,
    rewards,
    rollouts,
    run_dir,
    trainer,
)
from t5lite.data import pipeline, vocab, vocab_record  # pipeline registers the tasks and their gin configurables
from t5lite.errors import UserError, reports_user_errors
from t5lite.model import word_vectors
from t5lite.model.config import TransformerConfig
from t5lite.run_config import TrainConfig
from t5lite.summaries import MetricsWriter, format_duration, progress_line


@dataclasses.dataclass(frozen=True)
class TrainResult:
    model_dir: str
    step: int
    eval_results: dict[str, dict[str, float]]  # task -> metric -> value, at the final step
    exit_code: int = 0  # 128 + signal number if SIGTERM / SIGINT stopped the run (after a checkpoint)


def ensure_writable_dir(path: str, create: bool = True) -> str:
    """Creates `path` and proves it writable before any compute is spent. create=False: a local path
    that does not exist yet is only checked (its nearest existing parent must be a writable directory),
    so that a run stopped by a later check leaves no empty MODEL_DIR behind."""
    path = fileio.absolute(path)
    try:
        if create or fileio.is_remote(path) or fileio.exists(path):
            fileio.check_writable_dir(path)
        else:
            fileio.check_creatable_dir(path)
    except fileio.ERRORS as e:
        raise UserError(
            f"MODEL_DIR {path!r} is not writable ({getattr(e, 'strerror', None) or e}). Choose another directory with "
            "--gin.MODEL_DIR=\\\"path\\\"."
        ) from e
    return path


def _space_note(path: str) -> str:
    free = fileio.free_bytes(path)
    return f" (the disk has {free / 1e6:,.1f} MB free)" if free is not None else ""


def before_training(path: str, write) -> None:
    """Runs write() (which writes `path`); a failure stops the run before any compute, in one line."""
    try:
        write()
    except fileio.ERRORS as e:
        raise UserError(f"Cannot write {path}: {getattr(e, 'strerror', None) or e}{_space_note(path)}. Nothing was "
                        "trained; free disk space or choose another MODEL_DIR, and run the same command.") from e


def after_training(path: str, write) -> bool:
    """Runs write() (which writes `path`); a failure is one line on stderr and the run goes on."""
    try:
        write()
        return True
    except fileio.ERRORS as e:
        print(f"ERROR: cannot write {path}: {getattr(e, 'strerror', None) or e}{_space_note(path)}. The "
              "checkpoints are not affected; the run goes on.", file=sys.stderr, flush=True)
        return False


def write_operative_config(model_dir: str) -> None:
    """MODEL_DIR/operative_config.gin: every parameter value the run has used, defaults included."""
    path = run_dir.path(model_dir, run_dir.OPERATIVE_CONFIG)

    def write():
        with fileio.open_file(path, "w") as f:
            f.write(gin.operative_config_str())

    after_training(path, write)


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


def check_vocabularies(run: TrainConfig, eval_tasks: Sequence[str], model_dir: str) -> Mapping[str, seqio.Feature]:
    """The training data's features, after checking that the eval tasks, the run being resumed in
    MODEL_DIR and the initial checkpoint's run all use the same vocabularies (see vocab_record)."""
    name = run.data.mixture_or_task_name
    features = seqio.get_mixture_or_task(name).output_features
    trained = {feature: vocab_record.describe(f.vocabulary) for feature, f in features.items()}
    for task in eval_tasks:
        vocab_record.check_against(trained, f"the training data {name!r} uses", f"eval task {task!r}",
                                   seqio.get_mixture_or_task(task).output_features)
    checkpoints_dir = run_dir.checkpoints_dir(model_dir)
    if fileio.isdir(checkpoints_dir) and checkpoints.checkpoint_steps(checkpoints_dir):  # a resumed run
        vocab_record.check(model_dir, f"the training data {name!r}", features)
    if run.checkpoints.initial_checkpoint_path:
        vocab_record.check(run_dir.model_dir_of(run.checkpoints.initial_checkpoint_path),
                           f"the training data {name!r}", features)
    return features


def count_real_tokens(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(non-padding tokens, all token slots) of the model's input and target features (both answers of pairs)."""
    keys = [k for k in ("encoder_input_tokens", "decoder_target_tokens", "chosen_decoder_target_tokens",
                        "rejected_decoder_target_tokens") if k in batch]
    return (int(sum(np.count_nonzero(batch[k]) for k in keys)), int(sum(batch[k].size for k in keys)))


def restore_or_init(run: TrainConfig, program: trainer.TrainProgram, ckpt: checkpoints.Checkpointer,
                    train_batches, train_features: Mapping[str, seqio.Feature]) -> trainer.TrainState:
    """The latest checkpoint in MODEL_DIR with the data position it saved (an exact resume), else a
    fresh state whose params come from CheckpointConfig.initial_checkpoint_path if set (else from the
    init scheme, and the word vectors of TransformerConfig.embedding_init_file if set)."""
    init = program.init
    resumed = ckpt.restore_latest(init.abstract_state, train_batches)
    if resumed is not None:
        state, latest = resumed
        print(f"Resumed from {ckpt.directory}/{latest}", flush=True)
        return state
    params = init.init_params(jax.random.PRNGKey(run.seed))
    initial = run.checkpoints.initial_checkpoint_path
    vectors_file = program.model.config.embedding_init_file
    if initial:
        params = checkpoints.load_initial_params(initial, params, rename=run.checkpoints.initial_checkpoint_rename)
        print(f"Initialised the params from {initial} (step {program.initial_step})", flush=True)
        if vectors_file:
            print(f"WARNING: TransformerConfig.embedding_init_file={vectors_file!r} is not used: the params come "
                  "from the initial checkpoint.", file=sys.stderr, flush=True)
    elif vectors_file:
        # The features share the token embedding and so one vocabulary; their names depend on the task
        # kind (inputs / targets, a preference pair's answers), hence the first one's.
        vocabulary = next(iter(train_features.values())).vocabulary
        params = word_vectors.with_word_vectors(params, program.model.config, vocab.pieces(vocabulary))
    state = init.state_from_params(params, jax.random.PRNGKey(run.seed))
    return state.replace(step=jax.device_put(jnp.int32(program.initial_step), init.state_shardings.step))


def describe_program(run: TrainConfig, config: TransformerConfig, program: trainer.TrainProgram, model_dir: str,
                     is_chief: bool) -> int:
    """Writes MODEL_DIR/model-info.txt and prints what trains (chief); -> the number of parameters."""
    init = program.init
    shardings = partitioning.logical_shardings(init.boxed_params_shapes, program.mesh, program.rules)
    rows = partitioning.sharding_table(init.boxed_params_shapes, shardings)
    lines = adaptation.summary_lines(program.adaptation, init.abstract_state, nn.unbox(init.boxed_params_shapes))
    if not is_chief:
        return sum(int(np.prod(r["shape"])) for r in rows)
    print("\n".join(lines), flush=True)
    path = run_dir.path(model_dir, run_dir.MODEL_INFO)
    before_training(path, lambda: write_model_info(path, config, rows, program.mesh, program.rules, lines))
    return sum(int(np.prod(r["shape"])) for r in rows)


@dataclasses.dataclass
class TrainLoop:
    """The training loop's state and its blocks: step, log, evaluate, checkpoint."""

    run: TrainConfig
    program: trainer.TrainProgram
    state: trainer.TrainState
    train_batches: Any
    evaluator: evaluation.TrainingEvaluator
    ckpt: checkpoints.Checkpointer
    writer: MetricsWriter
    timer: observability.IntervalTimer
    model_dir: str
    num_train_steps: int
    is_chief: bool

    def __post_init__(self):
        self.profiler = observability.StepProfiler(observability.parse_profile_steps(self.run.loop.profile_steps),
                                                   run_dir.path(self.model_dir, run_dir.PROFILE), enabled=self.is_chief)
        self.dropout_rng = jax.random.PRNGKey(self.run.seed + 1)
        self.compile_seconds: float | None = None
        self.once: dict[str, float] = {}  # logged with the first interval only
        self.pending_metrics: list = []
        self.eval_results: dict[str, dict[str, float]] = {}
        self.nonfinite_step: int | None = None  # on_nonfinite='stop': the step whose update was not applied
        self.nonfinite_params_step: int | None = None  # the parameters were not finite here (nothing saved)
        self.nonfinite_params = jax.jit(checkpoints.nonfinite_values)
        self.stop_request = preemption.StopRequest()
        self.preempted = False
        self.start_step = int(self.state.step)
        # LoRA: the factors merged into the base, for decoding (inference eval); jitted once.
        shardings = partitioning.logical_shardings(self.program.init.boxed_params_shapes, self.program.mesh,
                                                   self.program.rules)
        self.model_params = jax.jit(self.program.adaptation.model_params, out_shardings=shardings)

    def run_steps(self) -> None:
        """Trains from the state's step to num_train_steps, or until a stop (preemption, non-finite
        step with on_nonfinite='stop', early stopping); every step ends with the checkpoint block."""
        with jax.set_mesh(self.program.mesh), self.stop_request:  # (`with mesh:` no longer sets it in jax 0.10)
            for step in range(self.start_step, self.num_train_steps):
                batch, metrics = self.train_step(step)
                done = step + 1
                if done == self.start_step + 1 and self.is_chief:
                    write_operative_config(self.model_dir)  # what has been used so far; rewritten at the end
                if done % self.run.loop.log_every == 0 or done == self.num_train_steps:
                    self.log(done)
                stop = self.check_stop(done, metrics)
                evaluated = None
                if not stop:
                    evaluated, stop = self.evaluator.after_step(done, self.program.eval_params(self.state),
                                                                self.model_params)
                    self.timer.exclude(self.evaluator.last_seconds)  # eval time is not training time
                    if evaluated is not None:
                        self.eval_results = evaluated
                stop = self.checkpoint(done, force=stop or done == self.num_train_steps,
                                       metrics=evaluation.mean_over_tasks(evaluated) if evaluated else None) or stop
                if stop:
                    break
        self.profiler.stop()

    def train_step(self, step: int):
        batch = observability.timed_next(self.train_batches, self.timer)
        self.profiler.before_step(step + 1)
        clock, cache_hits = observability.CompileClock.read(), observability.CompileClock.cache_hits()
        self.state, metrics = self.program.step(self.state, partitioning.shard_batch(batch, self.program.mesh),
                                                self.dropout_rng)
        self.profiler.after_step(step + 1, metrics)
        if self.compile_seconds is None:  # the first call traces and compiles; keep that out of the rates
            self.compile_seconds = observability.CompileClock.read() - clock
            self.timer.exclude(self.compile_seconds)
            self.once["compile_seconds"] = self.compile_seconds
            if self.is_chief:
                how = ("Loaded the train step from the compilation cache"
                       if observability.CompileClock.cache_hits() > cache_hits else "Compiled the train step")
                print(f"{how} in {format_duration(self.compile_seconds)}", flush=True)
        if self.run.loop.write_host_records:
            with fileio.open_file(run_dir.host_records(self.model_dir, jax.process_index()), "a") as f:
                f.write(json.dumps({"step": step + 1, "loss": float(metrics["loss"]),
                                    "rows": pipeline.row_fingerprints(batch)}) + "\n")
        self.pending_metrics.append(metrics)
        self.timer.add_step(*count_real_tokens(batch))
        return batch, metrics

    def log(self, done: int) -> None:
        means = _mean_metrics(self.pending_metrics)
        means["skipped_steps"] = round(means.pop("update_skipped") * len(self.pending_metrics))
        rates = {**self.timer.metrics(jax.local_devices()[0]), **self.once}
        self.once = {}
        eta = (self.num_train_steps - done) / max(rates["steps_per_s"], 1e-9)
        if self.is_chief:
            print(progress_line(done, self.num_train_steps, means, rates, eta), flush=True)
            if means["skipped_steps"]:
                print(f"  {means['skipped_steps']} step(s) up to {done} skipped: non-finite loss or gradients",
                      flush=True)
        self.writer.write("train", done, {**means, **rates})
        self.pending_metrics = []

    def checkpoint(self, done: int, *, force: bool, metrics: Mapping[str, float] | None) -> bool:
        """Saves every CheckpointConfig.every steps (or if force), never parameters that are not finite
        (the checkpoints with finite ones stay, none is rotated out); -> stop the run? (the parameters
        are not finite: no later step can be applied)."""
        if not force and done % self.run.checkpoints.every:
            return False
        if bad := int(self.nonfinite_params(self.state.params)):
            self.nonfinite_params_step = done
            if self.is_chief:
                print(f"ERROR: {bad:,} parameter values are NaN or infinite at step {done}: not saved, so the "
                      f"checkpoints in {self.ckpt.directory} (newest: step {self.ckpt.latest_step()}) keep finite "
                      "parameters. Every later step would be skipped; stopping.", file=sys.stderr, flush=True)
            return True
        self.ckpt.save(done, self.state, self.train_batches, force=True, metrics=metrics)
        return False

    def check_stop(self, done: int, metrics) -> bool:
        """A non-finite step with on_nonfinite='stop', or a preemption signal, ends the run here."""
        if self.run.loop.on_nonfinite == "stop" and float(metrics["update_skipped"]):  # waits for this step
            self.nonfinite_step = done
        self.preempted = self.stop_request.reached(done)
        return self.nonfinite_step is not None or self.preempted

    def finish(self) -> TrainResult:
        """The last state reaches the disk (a failed save is retried, not dropped); the result, or the
        message of a non-finite stop."""
        step = int(self.state.step)
        if self.start_step >= self.num_train_steps:  # nothing to train: evaluate what is there
            self.eval_results = evaluation.teacher_forced_eval(
                self.evaluator.eval_step, self.program.eval_params(self.state), self.evaluator.eval_batches,
                self.program.mesh, self.evaluator.normalize)
        elif self.nonfinite_params_step is None:
            self.ckpt.save_until_written(step, self.state, self.train_batches,
                                         retry_every_s=self.run.checkpoints.retry_every_s)
        self.ckpt.close()
        self.writer.close()
        if self.nonfinite_params_step is not None:
            latest = self.ckpt.latest_step()
            since = f"step {latest}" if latest is not None else "the start (no checkpoint was saved)"
            raise UserError(
                f"The parameters became NaN or infinite after {since} (found at step {self.nonfinite_params_step}): "
                "an update overflowed, most likely from too high a learning rate. No checkpoint holds them. "
                "Lower the learning rate (make_schedule.learning_rate) and run the same command"
                + (f" to continue from step {latest}." if latest is not None else "."))
        if self.nonfinite_step is not None:
            raise UserError(
                f"Non-finite loss or gradients at step {self.nonfinite_step} (LoopConfig.on_nonfinite='stop'). Its "
                f"update was not applied: checkpoint {self.ckpt.directory}/{self.nonfinite_step} holds the parameters "
                f"of step {self.nonfinite_step - 1}. Lower the learning rate, or set LoopConfig.on_nonfinite='skip', "
                "and run the same command to continue after this batch."
            )
        if self.preempted:
            print(f"Stopped by a preemption signal at step {step}; checkpoint saved in "
                  f"{self.ckpt.directory}. Run the same command to resume.", flush=True)
            return TrainResult(self.model_dir, step, self.eval_results, exit_code=self.stop_request.exit_code)
        if self.is_chief:
            path = run_dir.path(self.model_dir, run_dir.EVAL_RESULTS)

            def write():
                with fileio.open_file(path, "w") as f:
                    json.dump({"step": step, "tasks": self.eval_results}, f, indent=2)

            after_training(path, write)
        return TrainResult(self.model_dir, step, self.eval_results)


def train(run: TrainConfig) -> TrainResult:
    """Trains to run.loop.num_train_steps (resuming from MODEL_DIR's latest checkpoint); returns the final eval.

    State: the latest checkpoint in MODEL_DIR/checkpoints if there is one (exact resume), else a
    fresh initialisation whose params are replaced by those of CheckpointConfig.initial_checkpoint_path
    if set; fine-tuning from it counts steps on from its step S (S+1 .. S+num_train_steps; the
    optimizer and its schedule start afresh). What trains is adaptation.make_adaptation's gin
    configuration. SIGTERM / SIGINT save a checkpoint at the current step and return with exit_code
    128 + signal number.
    """
    observability.parse_profile_steps(run.loop.profile_steps)  # a malformed range fails before any work

    # --- Output directory --------------------------------------------------------------------
    model_dir = ensure_writable_dir(run.model_dir, create=False)  # created once every check has passed
    is_chief = jax.process_index() == 0

    # --- Mesh ----------------------------------------------------------------------------------
    mesh = partitioning.make_mesh()
    batch_size = run.data.batch_size
    if batch_size % jax.process_count():
        raise UserError(f"DataConfig.batch_size={batch_size} is not divisible by {jax.process_count()} processes.")

    # --- Data ------------------------------------------------------------------------------------
    config = TransformerConfig()
    lengths = dict(run.data.task_feature_lengths)
    model_type = pipeline.model_type(config.is_encoder_decoder, run.data.prefix_lm, run.preference.enabled)
    if run.preference.enabled and run.evals.infer_every:
        raise UserError("A preference run evaluates its pairs teacher-forced (rewards, margins); it decodes "
                        "nothing: set EvalConfig.infer_every = 0.")
    pipeline.list_tasks_of(run.data.mixture_or_task_name)  # an unknown name fails here, with close matches
    eval_tasks = pipeline.list_tasks_of(run.eval_mixture_or_task_name)
    train_features = check_vocabularies(run, eval_tasks, model_dir)
    # Reading the eval batches up front also checks, before any compute, that the names exist,
    # the feature lengths suit the objective and the splits are not empty.
    eval_batches = evaluation.load_eval_batches(eval_tasks, split=run.evals.split, max_batches=run.evals.batches,
                                                seed=run.seed, task_feature_lengths=lengths, model_type=model_type,
                                                batch_size=batch_size)

    # --- Program: model, optimizer, adaptation, compiled step ------------------------------------------
    program = trainer.build_train_program(config, run, mesh)
    ensure_writable_dir(model_dir)
    num_params = describe_program(run, config, program, model_dir, is_chief)
    num_train_steps = run.loop.num_train_steps + program.initial_step

    # --- State and data position: resume from MODEL_DIR or initialise ---------------------------------
    # The train stream is built first so that a resume can put it back where the checkpoint left it:
    # a resumed run sees exactly the batches an uninterrupted run would have seen.
    train_batches = make_train_batches(run, program, train_features, model_type)
    ckpt = checkpoints.Checkpointer(run_dir.checkpoints_dir(model_dir), save_every=run.checkpoints.every,
                                    keep=run.checkpoints.keep, best_metric=run.checkpoints.best_metric,
                                    best_mode=run.checkpoints.best_mode, checksums=run.checkpoints.checksums,
                                    bytes_per_save=_bytes(program.init.abstract_state))
    state = restore_or_init(run, program, ckpt, train_batches, train_features)

    # --- Evaluation and outputs ---------------------------------------------------------------------
    # A resumed run re-runs the steps after its checkpoint: their rows of the attempt that crashed move
    # to metrics.superseded.jsonl, so metrics.jsonl stays one row per step.
    writer = MetricsWriter(model_dir, enabled=is_chief, resumed_at=ckpt.latest_step())
    eval_step = trainer.jit_eval_step(program.model, program.eval_params_shardings, mesh, program.rules,
                                      loss_config=run.loss, adaptation=program.adaptation, preference=run.preference)
    evaluator = evaluation.TrainingEvaluator(
        program.model, run.evals, eval_step=eval_step, eval_batches=eval_batches, mesh=mesh, rules=program.rules,
        mixture_or_task_name=run.eval_mixture_or_task_name, task_feature_lengths=lengths, batch_size=batch_size,
        last_step=num_train_steps, write_metrics=writer.write, verbose=is_chief, prefix_lm=run.data.prefix_lm,
        normalize=trainer.eval_normalizer(run.preference))
    if is_chief:
        config_path = run_dir.path(model_dir, run_dir.CONFIG)

        def write_config():
            with fileio.open_file(config_path, "w") as f:
                f.write(gin.config_str())  # every binding as parsed (files + --gin. flags)

        before_training(config_path, write_config)
        before_training(fileio.join(model_dir, vocab_record.RECORD),
                        lambda: vocab_record.write(model_dir, train_features))
        print(f"t5lite: {config.architecture}, {num_params:,} parameters, mesh {dict(mesh.shape)}, "
              f"preset {run.partitioning_preset!r}, batch {batch_size}, lengths {lengths}, "
              f"steps {int(state.step)}->{num_train_steps}, MODEL_DIR {model_dir}", flush=True)

    # --- Loop ------------------------------------------------------------------------------------------
    timer = observability.IntervalTimer(step_flops(program.model, run, batch_size, lengths),
                                        observability.total_peak_flops(jax.devices()))
    loop = TrainLoop(run, program, state, train_batches, evaluator, ckpt, writer, timer, model_dir, num_train_steps,
                     is_chief)
    if run.grpo.enabled:
        train_batches.follow(lambda: loop.state)  # completions are sampled from the state being trained
    loop.run_steps()
    return loop.finish()


def make_train_batches(run: TrainConfig, program: trainer.TrainProgram, features: Mapping[str, seqio.Feature],
                       model_type: str):
    """This host's train stream: the task's batches, or with GRPOConfig.enabled batches of completions
    sampled from the train state (rollouts.RolloutBatches; call its follow() with the loop's state) for
    batch_size / num_generations of the task's prompts per step (decoder-only: prefix-LM features)."""
    per_host = run.data.batch_size // jax.process_count()
    grpo = run.grpo
    if grpo.enabled and per_host % grpo.num_generations:
        raise UserError(f"DataConfig.batch_size={run.data.batch_size} counts completions: per process "
                        f"({per_host}) it must be a multiple of GRPOConfig.num_generations={grpo.num_generations}.")
    encoder_decoder = program.model.config.is_encoder_decoder
    batches = pipeline.get_batches(
        run.data.mixture_or_task_name, split=run.data.split, shuffle=True, num_epochs=None, seed=run.seed,
        task_feature_lengths=run.data.task_feature_lengths,
        model_type=(model_type if encoder_decoder else "prefix_lm") if grpo.enabled else model_type,
        batch_size=per_host // grpo.num_generations if grpo.enabled else per_host, pack=not grpo.enabled,
        # Each host reads only its own shard of every task and feeds its slice of the global batch.
        shard_info=seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count()),
        cache_dir=run.data.cache_dir)
    if not grpo.enabled:
        return batches
    vocabulary = features["targets"].vocabulary
    return rollouts.RolloutBatches(
        batches, model=program.model, adaptation=program.adaptation, config=grpo,
        reward_fns=[(name, rewards.resolve(name)) for name in grpo.rewards], decode=vocabulary.decode,
        lengths=run.data.task_feature_lengths, mesh=program.mesh, rules=program.rules, seed=run.seed,
        prefix_lm=run.data.prefix_lm, eos_id=vocabulary.eos_id)


def step_flops(model: trainer.Model, run: TrainConfig, batch_size: int, lengths: Mapping[str, int]) -> float:
    """Model FLOPs of a train step. Preference pairs: training on both answers of each pair (2x the
    rows), plus the reference's forward pass (a third of a training pass) for DPO and IPO; GRPO with a
    KL term likewise (its sampling is not counted)."""
    rows = batch_size * (2 if run.preference.enabled else 1)
    flops = observability.train_step_flops(model.config, model.input_shapes(rows, lengths))
    uses_reference = run.preference.uses_reference or (run.grpo.enabled and run.grpo.beta != 0)
    return flops * (4 / 3 if uses_reference else 1)


def _bytes(abstract_tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(abstract_tree))


def _mean_metrics(metrics: Sequence[Mapping[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(list(metrics))
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _profile_flag_as_binding(argv: Sequence[str]) -> list[str]:
    """--profile_steps=A:B is shorthand for --gin.LoopConfig.profile_steps='A:B'."""
    flag = "--profile_steps="
    return [f"--gin.LoopConfig.profile_steps={a[len(flag):]!r}" if a.startswith(flag) else a for a in argv]


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    gin_cli.configure(_profile_flag_as_binding(argv), description=__doc__)
    result = train(TrainConfig())
    if jax.process_index() == 0:
        write_operative_config(result.model_dir)  # complete now that train() has returned
    return result.exit_code
