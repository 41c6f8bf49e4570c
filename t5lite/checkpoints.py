"""Orbax checkpoints of the train state and of every host's input-pipeline position.

Layout of MODEL_DIR/checkpoints/<step>/:
    state/           the TrainState (step, params, optimizer state), sharded arrays
    data_iterator/   process_<i>-of-<n>.{index,data-*}: process i's input-pipeline position
Orbax writes a step into a temporary directory and renames it once every item of every process
is complete, so a step directory is a whole checkpoint (a crash mid-save leaves only a
*.orbax-checkpoint-tmp-* directory, which is ignored). Saves run in the background: training
continues while a save is written, and the manager blocks only when the next save starts (or at
close). Kept: the last `keep` steps, the best step by a monitored eval metric (if any), and
pinned steps (a file PINNED in the step directory: Checkpointer.pin(step) or `touch`); orbax
deletes older steps only after a newer save has committed, so the newest good checkpoint is never
collected. A checkpoint that is complete but unreadable (truncated or damaged files) is renamed
<step>.unreadable by restore_latest(), with a warning, and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5lite import fileio, run_dir
from t5lite.errors import UserError

STATE = "state"
DATA_ITERATOR = "data_iterator"
PINNED = "PINNED"
# How a full disk, a permission problem or a vanished directory surface from orbax and tensorstore.
WRITE_ERRORS = (OSError, RuntimeError, ValueError)


class CheckpointableIterator(Protocol):
    """An input pipeline whose position can be written to and read from files (pipeline.BatchIterator)."""

    def save(self, prefix: str) -> None: ...

    def restore(self, prefix: str) -> None: ...


def _process_prefix(directory: epath.Path) -> str:
    return os.fspath(directory / f"process_{jax.process_index()}-of-{jax.process_count()}")


class DataIteratorHandler(ocp.CheckpointHandler):
    """Orbax item in which every process saves its own input-pipeline position.

    Synchronous on purpose: the position must be captured before the loop reads the next batch.
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        args.iterator.save(_process_prefix(directory))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> CheckpointableIterator:
        prefix = _process_prefix(directory)
        if not fileio.exists(prefix + ".index"):
            saved = sorted(p.name.split(".")[0] for p in directory.iterdir() if p.name.endswith(".index"))
            raise UserError(
                f"{directory} holds the input-pipeline positions {saved}, none for this process "
                f"({os.path.basename(prefix)}): the checkpoint was written by another number of hosts. "
                "Resume with the same number of hosts."
            )
        args.iterator.restore(prefix)
        return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: CheckpointableIterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: CheckpointableIterator


@dataclasses.dataclass
class PinnedSteps(ocp.checkpoint_managers.PreservationPolicy):
    """Orbax preservation policy: keep every step whose directory holds a PINNED file."""

    directory: str

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [fileio.exists(os.path.join(self.directory, str(c.step), PINNED)) for c in checkpoints]


class Checkpointer:
    """Saves every `save_every` steps and restores the newest readable step.

    Kept: the last `keep` steps (None: all), pinned steps, and, if `best_metric` is set, the step
    whose save() metrics[best_metric] is the lowest (best_mode="min") or highest ("max").
    """

    def __init__(self, directory: str, *, save_every: int, keep: int | None = 3, async_save: bool = True,
                 best_metric: str | None = None, best_mode: str = "min"):
        self.directory = fileio.absolute(directory)
        self.save_every = save_every
        self._step_in_flight: int | None = None
        if best_mode not in ("min", "max"):
            raise UserError(f"The best checkpoint's mode must be 'min' or 'max', got {best_mode!r}.")
        policies = [ocp.checkpoint_managers.LatestN(n=keep), PinnedSteps(self.directory)]
        if best_metric is not None:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied in save(); orbax would also save step 1
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
            cleanup_tmp_directories=True,  # leftovers of saves interrupted by a crash
            enable_async_checkpointing=async_save,
            # An unwritable directory then fails in save() itself (asynchronous creation would
            # leave orbax's background threads waiting minutes for a directory that never comes).
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA_ITERATOR: DataIteratorHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: CheckpointableIterator | None = None, *,
             force: bool = False, metrics: Mapping[str, float] | None = None) -> bool:
        """Starts saving `state` (and the pipeline position) at `step` every `save_every` steps or if
        force; returns whether it did. Blocks only while a previous save is still being written.
        `metrics` (e.g. this step's eval) rank the step for the best-checkpoint policy."""
        if not force and step % self.save_every:
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITERATOR] = DataIteratorSave(data_iterator)
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                                         metrics=dict(metrics) if metrics else None)
            self._step_in_flight = step
            return started
        except WRITE_ERRORS as e:  # also a failed background write of the previous save
            self._report_write_error(step, e)
            return False

    def save_until_written(self, step: int, state: Any, data_iterator: CheckpointableIterator | None = None, *,
                           retry_every_s: float = 30.0) -> None:
        """Blocks until `step` is committed, retrying a failed save every `retry_every_s` seconds.

        The state stays in memory meanwhile (free disk space or fix permissions; Ctrl-C gives up).
        """
        while True:
            if self.wait() and step in self.all_steps():
                return
            if self.save(step, state, data_iterator, force=True) and self.wait():
                return
            print(f"Retrying the save of step {step} in {retry_every_s:g}s (Ctrl-C gives up).", file=sys.stderr,
                  flush=True)
            time.sleep(retry_every_s)

    def pin(self, step: int) -> None:
        """Keeps `step` whatever the keep policy says (until its PINNED file is removed)."""
        with fileio.open_file(os.path.join(self.directory, str(step), PINNED), "w") as f:
            f.write("kept by Checkpointer.pin; delete this file to let the keep policy decide\n")

    def restore(self, step: int, abstract_state: Any, data_iterator: CheckpointableIterator | None = None) -> Any:
        """The state of `step`, on the shardings carried by `abstract_state` (ShapeDtypeStructs).

        If `data_iterator` is given and the checkpoint holds this process's pipeline position, the
        iterator continues from it. Raises UserError if the checkpoint does not fit the state.
        """
        try:
            return self._restore(step, abstract_state, data_iterator)
        except UserError:
            raise
        except Exception as e:  # orbax, tensorstore and tf report mismatches and damage in many types
            raise self._mismatch_error(step, e) from e

    def restore_latest(self, abstract_state: Any, data_iterator: CheckpointableIterator | None = None
                       ) -> tuple[Any, int] | None:
        """(state, step) of the newest readable checkpoint, or None if there is no checkpoint.

        Unreadable newer checkpoints are renamed <step>.unreadable (kept for inspection, out of the
        way of new saves) with a warning. If none is readable, the newest one's error is raised as a
        UserError: then the checkpoints most likely come from another model or optimizer.
        """
        failures: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self._restore(step, abstract_state, data_iterator)
            except UserError:
                raise
            except Exception as e:  # see restore()
                failures.append((step, e))
                continue
            for bad_step, error in failures:
                self._set_aside(bad_step, error, used_step=step)
            return state, step
        if failures:
            step, error = failures[0]
            raise self._mismatch_error(step, error) from error
        return None

    def saving_in_progress(self) -> bool:
        return self._manager.is_saving_in_progress()

    def wait(self) -> bool:
        """Blocks until the save in flight is written; returns False (after reporting it) if it failed."""
        try:
            self._manager.wait_until_finished()
        except WRITE_ERRORS as e:
            self._report_write_error(self._step_in_flight, e)
            return False
        return True

    def close(self) -> None:
        self._manager.close()

    def _restore(self, step: int, abstract_state: Any, data_iterator: CheckpointableIterator | None) -> Any:
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if fileio.isdir(os.path.join(self.directory, str(step), DATA_ITERATOR)):
                items[DATA_ITERATOR] = DataIteratorRestore(data_iterator)
            else:
                print(f"WARNING: checkpoint {self.directory}/{step} holds no input-pipeline position; the data "
                      "stream starts from its beginning.", file=sys.stderr, flush=True)
        return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

    def _set_aside(self, step: int, error: Exception, *, used_step: int) -> None:
        path = os.path.join(self.directory, str(step))
        print(f"WARNING: checkpoint {path} is unreadable ({type(error).__name__}: {_first_line(error)}); "
              f"using step {used_step} and renaming it {path}.unreadable", file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            fileio.rename(path, _unused_path(path + ".unreadable"))
        ocp.multihost.sync_global_processes(f"t5lite_set_aside_{step}")
        self._manager.reload()

    def _report_write_error(self, step: int | None, error: Exception) -> None:
        print(f"ERROR: a checkpoint save (step {step}) to {self.directory} failed ({type(error).__name__}: "
              f"{_first_line(error)}). Training goes on with the state in memory and the next save retries: "
              "free disk space or fix the directory's permissions.", file=sys.stderr, flush=True)

    def _mismatch_error(self, step: int, error: Exception) -> UserError:
        return UserError(
            f"Checkpoint {self.directory}/{step} cannot be restored into the configured model and optimizer "
            f"({type(error).__name__}: {_first_line(error)}). Use a new MODEL_DIR, or the gin settings the "
            "checkpoint was written with."
        )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _unused_path(path: str) -> str:
    candidate, n = path, 1
    while fileio.exists(candidate):
        candidate, n = f"{path}.{n}", n + 1
    return candidate


def read_params(checkpoint: str) -> dict:
    """The params of a training checkpoint (MODEL_DIR/checkpoints/<step>) as host numpy arrays.

    Only the params are read (not the optimizer state), and the model's configuration is not needed.
    """
    path = os.path.join(fileio.absolute(checkpoint), STATE)
    if not fileio.isdir(path):
        raise UserError(f"{checkpoint} is not a t5lite checkpoint (no {STATE}/ inside); pass "
                        "MODEL_DIR/checkpoints/<step>.")
    with ocp.PyTreeCheckpointer() as checkpointer:
        params_metadata = {"params": checkpointer.metadata(path).item_metadata.tree["params"]}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_metadata)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=params_metadata, restore_args=restore_args, partial_restore=True))
    return restored["params"]


def read_step(checkpoint: str) -> int:
    """The train step a checkpoint (MODEL_DIR/checkpoints/<step>) was saved at, read from its state."""
    path = os.path.join(fileio.absolute(checkpoint), STATE)
    if not fileio.isdir(path):
        raise UserError(f"{checkpoint} is not a t5lite checkpoint (no {STATE}/ inside); pass "
                        "MODEL_DIR/checkpoints/<step>.")
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        if "step" not in tree:
            raise UserError(f"{checkpoint} holds no train step (keys {sorted(tree)}).")
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item={"step": tree["step"]}, restore_args={"step": ocp.RestoreArgs(restore_type=np.ndarray)},
            partial_restore=True))
    return int(restored["step"])


def load_initial_params(checkpoint: str, init_params: Any, *, rename: Mapping[str, str] | None = None) -> Any:
    """`init_params` with every parameter the checkpoint has replaced by the checkpoint's value.

    Parameters are named by their "/"-joined path (e.g. "encoder/layers/mlp/wi_0/kernel"). `rename`
    maps regular expressions over the CHECKPOINT's names to replacements (re.sub, applied in order),
    e.g. {"^decoder/": "decoder_stack/"}. Parameters the checkpoint lacks keep their fresh
    initialisation (listed on stderr); a shape mismatch is a UserError. Values take the shardings of
    `init_params`.
    """
    loaded = {}
    for name, value in _flat_by_name(read_params(checkpoint)).items():
        for pattern, replacement in (rename or {}).items():
            name = re.sub(pattern, replacement, name)
        loaded[name] = value
    targets = _flat_by_name(init_params)
    mismatched = [f"{n}: checkpoint {loaded[n].shape}, model {targets[n].shape}"
                  for n in targets if n in loaded and loaded[n].shape != targets[n].shape]
    if mismatched:
        raise UserError(f"{checkpoint} does not fit the model: {'; '.join(mismatched[:5])}. Check the model's gin "
                        "settings, or rename parameters with CheckpointConfig.initial_checkpoint_rename.")
    fresh = sorted(set(targets) - set(loaded))
    unused = sorted(set(loaded) - set(targets))
    if fresh or unused:
        print(f"WARNING: initial checkpoint {checkpoint}: {len(fresh)} parameter(s) it lacks keep their fresh "
              f"initialisation {fresh[:10]}; {len(unused)} of its parameter(s) are unused {unused[:10]}",
              file=sys.stderr, flush=True)

    def pick(path, init_value):
        name = _path_name(path)
        if name not in loaded:
            return init_value
        return jax.device_put(loaded[name].astype(init_value.dtype), init_value.sharding)

    return jax.tree_util.tree_map_with_path(pick, init_params)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flat_by_name(tree: Any) -> dict[str, Any]:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def resolve_checkpoint_path(path: str) -> tuple[str, int | None]:
    """CHECKPOINT_PATH -> (checkpoints directory, step or None for 'the latest / every one')."""
    path = fileio.absolute(path).rstrip("/")
    if not fileio.isdir(path):
        raise UserError(f"CHECKPOINT_PATH {path!r} does not exist. Pass MODEL_DIR/checkpoints/<step> or a MODEL_DIR.")
    name = os.path.basename(path)
    if name.isdigit():
        return os.path.dirname(path), int(name)
    if fileio.isdir(run_dir.checkpoints_dir(path)):
        return run_dir.checkpoints_dir(path), None
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
    """The params of checkpoint `step`, read-only (see checkpoint_steps), placed on the shardings and
    dtypes of `abstract_params` (ShapeDtypeStructs of the params the checkpoint's train state holds:
    see trainer.abstract_params). Only the params are read: no optimizer is needed."""
    path = os.path.join(checkpoints_dir, str(step))
    found = _flat_by_name(read_params(path))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    expected = {_path_name(p): a for p, a in leaves}
    if ({n: tuple(getattr(v, "shape", ())) for n, v in found.items()}
            != {n: tuple(a.shape) for n, a in expected.items()}):
        raise UserError(f"Checkpoint {path} cannot be restored into the configured model: its parameters "
                        "differ in names or shapes (another model or vocabulary size). Use the gin files "
                        "the checkpoint was trained with.")
    return jax.tree_util.tree_unflatten(
        treedef, [jax.device_put(found[n].astype(a.dtype), a.sharding) for n, a in expected.items()])


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete state: a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
