"""Orbax checkpoints of the train state and of every host's input-pipeline position.

Layout of MODEL_DIR/checkpoints/<step>/:
    state/           the TrainState (step, params, optimizer state), sharded arrays
    data_iterator/   process_<i>-of-<n>.{index,data-*}: process i's input-pipeline position
Orbax writes a step into a temporary directory and renames it once every item of every process
is complete, so a step directory is a whole checkpoint (a crash mid-save leaves only a
*.orbax-checkpoint-tmp-* directory, which is ignored). Saves run in the background: training
continues while a save is written, and the manager blocks only when the next save starts (or at
close). A checkpoint that is complete but unreadable (truncated or damaged files) is renamed
<step>.unreadable by restore_latest(), with a warning, and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

from t5lite.errors import UserError

STATE = "state"
DATA_ITERATOR = "data_iterator"


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
        if not os.path.exists(prefix + ".index"):
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


class Checkpointer:
    """Saves every `save_every` steps, keeps the last `keep`, restores the newest readable step."""

    def __init__(self, directory: str, *, save_every: int, keep: int | None = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied in save(); orbax would also save step 1
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of saves interrupted by a crash
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA_ITERATOR: DataIteratorHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: CheckpointableIterator | None = None, *,
             force: bool = False) -> bool:
        """Starts saving `state` (and the pipeline position) at `step` every `save_every` steps or if
        force; returns whether it did. Blocks only while a previous save is still being written."""
        if not force and step % self.save_every:
            return False
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITERATOR] = DataIteratorSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _restore(self, step: int, abstract_state: Any, data_iterator: CheckpointableIterator | None) -> Any:
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and os.path.isdir(os.path.join(self.directory, str(step), DATA_ITERATOR)):
            items[DATA_ITERATOR] = DataIteratorRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

    def _set_aside(self, step: int, error: Exception, *, used_step: int) -> None:
        path = os.path.join(self.directory, str(step))
        print(f"WARNING: checkpoint {path} is unreadable ({type(error).__name__}: {_first_line(error)}); "
              f"using step {used_step} and renaming it {path}.unreadable", file=sys.stderr, flush=True)
        if jax.process_index() == 0:
            os.replace(path, _unused_path(path + ".unreadable"))
        ocp.multihost.sync_global_processes(f"t5lite_set_aside_{step}")
        self._manager.reload()

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
    while os.path.exists(candidate):
        candidate, n = f"{path}.{n}", n + 1
    return candidate


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete state: a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
