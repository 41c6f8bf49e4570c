"""Checkpointer: fallback past damaged checkpoints, mismatch errors, what is kept."""

import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from t5lite import checkpoints, export
from t5lite.data import vocab_record
from t5lite.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_a_failed_save_is_reported_and_the_final_save_retries_until_the_directory_works(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    ckpt = _saved(directory, [1])
    shutil.rmtree(directory)
    directory.write_text("a file where the directory was")  # writes now fail (root ignores chmod)
    assert not ckpt.save(2, _state(2))
    assert "step 2" in capsys.readouterr().err

    def repair():
        directory.unlink()
        directory.mkdir()

    threading.Timer(1.0, repair).start()
    ckpt.save_until_written(3, _state(3), retry_every_s=0.2)
    assert 3 in ckpt.all_steps() and "Retrying the save of step 3" in capsys.readouterr().err
    restored, step = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 3 and float(restored["params"]["w"][0, 0]) == 3.0
    ckpt.close()


def test_keeps_the_last_n_the_best_by_metric_and_pinned_steps(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1, keep=2, best_metric="loss", best_mode="min")
    for step, loss in zip(range(1, 7), [5.0, 4.0, 1.0, 3.0, 2.0, 2.5], strict=True):
        ckpt.save(step, _state(step), metrics={"loss": loss})
        ckpt.wait()
        if step == 2:
            ckpt.pin(2)
    assert ckpt.all_steps() == [2, 3, 5, 6]  # pinned, best loss, last two
    ckpt.close()


def test_initial_params_are_loaded_by_name_renamed_and_missing_ones_keep_their_init(tmp_path, capsys):
    saved = {"step": jnp.asarray(5), "params": {
        "encoder": {"w": jnp.full((4, 8), 2.0)}, "old": {"b": jnp.full((8,), 3.0)}, "head": {"k": jnp.ones((2,))}}}
    ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(5, saved)
    ckpt.close()
    init = {"encoder": {"w": jnp.zeros((4, 8))}, "new": {"b": jnp.zeros((8,))}, "adapter": {"c": jnp.full((3,), 9.0)}}
    params = checkpoints.load_initial_params(str(tmp_path / "5"), init, rename={"^old/": "new/"})
    np.testing.assert_array_equal(params["encoder"]["w"], np.full((4, 8), 2.0))
    np.testing.assert_array_equal(params["new"]["b"], np.full((8,), 3.0))
    np.testing.assert_array_equal(params["adapter"]["c"], np.full((3,), 9.0))
    assert "adapter/c" in capsys.readouterr().err
    with pytest.raises(UserError, match="encoder/w"):
        checkpoints.load_initial_params(str(tmp_path / "5"), {"encoder": {"w": jnp.zeros((4, 4))}})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_writes_only_the_params_in_the_requested_dtype(tmp_path, dtype):
    state = {**_state(1.5), "opt_state": {"mu": jnp.ones((4, 8))}}
    ckpt = checkpoints.Checkpointer(str(tmp_path / "run"), save_every=1)
    ckpt.save(7, state)
    ckpt.close()
    out = export.export_params(str(tmp_path / "run" / "7"), str(tmp_path / "release"), dtype=dtype)
    released = ocp.StandardCheckpointer().restore(out)
    assert set(released) == {"w", "b"}
    assert released["w"].dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(released["b"], np.float32), np.full((8,), -1.5))
    with pytest.raises(UserError, match="already exists"):
        export.export_params(str(tmp_path / "run" / "7"), out)


def test_export_carries_the_runs_config_and_vocabulary_record(tmp_path):
    run = tmp_path / "run"
    ckpt = checkpoints.Checkpointer(str(run / "checkpoints"), save_every=1)
    ckpt.save(3, _state(1.0))
    ckpt.close()
    (run / "config.gin").write_text("TransformerConfig.emb_dim = 32\n")
    vocab_record.write(str(run), {"targets": seqio.Feature(seqio.ByteVocabulary())})
    out = export.export_params(str(run / "checkpoints" / "3"), str(tmp_path / "release"))
    assert (tmp_path / "release" / "config.gin").read_text() == "TransformerConfig.emb_dim = 32\n"
    assert vocab_record.read(out) == vocab_record.read(str(run))
    assert set(ocp.StandardCheckpointer().restore(out)) == {"w", "b"}  # the extra files do not disturb orbax


# Runs in a fresh process: the simulated device count must be set before jax initialises.
RESHARD_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[2]
import jax, numpy as np
from t5lite import checkpoints, partitioning, trainer
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model
from t5lite.optim import make_optimizer, make_schedule

action, _, directory, preset, data, fsdp, tensor = sys.argv[1:]
config = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                           num_encoder_layers=2, num_decoder_layers=2)
model = Model(config)
tx = make_optimizer(name="adamw", schedule=make_schedule(name="constant", learning_rate=1e-3)).tx
mesh = partitioning.make_mesh(data=int(data), fsdp=int(fsdp), tensor=int(tensor))
init = trainer.make_sharded_init(model, tx, model.input_shapes(8, {"inputs": 16, "targets": 8}), mesh,
                                 partitioning.axis_rules(preset))
ckpt = checkpoints.Checkpointer(directory, save_every=1)
flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
if action == "save":
    state = init.init_fn(jax.random.PRNGKey(7))
    ckpt.save(3, state, force=True)
    ckpt.wait()
    np.savez(directory + "/expected.npz", **flat(state))
else:
    state = ckpt.restore(3, init.abstract_state)
    expected = np.load(directory + "/expected.npz")
    got = flat(state)
    assert sorted(got) == sorted(expected.files)
    for name, value in got.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(state.params)}
    assert any("tensor" in s for s in specs) and not any("fsdp" in s for s in specs), specs
    print("restored", len(got), "arrays on", jax.device_count(), "devices")
ckpt.close()
"""


@pytest.mark.slow
def test_a_checkpoint_saved_on_8_devices_restores_on_2_with_another_preset(tmp_path):
    run = [sys.executable, "-c", RESHARD_SCRIPT]
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run(run + ["save", "8", str(tmp_path), "fsdp+tp", "2", "2", "2"], env=env, check=True,
                   capture_output=True, timeout=300)
    restored = subprocess.run(run + ["restore", "2", str(tmp_path), "tp", "1", "1", "2"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert "on 2 devices" in restored.stdout
