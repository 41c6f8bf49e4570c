"""Model behaviour researchers rely on: buckets, packing isolation, causality, axes, scan/remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.model.config import TransformerConfig
from t5lite.model.layers import relative_position_bucket
from t5lite.model.models import Model

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)


def _init(config, shapes):
    model = Model(config)
    boxed = model.init(jax.random.PRNGKey(0), shapes)["params"]
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

@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_every_parameter_has_one_logical_axis_per_dim(architecture):
    cfg = dataclasses.replace(TINY, architecture=architecture)
    model = Model(cfg)
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


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="remat_policy"):
        TransformerConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="architecture"):
        TransformerConfig(architecture="rnn")
    with pytest.raises(ValueError, match="dtype"):
        TransformerConfig(dtype="float33")
