"""Partitioning: presets on 8 simulated devices match one device; state shardings; clear errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from t5lite import partitioning, trainer
from t5lite import train as train_lib
from t5lite.data import pipeline
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=1, num_decoder_layers=1)
# The tiny model on real text, a few steps, every step logged; Adafactor factors every >= 32 dim
# so its factored statistics exist (and are sharded) even at this size.
PRESET_RUN = [
    "--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=4",
    "--gin.LoopConfig.log_every=1", "--gin.EvalConfig.every=1000", "--gin.EvalConfig.batches=1",
    "--gin.CheckpointConfig.every=1000", "--gin.make_schedule.warmup_steps=10",
    "--gin.make_adafactor.min_dim_size_to_factor=32",
    "--gin.EvalConfig.mixture_or_task_name='tiny_shakespeare_span_corruption'",  # one eval task: faster
]


def _mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    """A mesh of any size for sharding arithmetic (no devices needed)."""
    return AbstractMesh((data, fsdp, tensor), partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _boxed_shapes(config: TransformerConfig):
    model = Model(config)
    return jax.eval_shape(lambda rng: model.init(rng, model.input_shapes(4, {"inputs": 8, "targets": 4}))["params"],
                          jax.random.PRNGKey(0))


def _spec(sharding) -> tuple:
    """A PartitionSpec as a tuple without trailing Nones (lists for multi-axis entries)."""
    spec = [a if a is None or isinstance(a, str) else list(a) for a in sharding]
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


# --- 8 simulated devices: every preset trains exactly like one device -----------------------------

@pytest.mark.slow
def test_every_preset_on_8_devices_matches_one_device_and_shards_by_the_rules(tmp_path, capsys):
    assert train_lib.main(PRESET_RUN + [f"--gin.MODEL_DIR='{tmp_path}/one_device'"]) == 0
    with open(tmp_path / "one_device" / "metrics.jsonl") as f:
        reference = [r["loss"] for r in map(json.loads, f) if r["group"] == "train"]
    capsys.readouterr()

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "tests/presets_on_8_devices.py", str(tmp_path), *PRESET_RUN],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["preset"]: r for r in map(json.loads, [ln for ln in done.stdout.splitlines() if ln.startswith("{")])}
    assert set(runs) == {"dp", "fsdp", "tp", "fsdp+tp"}
    assert runs["fsdp+tp"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}

    print("\n1 device:", reference)
    for preset, run in runs.items():
        print(f"{preset} {run['mesh']}:", run["losses"], "inference:", run["inference"])
        assert run["trained_mesh"] == f"mesh: {run['mesh']}"  # train() took the gin-bound mesh sizes
        assert len(run["losses"]) == len(reference) == 4
        np.testing.assert_allclose(run["losses"], reference, rtol=1e-4, err_msg=preset)
        # Decoding (fused projections, caches) and scoring with the preset's sharded params and a
        # batch split over the mesh equal one device's.
        inferred = run["inference"]
        assert inferred["tokens_equal"], preset
        assert inferred["score_diff"] <= 1e-5 * inferred["score_scale"], (preset, inferred)
        assert inferred["target_score_diff"] <= 1e-5 * inferred["target_score_scale"], (preset, inferred)

    # An int8 base (LoRA fine-tuning) is sharded like its float kernels: codes [..., blocks, 16] take
    # the kernel's axes, the last dimension's on the blocks; a device holds 1/8 of wi_0's codes.
    quantized = runs["fsdp+tp"]["quantized_base"]
    print("quantized base on fsdp+tp:", quantized)
    assert quantized["merged_equal"]
    codes = quantized["codes_specs"]
    assert codes["encoder/layers/mlp/wi_0"] == [None, "fsdp", "tensor", None]  # [layers, embed, mlp/16, 16]
    assert codes["token_embedder/embedding"] == ["tensor", "fsdp", None]  # [vocab, embed/16, 16]
    assert codes["encoder/layers/attention/query"] == [None, "fsdp", "tensor", None, None]  # [.., kv/16, 16]
    assert quantized["codes_fraction_per_device"]["encoder/layers/mlp/wi_0"] == 1 / 8

    params = {p: {n: _spec(s) for n, s in r["param_specs"].items()} for p, r in runs.items()}
    assert params["dp"] == dict.fromkeys(params["dp"], ())
    assert params["fsdp"]["encoder/layers/mlp/wi_0"] == (None, "fsdp")
    assert params["fsdp"]["token_embedder/embedding"] == (None, "fsdp")  # embed takes fsdp first
    assert params["tp"]["encoder/layers/mlp/wi_0"] == (None, None, "tensor")
    assert params["tp"]["encoder/layers/attention/query"] == (None, None, "tensor")
    assert params["fsdp+tp"]["encoder/layers/mlp/wi_0"] == (None, "fsdp", "tensor")
    assert params["fsdp+tp"]["token_embedder/embedding"] == ("tensor", "fsdp")
    assert params["fsdp+tp"]["decoder/logits_dense"] == ("fsdp", "tensor")
    # Adafactor's factored statistics of wi_0 [layers, embed 64, mlp 128] drop one dimension each
    # and keep the parameter's axes on the other.
    stats = runs["fsdp+tp"]["state_specs"]
    assert _spec(stats["v_row"]["encoder/layers/mlp/wi_0"]) == (None, "fsdp")  # [layers, embed]
    assert _spec(stats["v_col"]["encoder/layers/mlp/wi_0"]) == (None, "tensor")  # [layers, mlp]


# --- Activation constraints reach the compiled step ----------------------------------------------

def test_activation_constraints_apply_inside_the_jitted_step():
    model = Model(TINY)
    mesh = partitioning.make_mesh()
    rules = partitioning.axis_rules("fsdp+tp")
    init = trainer.make_sharded_init(model, optax.sgd(0.1), model.input_shapes(4, {"inputs": 8, "targets": 4}),
                                     mesh, rules)
    step = trainer.make_train_step(model, optax.sgd(0.1), optax.constant_schedule(0.1),
                                   loss_config=trainer.LossConfig(), use_dropout=False)
    batch = {k: jax.ShapeDtypeStruct(s, np.int32) for k, s in pipeline.batch_feature_shapes(
        {"inputs": 8, "targets": 4}, model_type="encoder_decoder", batch_size=4).items()}

    def lowered_text(fn) -> str:
        return jax.jit(fn).lower(init.abstract_state, batch, jax.random.PRNGKey(0)).as_text()

    # [batch, length, mlp] hidden units: batch over (data, fsdp), mlp over tensor.
    constraint = '[{"data", "fsdp"}, {}, {"tensor"}]'
    assert constraint in lowered_text(partitioning.with_sharding_rules(step, mesh, rules))
    assert constraint not in lowered_text(step)  # without the rules the model's constraints are no-ops


# --- Optimizer state follows the parameters --------------------------------------------------------

def test_factored_adafactor_statistics_follow_their_parameter_axes():
    mesh = _mesh(1, 2, 4)
    params = {"w": jax.ShapeDtypeStruct((256, 512), np.float32), "b": jax.ShapeDtypeStruct((512,), np.float32)}
    shardings = {"w": NamedSharding(mesh, PartitionSpec("fsdp", "tensor")),
                 "b": NamedSharding(mesh, PartitionSpec("tensor"))}
    state = jax.eval_shape(optax.adafactor(0.1, min_dim_size_to_factor=128).init, params)
    derived = partitioning.derive_state_shardings(state, params, shardings, mesh)
    factored = derived[0]
    assert factored.v_row["w"].spec == PartitionSpec("fsdp")  # [256]: the largest dim dropped
    assert factored.v_col["w"].spec == PartitionSpec("tensor")  # [512]
    assert factored.v["b"].spec == PartitionSpec("tensor")  # unfactored: the param's own shape
    assert factored.v["w"].spec == PartitionSpec()  # a [1] placeholder
    assert factored.count.spec == PartitionSpec()


def test_optimizer_state_of_a_partly_frozen_model_follows_the_trained_parameters():
    # multi_transform leaves optax.MaskedNode() where a frozen parameter would be.
    mesh = _mesh(1, 2, 4)
    params = {"w": jax.ShapeDtypeStruct((256, 512), np.float32), "b": jax.ShapeDtypeStruct((512,), np.float32)}
    shardings = {"w": NamedSharding(mesh, PartitionSpec("fsdp", "tensor")),
                 "b": NamedSharding(mesh, PartitionSpec("tensor"))}
    tx = optax.multi_transform({"train": optax.adam(0.1), "freeze": optax.set_to_zero()},
                               {"w": "train", "b": "freeze"})
    state = jax.eval_shape(tx.init, params)
    derived = partitioning.derive_state_shardings(state, params, shardings, mesh)
    adam = derived.inner_states["train"].inner_state[0]
    assert adam.mu["w"].spec == adam.nu["w"].spec == PartitionSpec("fsdp", "tensor")
    assert isinstance(adam.mu["b"], optax.MaskedNode)
    # The shardings tree has the state's structure, as jit's out_shardings needs.
    assert jax.tree_util.tree_structure(derived) == jax.tree_util.tree_structure(state)


# --- Clear errors ---------------------------------------------------------------------------------

def test_mesh_sizes_that_do_not_multiply_to_the_device_count_are_refused():
    with pytest.raises(UserError, match=r"data=2 x fsdp=3 x tensor=1 = 6 devices, but 1 are available"):
        partitioning.make_mesh(data=2, fsdp=3, tensor=1)
    with pytest.raises(UserError, match="not a multiple of 2"):
        partitioning.make_mesh(data=-1, fsdp=1, tensor=2)


def test_a_batch_that_does_not_split_over_the_data_axes_is_refused():
    with pytest.raises(UserError, match=r"batch_size=12 is not divisible by .* data x fsdp = 2 x 4 = 8"):
        partitioning.check_batch_size(12, _mesh(2, 4, 1))
    partitioning.check_batch_size(16, _mesh(2, 4, 2))


def test_a_rule_naming_an_unknown_mesh_axis_is_refused():
    with pytest.raises(UserError, match="unknown mesh axis 'model'"):
        partitioning.axis_rules("dp", custom_rules=(("batch", "data"), ("mlp", "model")))
    rules = partitioning.axis_rules("dp", custom_rules=[("batch", ["data", "fsdp"]), ("mlp", "tensor")])
    assert rules == (("batch", ("data", "fsdp")), ("mlp", "tensor"))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError, match=r"'fsdp\+tp'"):
        partitioning.axis_rules("zero3")


def test_a_parameter_not_divisible_by_its_mesh_axis_is_named():
    # 2 heads cannot be split 4 ways.
    with pytest.raises(UserError, match=r"Parameter decoder/layers/encoder_decoder_attention/key \(1, 32, 2, 8\): "
                       r"dimension 2 \(size 2\) is not divisible by mesh axes \('tensor',\) \(4 devices\)"):
        partitioning.logical_shardings(_boxed_shapes(TINY), _mesh(1, 1, 4), partitioning.axis_rules("tp"))
    shardings = partitioning.logical_shardings(_boxed_shapes(TINY), _mesh(1, 1, 2), partitioning.axis_rules("tp"))
    assert shardings["encoder"]["layers"]["attention"]["key"].spec == PartitionSpec(None, None, "tensor", None)


def test_sharding_table_shows_bytes_per_device():
    boxed = _boxed_shapes(TINY)
    shardings = partitioning.logical_shardings(boxed, _mesh(1, 4, 2), partitioning.axis_rules("fsdp+tp"))
    rows = {r["name"]: r for r in partitioning.sharding_table(boxed, shardings)}
    wi_0 = rows["encoder/layers/mlp/wi_0"]
    assert wi_0["shape"] == (1, 32, 48) and wi_0["logical_axes"] == ("layers", "embed", "mlp")
    assert wi_0["bytes_per_device"] == 1 * 8 * 24 * 4
