"""Orbax checkpoints of the train state and of every host's input-pipeline position.

Layout of MODEL_DIR/checkpoints/<step>/:
    state/           the TrainState (step, params, optimizer state), sharded arrays
    data_iterator/   process_<i>-of-<n>.{index,data-*}: process i's input-pipeline position
    checksums.json   the size and SHA-256 of every file of both items (written once the step is
                     committed; verified before every restore)
Orbax writes a step into a temporary directory and renames it once every item of every process
is complete, so a step directory is a whole checkpoint (a crash mid-save leaves only a
*.orbax-checkpoint-tmp-* directory, which is ignored). Saves run in the background: training
continues while a save is written, and the manager blocks only when the next save starts (or at
close). Kept: the last `keep` steps, the best step by a monitored eval metric (if any), and
pinned steps (a file PINNED in the step directory: Checkpointer.pin(step) or `touch`); orbax
deletes older steps only after a newer save has committed, so the newest good checkpoint is never
collected. A checkpoint that is complete but unreadable (truncated or damaged files) is renamed
<step>.unreadable by restore_latest(), with a warning naming the damaged file, and the one
before it is used. A damaged checkpoint is one whose files differ from its checksums.json (bit
flips keep a file's size), one that lacks a file, or one whose parameters are not finite: orbax
and tensorstore check none of these (zarr's CRC covers only a shard's index).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5lite import fileio, run_dir
from t5lite.errors import UserError

STATE = "state"
DATA_ITERATOR = "data_iterator"
PINNED = "PINNED"
CHECKSUMS = "checksums.json"
# How a full disk, a permission problem or a vanished directory surface from orbax and tensorstore
# (TensorFlow's errors, from the input-pipeline position, are turned into OSError below).
WRITE_ERRORS = (OSError, RuntimeError, ValueError)


class _ReportedWriteErrors(logging.Filter):
    """Drops orbax's own log records (with tracebacks, from its background threads) of a failed write:
    Checkpointer reports each failed save in one line (step, directory, free and needed space)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("orbax" in record.pathname and isinstance(error, OSError))


logging.getLogger("absl").addFilter(_ReportedWriteErrors())


class DamagedCheckpoint(Exception):
    """A committed checkpoint whose files or values are not what was saved (see the module docstring)."""


# --- Integrity: checksums.json and finite parameters ------------------------------------------------------


def _sha256(path: str) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file."""
    digest, size = hashlib.sha256(), 0
    with fileio.open_file(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_checksums(step_dir: str) -> None:
    """Writes step_dir/checksums.json: {relative path: {"bytes", "sha256"}} of every file of its items."""
    files = {}
    for item in (STATE, DATA_ITERATOR):
        item_dir = os.path.join(step_dir, item)
        if fileio.isdir(item_dir):
            for name in fileio.files_under(item_dir):
                digest, size = _sha256(os.path.join(item_dir, name))
                files[f"{item}/{name}"] = {"bytes": size, "sha256": digest}
    temporary = os.path.join(step_dir, CHECKSUMS + ".tmp")
    with fileio.open_file(temporary, "w") as f:
        json.dump({"files": files}, f, indent=1)
    fileio.rename(temporary, os.path.join(step_dir, CHECKSUMS))  # whole or absent


def verify_checksums(step_dir: str) -> bool:
    """Raises DamagedCheckpoint naming the first file that is missing or differs from checksums.json;
    -> False if the step has no checksums.json (saved before t5lite wrote them, or a crash came
    between the commit and the checksums), True if every file matched."""
    path = os.path.join(step_dir, CHECKSUMS)
    if not fileio.exists(path):
        return False
    try:
        with fileio.open_file(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"{path} is not readable JSON ({e})") from e
    for name, expected in files.items():
        file_path = os.path.join(step_dir, name)
        if not fileio.exists(file_path):
            raise DamagedCheckpoint(f"{name} is missing")
        if _sha256(file_path)[0] != expected["sha256"]:
            raise DamagedCheckpoint(f"{name} differs from the bytes saved (SHA-256 mismatch)")
    return True


def nonfinite_values(tree: Any) -> jax.Array:
    """How many values of a pytree of arrays are NaN or infinite (traceable: jit it for big states)."""
    counts = [jnp.size(x) - jnp.sum(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return sum(counts, jnp.zeros((), jnp.int32))


def count_nonfinite(tree: Any) -> int:
    return int(nonfinite_values(tree))


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
        prefix = _process_prefix(directory)
        try:
            args.iterator.save(prefix)
        except fileio.ERRORS as e:  # TensorFlow writes it: a full disk is a ResourceExhaustedError
            raise OSError(f"writing the input-pipeline position {prefix}: {getattr(e, 'message', e)}") from e

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
                 best_metric: str | None = None, best_mode: str = "min", checksums: bool = True,
                 bytes_per_save: int | None = None):
        self.directory = fileio.absolute(directory)
        self.save_every = save_every
        self.checksums = checksums
        self.bytes_per_save = bytes_per_save  # for the message of a failed save (a full disk)
        self._step_in_flight: int | None = None
        self._without_checksums: list[int] = []  # saved, checksums.json not yet written
        if best_mode not in ("min", "max"):
            raise UserError(f"The best checkpoint's mode must be 'min' or 'max', got {best_mode!r}.")
        if keep is not None and keep < 1:
            raise UserError(f"CheckpointConfig.keep={keep} would delete the run's newest checkpoint; keep at least "
                            "1 (None keeps every checkpoint).")
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
        self.wait()  # the previous save's outcome is reported under its own step, then checksummed
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITERATOR] = DataIteratorSave(data_iterator)
        self._step_in_flight = step
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                                         metrics=dict(metrics) if metrics else None)
        except WRITE_ERRORS as e:
            self._report_write_error(step, e)
            return False
        if started:
            self._without_checksums.append(step)
        return started

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
            raise self._mismatch_error(step, error, newest_of_all=True) from error
        return None

    def saving_in_progress(self) -> bool:
        return self._manager.is_saving_in_progress()

    def wait(self) -> bool:
        """Blocks until the save in flight is written (and checksummed); returns False (after
        reporting it) if it failed."""
        try:
            self._manager.wait_until_finished()
        except WRITE_ERRORS as e:
            self._report_write_error(self._step_in_flight, e)
            self._without_checksums = [s for s in self._without_checksums if s != self._step_in_flight]
            return False
        return self._write_checksums()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def _write_checksums(self) -> bool:
        """checksums.json for the committed steps that lack it (the chief writes them)."""
        committed = set(self.all_steps())
        pending, self._without_checksums = self._without_checksums, []
        for step in pending:
            if step not in committed or not self.checksums or jax.process_index() != 0:
                continue
            try:
                write_checksums(os.path.join(self.directory, str(step)))
            except fileio.ERRORS as e:
                self._report_write_error(step, e, what="its checksums.json (the checkpoint itself is whole)")
                return False
        return True

    def _restore(self, step: int, abstract_state: Any, data_iterator: CheckpointableIterator | None) -> Any:
        step_dir = os.path.join(self.directory, str(step))
        verify_checksums(step_dir)
        if not fileio.exists(os.path.join(step_dir, STATE, "_METADATA")):
            raise DamagedCheckpoint(f"{STATE}/_METADATA is missing")
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if fileio.isdir(os.path.join(self.directory, str(step), DATA_ITERATOR)):
                items[DATA_ITERATOR] = DataIteratorRestore(data_iterator)
            else:
                print(f"WARNING: checkpoint {self.directory}/{step} holds no input-pipeline position; the data "
                      "stream starts from its beginning.", file=sys.stderr, flush=True)
        state = self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
        params = getattr(state, "params", state.get("params", state) if isinstance(state, Mapping) else state)
        if bad := count_nonfinite(params):
            raise DamagedCheckpoint(f"{bad:,} of its parameter values are NaN or infinite")
        return state

    def _set_aside(self, step: int, error: Exception, *, used_step: int) -> None:
        path = os.path.join(self.directory, str(step))
        print(f"WARNING: checkpoint {path} is {_what_is_wrong(error)}; using step {used_step} and renaming it "
              f"{path}.unreadable", file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            fileio.rename(path, _unused_path(path + ".unreadable"))
        ocp.multihost.sync_global_processes(f"t5lite_set_aside_{step}")
        self._manager.reload()

    def _report_write_error(self, step: int | None, error: Exception, what: str = "") -> None:
        space = ""
        free = fileio.free_bytes(self.directory)
        if free is not None:
            space = f" The disk has {_mb(free)} free" + (
                f"; a checkpoint needs about {_mb(self.bytes_per_save)}." if self.bytes_per_save else ".")
        print(f"ERROR: saving checkpoint step {step} {what}to {self.directory} failed ({type(error).__name__}: "
              f"{_first_line(error)}).{space} Training goes on with the state in memory and the next save "
              "retries: free disk space or fix the directory's permissions.", file=sys.stderr, flush=True)

    def _mismatch_error(self, step: int, error: Exception, *, newest_of_all: bool = False) -> UserError:
        if isinstance(error, DamagedCheckpoint):
            every = (f" Every checkpoint in {self.directory} is damaged or unreadable; nothing was renamed or "
                     "deleted. Restore them from a copy, or move the directory away to train from scratch."
                     if newest_of_all else " Restore it from a copy, or use another step.")
            return UserError(f"Checkpoint {self.directory}/{step} is damaged: {error}.{every}")
        return UserError(
            f"Checkpoint {self.directory}/{step} cannot be restored into the configured model and optimizer "
            f"({type(error).__name__}: {_first_line(error)}). Use a new MODEL_DIR, or the gin settings the "
            "checkpoint was written with."
        )


def _what_is_wrong(error: Exception) -> str:
    if isinstance(error, DamagedCheckpoint):
        return f"damaged: {error}"
    return f"unreadable ({type(error).__name__}: {_first_line(error)})"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


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
    try:
        verify_checksums(os.path.dirname(path))
        if not fileio.exists(os.path.join(path, "_METADATA")):
            raise DamagedCheckpoint(f"{STATE}/_METADATA is missing")
    except DamagedCheckpoint as e:
        raise UserError(f"Checkpoint {checkpoint} is damaged: {e}. Use another step of the run.") from e
    with ocp.PyTreeCheckpointer() as checkpointer:
        params_metadata = {"params": checkpointer.metadata(path).item_metadata.tree["params"]}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_metadata)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=params_metadata, restore_args=restore_args, partial_restore=True))
    if bad := count_nonfinite(restored["params"]):
        raise UserError(f"Checkpoint {checkpoint} is damaged: {bad:,} of its parameter values are NaN or infinite. "
                        "Use an earlier step of the run.")
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
