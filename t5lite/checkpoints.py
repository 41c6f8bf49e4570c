"""Orbax checkpointing of the train state: save every K steps (async), keep the last N, resume.

Checkpoints live in MODEL_DIR/checkpoints/<step>/state. Saves run in the background: training
continues while the previous save is written, and the manager blocks only when the next save
starts (or at close).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from t5lite.errors import UserError


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int | None = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the interval is applied in save(); orbax would also save step 1
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Starts saving `state` at `step` every `save_every` steps (or if force); returns whether it did."""
        if not force and step % self.save_every:
            return False
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"Checkpoint {self.directory}/{step} does not match the configured model and optimizer "
                f"({type(e).__name__}: {e}). Use a new MODEL_DIR, or the gin settings the checkpoint was "
                "written with."
            ) from e
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete state: a restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
