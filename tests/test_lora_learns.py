"""LoRA beside params trained in full (lora_train_in_full), layerwise dequantization of a quantized base,
and the NF4 code book, on the tiny model."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_finetune

from t5lite import adaptation as adaptation_lib
from t5lite import checkpoints, finetune, partitioning, peft, trainer
from t5lite.errors import UserError
from t5lite.model import weights
from t5lite.model.models import Model

# The tiny model and batch of tests/test_finetune.py.
TINY, LENGTHS, model_and_batch = test_finetune.TINY, test_finetune.LENGTHS, test_finetune.model_and_batch

# As gin/runs/finetune_lora.gin: the final norms (and every other norm scale) and the output layer in full.
IN_FULL = (r"norm/scale$", r"logits_dense$")
LORA = adaptation_lib.LoraAdaptation(patterns=(r"(query|value|wi_0)$",), rank=4, alpha=8.0, train_in_full=IN_FULL)

# NormalFloat4 as bitsandbytes defines it: bitsandbytes/functional.py get_4bit_type("nf4") (the same
# table as csrc/kernels.cu's nf4 dequantization), QLoRA (Dettmers et al. 2023, arXiv:2305.14314).
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


# --- NF4 ---------------------------------------------------------------------------------------------

def test_nf4_code_book_is_the_published_table():
    np.testing.assert_allclose(weights.NF4_VALUES, np.array(NF4_PUBLISHED, np.float32), rtol=1e-6, atol=1e-7)
    assert weights.NF4_VALUES[7] == 0.0 and weights.NF4_VALUES[0] == -1.0 and weights.NF4_VALUES[-1] == 1.0


def test_nf4_round_trip_beats_int4_on_gaussian_weights():
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 200))  # 200 = 3 blocks of 64 and a padded one of 8
    errors = {}
    for codebook in ("int", "nf4"):
        q = peft.quantize_tensor(x, bits=4, block_size=64, codebook=codebook)
        assert q.codes.shape == (96, 4, 64) and q.codes.dtype == jnp.int8
        deq = peft.dequantize_tensor(q)
        assert deq.shape == x.shape
        errors[codebook] = float(jnp.mean(jnp.square(deq - x)))
    assert errors["nf4"] < 0.85 * errors["int"], errors
    # Each value is the nearest code book value times its block's absmax.
    q = peft.quantize_tensor(x, bits=4, block_size=64, codebook="nf4")
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) == 15
    block = np.asarray(x[0, :64]) / float(np.abs(np.asarray(x[0, :64])).max())
    nearest = np.abs(block[:, None] - weights.NF4_VALUES[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(np.asarray(q.codes[0, 0]), nearest)
    with pytest.raises(UserError, match="'nf4' \\(4 bits\\)"):
        peft.quantize_tensor(x, bits=8, block_size=64, codebook="nf4")


# --- Layerwise dequantization --------------------------------------------------------------------------

def _float_shapes_outside_scans(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of the float arrays a jaxpr makes outside scan bodies (nested calls included)."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            continue
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)}
        for sub in eqn.params.values():
            sub = getattr(sub, "jaxpr", sub)
            if hasattr(sub, "eqns"):
                shapes |= _float_shapes_outside_scans(sub)
    return shapes


@pytest.mark.parametrize("bits,codebook", [(8, "int"), (4, "int"), (4, "nf4")])
def test_layerwise_dequantization_gives_the_whole_model_loss_and_gradients(model_and_batch, bits, codebook):
    model, batch = model_and_batch
    lora = adaptation_lib.LoraAdaptation(patterns=(r"(query|value|wi_0|logits_dense)$",), rank=4, alpha=8.0,
                                         base_bits=bits, block_size=16, min_quantized_size=256,
                                         train_in_full=(r"norm/scale$",), codebook=codebook)
    params = model.init(jax.random.PRNGKey(0), model.input_shapes(4, LENGTHS))["params"]
    state = lora.adapt(jax.tree_util.tree_map(lambda p: p.unbox(), params, is_leaf=lambda p: hasattr(p, "unbox")),
                       jax.random.PRNGKey(1))
    # b != 0 so the factors change the kernels; the norms moved off their starting ones.
    trainable = jax.tree_util.tree_map(lambda x: x + 0.05, lora.trainable_params(state))

    def loss(to_network_params):
        return lambda t: model.loss_sums(to_network_params(state, t), batch)[0]

    whole, layerwise = loss(lora.model_params), loss(lora.step_params)  # the reference, what the step runs
    loss_whole, grads_whole = jax.jit(jax.value_and_grad(whole))(trainable)
    loss_layerwise, grads_layerwise = jax.jit(jax.value_and_grad(layerwise))(trainable)
    assert float(loss_layerwise) == pytest.approx(float(loss_whole), rel=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_whole))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale),
                           grads_whole, grads_layerwise)
    # The whole-model path makes every layer's float query kernel [layers, embed, heads, kv] at once;
    # the layerwise path only inside the scan, one layer at a time.
    stacked_query = (2, 32, 2, 8)
    assert stacked_query in _float_shapes_outside_scans(jax.make_jaxpr(jax.grad(whole))(trainable).jaxpr)
    assert stacked_query not in _float_shapes_outside_scans(jax.make_jaxpr(jax.grad(layerwise))(trainable).jaxpr)


# --- Params trained in full beside LoRA ----------------------------------------------------------------

def test_params_trained_in_full_are_float_beside_a_quantized_base():
    lora = adaptation_lib.make_adaptation(lora_patterns=[r"query$"], lora_train_in_full=list(IN_FULL), base_bits=4,
                                          quantize_codebook="nf4", quantize_min_size=256)
    model = Model(TINY)
    shapes = jax.eval_shape(lambda: lora.adapt(
        jax.tree_util.tree_map(lambda p: p.unbox(), model.init(jax.random.PRNGKey(0), model.input_shapes(4, LENGTHS))
                               ["params"], is_leaf=lambda p: hasattr(p, "unbox")), jax.random.PRNGKey(1)))
    assert shapes["full"]["decoder/logits_dense"].dtype == jnp.float32
    assert shapes["full"]["decoder/logits_dense"].shape == (32, 64)
    base_logits = shapes["base"]["decoder"]["logits_dense"]
    assert isinstance(base_logits, peft.QuantizedTensor) and base_logits.codebook == "nf4"
    assert sorted(shapes["full"]) == [
        "decoder/decoder_norm/scale", "decoder/layers/pre_cross_attention_layer_norm/scale",
        "decoder/layers/pre_mlp_layer_norm/scale", "decoder/layers/pre_self_attention_layer_norm/scale",
        "decoder/logits_dense", "encoder/encoder_norm/scale", "encoder/layers/pre_attention_layer_norm/scale",
        "encoder/layers/pre_mlp_layer_norm/scale"]


def test_train_in_full_errors_are_clear():
    with pytest.raises(UserError, match="needs|beside LoRA adapters"):
        adaptation_lib.make_adaptation(lora_train_in_full=[r"logits_dense$"])
    with pytest.raises(UserError, match="No parameter matches"):
        adaptation_lib.LoraAdaptation(patterns=(r"query$",), train_in_full=(r"nope",)).adapt(
            {"attention": {"query": jnp.zeros((8, 2, 4))}}, jax.random.PRNGKey(0))
    with pytest.raises(UserError, match="either with LoRA or in full"):
        adaptation_lib.LoraAdaptation(patterns=(r"query$",), train_in_full=(r"query",)).adapt(
            {"attention": {"query": jnp.zeros((8, 2, 4))}}, jax.random.PRNGKey(0))
    with pytest.raises(UserError, match="'nf4' \\(base_bits 4\\)"):
        adaptation_lib.make_adaptation(lora_patterns=["query$"], base_bits=8, quantize_codebook="nf4")


def _named(tree):
    return dict(zip(jax.tree_util.tree_leaves(peft.param_names(tree)), jax.tree_util.tree_leaves(tree), strict=True))


def test_params_trained_in_full_train_checkpoint_resume_and_export(model_and_batch, tmp_path):
    model, batch = model_and_batch
    tx = optax.adam(3e-2)
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    init = trainer.make_sharded_init(model, tx, model.input_shapes(4, LENGTHS), mesh, rules, LORA)
    step = trainer.jit_train_step(model, tx, optax.constant_schedule(0.0), init, mesh, rules,
                                  loss_config=trainer.LossConfig(), use_dropout=False, adaptation=LORA)
    state = init.init_fn(jax.random.PRNGKey(0))
    first = jax.tree_util.tree_map(np.asarray, state)  # the step donates its input state

    def run(state, steps):
        with jax.set_mesh(mesh):
            for _ in range(steps):
                state, _ = step(state, batch, jax.random.PRNGKey(1))
        return state

    state = run(state, 3)
    assert len(state.params["full"]) == 8 and LORA.num_trainable(state.params) == sum(
        x.size for x in jax.tree_util.tree_leaves((state.params["lora"], state.params["full"])))
    base_named = _named(first.params["base"])
    for name, value in state.params["full"].items():  # trained, starting from the base's values
        np.testing.assert_array_equal(first.params["full"][name], base_named[name])
        assert not np.array_equal(np.asarray(value), base_named[name]), name
    jax.tree_util.tree_map(np.testing.assert_array_equal, first.params["base"], jax.tree_util.tree_map(
        np.asarray, state.params["base"]))  # the base never changes

    # Save at step 3, restore, train 2 more steps: the same params as 2 more steps from the live state.
    run_dir = tmp_path / "run"
    saver = checkpoints.Checkpointer(str(run_dir / "checkpoints"), save_every=1, keep=None, async_save=False)
    saver.save(3, state, force=True)
    saver.wait()
    restored = saver.restore(3, init.abstract_state)
    saver.close()
    saved = jax.tree_util.tree_map(np.asarray, restored.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, state.params), saved)
    live = jax.tree_util.tree_map(np.asarray, run(state, 2).params)
    resumed = jax.tree_util.tree_map(np.asarray, run(restored, 2).params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, live, resumed)

    # The merged export (python -m t5lite.finetune) of the step-3 checkpoint: the params trained in full
    # as trained, the adapted kernels base + (alpha / rank) a b, everything else bitwise the base's.
    (run_dir / "config.gin").write_text(
        "import t5lite.adaptation\nimport t5lite.model.config\n"
        + "".join(f"TransformerConfig.{k} = {getattr(TINY, k)!r}\n" for k in (
            "vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers"))
        + f"make_adaptation.lora_patterns = {list(LORA.patterns)!r}\nmake_adaptation.lora_rank = 4\n"
        + f"make_adaptation.lora_alpha = 8.0\nmake_adaptation.lora_train_in_full = {list(IN_FULL)!r}\n")
    out = tmp_path / "merged"
    finetune.export_merged(str(run_dir), str(out), step=3)
    merged = _named(checkpoints.restore_params(os.path.join(out, "checkpoints"), 3,
                                               trainer.abstract_params(model, mesh, rules)))
    assert sorted(merged) == sorted(base_named)
    for name, value in merged.items():
        if name in saved["full"]:
            np.testing.assert_array_equal(value, saved["full"][name], err_msg=name)
        elif name in saved["lora"]:
            delta = peft.lora_delta(saved["lora"][name], num_layer_dims=1, alpha=8.0, rank=4)
            np.testing.assert_allclose(value, base_named[name] + delta, rtol=1e-6, atol=1e-7, err_msg=name)
            assert np.abs(np.asarray(delta)).max() > 0, name
        else:
            np.testing.assert_array_equal(value, base_named[name], err_msg=name)
