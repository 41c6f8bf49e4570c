"""Model behaviour researchers rely on: buckets, packing isolation, causality, axes, scan/remat."""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import gin_cli, trainer
from t5lite.errors import UserError
from t5lite.model import flops
from t5lite.model.config import TransformerConfig
from t5lite.model.layers import apply_rotary, relative_position_bucket, rotary_embedding, segment_positions
from t5lite.model.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)
# The Llama family: rotary positions, grouped-query attention (4 query heads, 2 key/value heads), SwiGLU.
LLAMA = dataclasses.replace(TINY, architecture="decoder_only", num_heads=4, num_kv_heads=2, position_encoding="rope",
                            mlp_activation="silu", layer_norm_epsilon=1e-5)


def _init(config, shapes):
    model = Model(config)
    boxed = model.init(jax.random.PRNGKey(0), shapes)["params"]
    return model, boxed, nn.unbox(boxed)


@functools.cache
def _llama():
    """(model, boxed params, params) of LLAMA for [2, 10] tokens, initialised once for the module."""
    model = Model(LLAMA)
    boxed = jax.jit(lambda rng: model.init(rng, {"decoder_input_tokens": (2, 10)}))(jax.random.PRNGKey(0))["params"]
    return model, boxed, nn.unbox(boxed)


# --- Relative position buckets (hand-computed from T5's formula) ------------------------------------

def test_bidirectional_buckets_match_hand_computed_values():
    # 32 buckets bidirectional -> 16 per direction, 8 exact; max_distance 128.
    # n = -(k - q). Keys before the query (rel < 0, n > 0): buckets 0..15; keys after: +16.
    rel = np.array([0, -1, -7, -8, -12, -16, -32, -64, -127, -1000, 1, 7, 8, 20, 200])
    # Large branch: 8 + int(log(n/8) / log(16) * 8): n=8 -> 8, 12 -> 8 + int(1.169) = 9,
    # 16 -> 8 + 2 = 10, 32 -> 12, 64 -> 14, 127 -> 8 + int(7.97) = 15, 1000 -> min(.., 15).
    expected = [0, 1, 7, 8, 9, 10, 12, 14, 15, 15, 17, 23, 24, 16 + 8 + 2, 31]
    got = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, expected)


def test_causal_buckets_match_hand_computed_values():
    # Causal: 32 buckets, 16 exact; future keys (rel > 0) all land in bucket 0.
    rel = np.array([0, -1, -15, -16, -24, -32, -64, -127, -500, 3])
    # Large: 16 + int(log(n/16) / log(8) * 16): 16 -> 16, 24 -> 16 + int(3.12) = 19,
    # 32 -> 16 + 5 = 21 (5.33), 64 -> 16 + 10 = 26 (10.67), 127 -> 16 + 15 = 31 (15.94), 500 -> 31.
    expected = [0, 1, 15, 16, 19, 21, 26, 31, 31, 0]
    got = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(got, expected)


# --- Logical axes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only", "llama"])
def test_every_parameter_has_one_logical_axis_per_dim(architecture):
    if architecture == "llama":  # key/value heads are "heads" too: a tensor-parallel mesh splits them alike
        _, boxed, _ = _llama()
    else:
        model = Model(dataclasses.replace(TINY, architecture=architecture))
        boxed = model.init(jax.random.PRNGKey(0), model.input_shapes(2, {"inputs": 8, "targets": 8}))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    allowed = {"layers", "embed", "mlp", "heads", "kv", "vocab", "relpos_buckets"}
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= allowed
        assert leaf.value.dtype == jnp.float32


# --- Packing isolation ------------------------------------------------------------------------------

def _packed_encdec_batch(rng, seg2_tokens=None):
    """Two examples packed in each row: segment 1 then segment 2, then padding."""
    enc = np.zeros((2, 12), np.int32)
    dec_tgt = np.zeros((2, 8), np.int32)
    enc_seg = np.zeros((2, 12), np.int32)
    dec_seg = np.zeros((2, 8), np.int32)
    enc[:, :5] = rng.integers(2, 64, (2, 5))
    enc[:, 5:10] = seg2_tokens if seg2_tokens is not None else rng.integers(2, 64, (2, 5))
    enc_seg[:, :5], enc_seg[:, 5:10] = 1, 2
    dec_tgt[:, :3] = rng.integers(2, 64, (2, 3))
    dec_tgt[:, 3:7] = rng.integers(2, 64, (2, 4))
    dec_seg[:, :3], dec_seg[:, 3:7] = 1, 2
    # Decoder inputs: targets shifted right within each segment (BOS = 0 at each segment start).
    dec_in = np.zeros_like(dec_tgt)
    dec_in[:, 1:3] = dec_tgt[:, 0:2]
    dec_in[:, 4:7] = dec_tgt[:, 3:6]
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": dec_tgt,
            "encoder_segment_ids": enc_seg, "decoder_segment_ids": dec_seg,
            "decoder_loss_weights": (dec_seg > 0).astype(np.int32)}


def test_packed_segments_do_not_see_each_other_encoder_decoder():
    model, _, params = _init(TINY, {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 8)})
    batch = _packed_encdec_batch(np.random.default_rng(0))
    other = dict(batch)
    other["encoder_input_tokens"] = batch["encoder_input_tokens"].copy()
    other["encoder_input_tokens"][:, 5:10] = np.random.default_rng(1).integers(2, 64, (2, 5))
    logits_a = model.logits(params, batch)
    logits_b = model.logits(params, other)
    # Segment 1's decoder outputs are unchanged; segment 2's change (so the test can fail).
    np.testing.assert_allclose(logits_a[:, :3], logits_b[:, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits_a[:, 3:7], logits_b[:, 3:7], atol=1e-3)


def test_packed_segment_equals_the_same_example_alone():
    """Positions restart per segment: segment 2 packed at an offset gives the logits it gets alone."""
    model, _, params = _init(TINY, {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 8)})
    batch = _packed_encdec_batch(np.random.default_rng(0))
    alone = {k: np.zeros_like(v) for k, v in batch.items()}
    alone["encoder_input_tokens"][:, :5] = batch["encoder_input_tokens"][:, 5:10]
    alone["encoder_segment_ids"][:, :5] = 1
    alone["decoder_input_tokens"][:, :4] = batch["decoder_input_tokens"][:, 3:7]
    alone["decoder_target_tokens"][:, :4] = batch["decoder_target_tokens"][:, 3:7]
    alone["decoder_segment_ids"][:, :4] = 1
    np.testing.assert_allclose(model.logits(params, batch)[:, 3:7], model.logits(params, alone)[:, :4],
                               rtol=1e-5, atol=1e-5)


def test_packed_segments_do_not_see_each_other_decoder_only():
    cfg = dataclasses.replace(TINY, architecture="decoder_only")
    model, _, params = _init(cfg, {"decoder_input_tokens": (2, 10)})
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 64, (2, 10)).astype(np.int32)
    seg = np.array([[1] * 4 + [2] * 6] * 2, np.int32)
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens, "decoder_segment_ids": seg}
    changed = dict(batch, decoder_input_tokens=tokens.copy())
    changed["decoder_input_tokens"][:, 6:] = rng.integers(2, 64, (2, 4))
    a, b = model.logits(params, batch), model.logits(params, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)  # seg 1 and seg 2's past
    assert not np.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_packed_segment_equals_the_same_example_alone_with_rope():
    """Rotary positions restart per packed segment, as the relative position bias does."""
    model, _, params = _llama()
    logits = jax.jit(model.logits)
    tokens = np.random.default_rng(0).integers(2, 64, (2, 10)).astype(np.int32)
    seg = np.array([[1] * 4 + [2] * 6] * 2, np.int32)
    packed = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens, "decoder_segment_ids": seg}
    alone_tokens = np.zeros_like(tokens)
    alone_tokens[:, :6] = tokens[:, 4:]
    alone = {"decoder_input_tokens": alone_tokens, "decoder_target_tokens": alone_tokens,
             "decoder_segment_ids": (np.arange(10) < 6)[None].repeat(2, 0).astype(np.int32)}
    np.testing.assert_allclose(logits(params, packed)[:, 4:], logits(params, alone)[:, :6], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(segment_positions(jnp.asarray(seg))[0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5])


def test_rotary_embedding_rotates_pairs_of_half_dims_by_position_times_frequency():
    # head_dim 4, base 100: pair (x0, x2) turns by p * 100**0, pair (x1, x3) by p * 100**-0.5 = p / 10.
    cos, sin = rotary_embedding(jnp.array([[0, 1, 3]]), 4, 100.0)
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4).repeat(3, axis=1)
    rotated = np.asarray(apply_rotary(x, cos, sin))[0, :, 0]
    for p, row in zip([0, 1, 3], rotated, strict=True):
        for i, j, angle in ((0, 2, p), (1, 3, p / 10)):
            c, s = np.cos(angle), np.sin(angle)
            x_i, x_j = (1.0, 3.0) if i == 0 else (2.0, 4.0)
            np.testing.assert_allclose([row[i], row[j]], [x_i * c - x_j * s, x_j * c + x_i * s], rtol=1e-6, atol=1e-6)


# --- Causality and prefix LM -------------------------------------------------------------------------

def test_decoder_is_causal_and_prefix_lm_is_bidirectional_on_the_prefix():
    cfg = dataclasses.replace(TINY, architecture="decoder_only")
    model, _, params = _init(cfg, {"decoder_input_tokens": (1, 8)})
    tokens = np.arange(2, 10, dtype=np.int32)[None]
    seg = np.ones((1, 8), np.int32)
    later = tokens.copy()
    later[0, 2] = 50  # change position 2
    base = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens, "decoder_segment_ids": seg}
    changed = dict(base, decoder_input_tokens=later)
    a, b = model.logits(params, base), model.logits(params, changed)
    np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-6, atol=1e-6)  # causal: past unaffected
    # Prefix LM with a 4-token prefix: position 0 now sees position 2.
    prefix = np.array([[1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
    pa = model.logits(params, dict(base, decoder_causal_attention=prefix))
    pb = model.logits(params, dict(changed, decoder_causal_attention=prefix))
    assert not np.allclose(pa[:, :2], pb[:, :2], atol=1e-4)


# --- Scan / unrolled / remat equivalence ----------------------------------------------------------------

def _stack_unrolled(tree):
    """Turns layers_0..layers_{n-1} subtrees into one 'layers' subtree with a leading axis."""
    if not isinstance(tree, dict):
        return tree
    layer_keys = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    out = {k: _stack_unrolled(v) for k, v in tree.items() if not k.startswith("layers_")}
    if layer_keys:
        out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[tree[k] for k in layer_keys])
    return out


def test_scan_unrolled_and_remat_give_the_same_loss_and_grads():
    shapes = {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 8)}
    unrolled = dataclasses.replace(TINY, scan_layers=False)
    model_u, _, params_u = _init(unrolled, shapes)
    batch = _packed_encdec_batch(np.random.default_rng(0))
    params_s = _stack_unrolled(params_u)

    def loss_and_grads(model, params):
        return jax.value_and_grad(lambda p: model.loss_sums(p, batch)[0])(params)

    loss_u, grads_u = loss_and_grads(model_u, params_u)
    for remat in ("none", "minimal", "full"):
        model_s = Model(dataclasses.replace(TINY, remat_policy=remat))
        loss_s, grads_s = loss_and_grads(model_s, params_s)
        np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
        expected = jax.tree_util.tree_leaves(_stack_unrolled(grads_u))
        for gs, gu in zip(jax.tree_util.tree_leaves(grads_s), expected, strict=True):
            np.testing.assert_allclose(gs, gu, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    model, _, params = _init(cfg, {"encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 8)})
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    logits = model.logits(params, _packed_encdec_batch(np.random.default_rng(0)))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_auto_dtype_is_float32_on_cpu():
    assert jax.default_backend() == "cpu"
    assert TransformerConfig().compute_dtype == jnp.float32
    assert TransformerConfig(dtype="bfloat16").compute_dtype == jnp.bfloat16


def test_llama_tiny_trains():
    """gin/models/llama_tiny.gin (on gin/base.gin, its 8192 ids) learns a fixed batch in a few AdamW steps."""
    gin_cli.parse_gin([os.path.join(REPO, "gin", f) for f in ("base.gin", "models/llama_tiny.gin")], [])
    config = TransformerConfig()
    assert (config.position_encoding, config.kv_heads, config.mlp_activation) == ("rope", 2, "silu")
    model = Model(config)
    shapes = model.input_shapes(4, {"targets": 32})
    params = nn.unbox(jax.jit(lambda rng: model.init(rng, shapes))(jax.random.PRNGKey(0))["params"])
    targets = np.random.default_rng(0).integers(2, 8000, (4, 32)).astype(np.int32)
    batch = {"decoder_target_tokens": targets, "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1]}
    tx = optax.adamw(3e-3)
    step = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(3e-3), loss_config=trainer.LossConfig(),
                                           use_dropout=False))
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    assert losses[0] > 8.5 and losses[-1] < losses[0] - 1.0, losses  # from about log(8192) = 9.0


def test_llama_flops_count_grouped_key_value_projections_against_xla():
    config = dataclasses.replace(LLAMA, scan_layers=False)  # XLA counts a scanned body once
    model = Model(config)
    shapes = {"decoder_input_tokens": (2, 24)}
    params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), shapes))["params"])
    batch = {"decoder_input_tokens": jax.ShapeDtypeStruct((2, 24), np.int32),
             "decoder_target_tokens": jax.ShapeDtypeStruct((2, 24), np.int32)}
    cost = jax.jit(model.logits).lower(params, batch).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    analytic = flops.forward_flops(config, 2, 0, 24)
    # k and v project onto 2 of 4 heads: per layer, 2 FLOPs x 32 embed x 16 fewer columns x (k, v) x 48 tokens.
    mha = flops.forward_flops(dataclasses.replace(config, num_kv_heads=None), 2, 0, 24)
    assert mha.decoder_self_attention - analytic.decoder_self_attention == 2 * (2 * 32 * 16 * 2 * 48)
    assert analytic.forward <= xla and xla / analytic.forward < 1.15, (analytic.forward, xla)


def test_llama_options_that_do_not_fit_are_named():
    with pytest.raises(UserError, match="num_kv_heads=3 must divide num_heads=4"):
        dataclasses.replace(LLAMA, num_kv_heads=3)
    with pytest.raises(UserError, match="decoder-only"):
        dataclasses.replace(LLAMA, architecture="encoder_decoder")
    with pytest.raises(UserError, match="decoder-only"):
        TransformerConfig(num_kv_heads=1)
    with pytest.raises(UserError, match="even head_dim"):
        dataclasses.replace(LLAMA, head_dim=7)
    with pytest.raises(UserError, match="position_encoding"):
        dataclasses.replace(LLAMA, position_encoding="alibi")
    with pytest.raises(UserError, match="mlp_activation"):
        dataclasses.replace(LLAMA, mlp_activation="relu")
    with pytest.raises(UserError, match="layer_norm_epsilon"):
        dataclasses.replace(LLAMA, layer_norm_epsilon=0.0)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="remat_policy"):
        TransformerConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="architecture"):
        TransformerConfig(architecture="rnn")
    with pytest.raises(ValueError, match="dtype"):
        TransformerConfig(dtype="float33")
