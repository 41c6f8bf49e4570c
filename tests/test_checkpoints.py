"""Checkpointer: fallback past damaged checkpoints, mismatch errors, what is kept."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import checkpoints
from t5lite.errors import UserError


def _state(value: float):
    return {"step": jnp.asarray(int(value), jnp.int32), "params": {"w": jnp.full((4, 8), value, jnp.float32),
                                                                  "b": jnp.full((8,), -value, jnp.float32)}}


def _abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _saved(directory, steps, keep=3):
    ckpt = checkpoints.Checkpointer(str(directory), save_every=1, keep=keep)
    for step in steps:
        ckpt.save(step, _state(step))
    ckpt.wait()
    return ckpt


def _truncate_files(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, capsys):
    ckpt = _saved(tmp_path, [1, 2, 3])
    _truncate_files(tmp_path / "3" / "state")
    state, step = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 8), 2.0))
    assert "checkpoint" in capsys.readouterr().err and (tmp_path / "3.unreadable").is_dir()
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, _state(3.5))  # the step can be written again
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]
    ckpt.close()


def test_a_checkpoint_of_another_model_is_a_user_error_and_nothing_is_set_aside(tmp_path):
    ckpt = _saved(tmp_path, [1, 2])
    other = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.zeros((4, 16)), "b": jnp.zeros((16,))}}
    with pytest.raises(UserError, match="new MODEL_DIR"):
        ckpt.restore_latest(_abstract(other))
    assert ckpt.all_steps() == [1, 2] and not list(tmp_path.glob("*.unreadable"))
    ckpt.close()


def test_an_empty_directory_restores_nothing(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
    assert ckpt.restore_latest(_abstract(_state(0))) is None
    ckpt.close()
