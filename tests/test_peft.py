"""Freezing, LoRA and weight quantization on the tiny model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import peft, trainer
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)


@pytest.fixture(scope="module")
def model_params_batch():
    model = Model(TINY)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), model.input_shapes(4, {"inputs": 10, "targets": 6}))["params"])
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 64, (4, 6)).astype(np.int32)
    batch = {"encoder_input_tokens": rng.integers(2, 64, (4, 10)).astype(np.int32), "decoder_target_tokens": tgt,
             "decoder_input_tokens": np.concatenate([np.zeros((4, 1), np.int32), tgt[:, :-1]], 1)}
    return model, params, batch


def test_frozen_parameters_do_not_change(model_params_batch):
    model, params, batch = model_params_batch
    labels = peft.trainable_labels(params, trainable=[r"^decoder/"], frozen=[r"norm"])
    tx = optax.multi_transform({"train": optax.adamw(1e-2), "freeze": optax.set_to_zero()}, labels)
    step = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(1e-2), loss_config=trainer.LossConfig(),
                                           use_dropout=False))
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    for _ in range(3):
        state, _ = step(state, batch, jax.random.PRNGKey(0))
    names = jax.tree_util.tree_leaves(peft.param_names(params))
    for name, before, after, label in zip(names, jax.tree_util.tree_leaves(params),
                                          jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(labels),
                                          strict=True):
        if label == "freeze":
            np.testing.assert_array_equal(before, after, err_msg=name)
        else:
            assert name.startswith("decoder/") and "norm" not in name and not np.array_equal(before, after), name
    n_decoder = sum(p.size for n, p in zip(names, jax.tree_util.tree_leaves(params), strict=True)
                    if n.startswith("decoder/") and "norm" not in n)
    assert peft.count_trainable(params, labels) == n_decoder


def test_nothing_trainable_is_an_error(model_params_batch):
    _, params, _ = model_params_batch
    with pytest.raises(UserError, match="No parameter is trainable"):
        peft.trainable_labels(params, trainable=[r"^nonexistent"])


def test_lora_with_zero_b_equals_the_base_model(model_params_batch):
    model, params, batch = model_params_batch
    lora = peft.init_lora(jax.random.PRNGKey(1), params, patterns=[r"attention/(query|value)$"], rank=4)
    assert sorted(lora) == ["decoder/layers/encoder_decoder_attention/query",
                            "decoder/layers/encoder_decoder_attention/value", "decoder/layers/self_attention/query",
                            "decoder/layers/self_attention/value", "encoder/layers/attention/query",
                            "encoder/layers/attention/value"]
    merged = peft.merge_lora(params, lora, alpha=8, rank=4)
    np.testing.assert_array_equal(model.logits(merged, batch), model.logits(params, batch))


def test_lora_delta_of_a_scanned_attention_kernel(model_params_batch):
    _, params, _ = model_params_batch
    lora = peft.init_lora(jax.random.PRNGKey(1), params, patterns=[r"encoder/layers/attention/(query|out)$"], rank=3)
    q, o = lora["encoder/layers/attention/query"], lora["encoder/layers/attention/out"]
    assert q["a"].shape == (2, 32, 3) and q["b"].shape == (2, 3, 2, 8)  # [layers, embed, r], [layers, r, heads, kv]
    assert o["a"].shape == (2, 2, 8, 3) and o["b"].shape == (2, 3, 32)  # [layers, heads, kv, r], [layers, r, embed]
    rng = np.random.default_rng(0)
    q = {"a": q["a"], "b": jnp.asarray(rng.normal(size=q["b"].shape), jnp.float32)}
    delta = peft.lora_delta(q, num_layer_dims=1, alpha=6, rank=3)
    expected = 2.0 * np.einsum("ler,lrhk->lehk", q["a"], q["b"])
    np.testing.assert_allclose(delta, expected, rtol=1e-5)


def test_lora_training_updates_only_the_factors_and_lowers_the_loss(model_params_batch):
    model, params, batch = model_params_batch
    lora = peft.init_lora(jax.random.PRNGKey(1), params, patterns=[r"(query|value|wi_0)$"], rank=4)
    loss = jax.jit(lambda lo: model.loss_sums(peft.merge_lora(params, lo, alpha=8, rank=4), batch)[0] / 24)
    tx = optax.adam(3e-2)
    opt_state = tx.init(lora)
    first = float(loss(lora))
    for _ in range(20):
        grads = jax.grad(loss)(lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
    assert float(loss(lora)) < first - 0.2


def test_lora_pattern_errors_are_clear(model_params_batch):
    _, params, _ = model_params_batch
    with pytest.raises(UserError, match="No parameter matches"):
        peft.init_lora(jax.random.PRNGKey(0), params, patterns=["nope"], rank=2)
    with pytest.raises(UserError, match="not a dense kernel"):
        peft.init_lora(jax.random.PRNGKey(0), params, patterns=["pre_mlp_layer_norm/scale"], rank=2)


@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_quantization_round_trip_is_within_half_a_step(bits):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 96, 40)) * jnp.linspace(0.1, 3.0, 40)
    # Blocks run along the last dimension: 40 = 16 + 16 + 8, the last block zero-padded.
    q = peft.quantize_tensor(x, bits=bits, block_size=16)
    assert q.codes.shape == (2, 96, 3, 16) and q.scale.shape == (2, 96, 3, 1)
    deq = peft.dequantize_tensor(q)
    assert deq.shape == x.shape
    blocks = np.pad(np.abs(np.asarray(x)), [(0, 0), (0, 0), (0, 8)]).reshape(2, 96, 3, 16)
    half_step = np.repeat(blocks.max(axis=-1) / (2 ** (bits - 1) - 1) / 2, 16, axis=-1)[..., :40]
    assert np.all(np.abs(np.asarray(deq) - np.asarray(x)) <= half_step * (1 + 1e-5))
    assert q.codes.dtype == jnp.int8 and int(jnp.abs(q.codes).max()) == 2 ** (bits - 1) - 1
    # A last dimension shorter than the block is one block, unpadded.
    assert peft.quantize_tensor(x, bits=bits, block_size=64).codes.shape == (2, 96, 1, 40)


def test_quantizing_the_model_saves_memory_and_keeps_its_outputs(model_params_batch):
    model, params, batch = model_params_batch
    base = np.asarray(model.logits(params, batch))
    # Bounds from a measurement on this random model (int8: 2.1% max logit error, 23 of 24 argmaxes
    # kept; int4: 29%, two thirds kept); trained weights quantize better. The per-element
    # guarantee is the half-step test above. Its last dimensions (8, 32, 48) are shorter than a
    # block of 64, so each carries its own scale: more bytes than a real model's (below).
    for bits, max_ratio, max_rel_err, min_argmax_kept in ((8, 0.33, 0.05, 0.95), (4, 0.2, 0.6, 0.5)):
        q = peft.quantize(params, bits=bits, block_size=64, min_size=1024)
        assert peft.nbytes(q) < max_ratio * peft.nbytes(params)
        logits = np.asarray(model.logits(peft.dequantize(q), batch))
        assert np.abs(logits - base).max() / np.abs(base).max() < max_rel_err
        assert (logits.argmax(-1) == base.argmax(-1)).mean() >= min_argmax_kept
    # A T5-small-sized kernel: codes at bits/8 bytes plus a float32 scale per 64 values.
    kernel = jnp.ones((512, 1024))
    for bits in (8, 4):
        packed = peft.quantize_tensor(kernel, bits=bits, block_size=64).nbytes()
        assert packed == 512 * 1024 * bits // 8 + 512 * 16 * 4  # int8: 26.6% of float32, int4: 14.1%
    with pytest.raises(UserError, match="4 or 8 bits"):
        peft.quantize_tensor(jnp.ones(8), bits=3, block_size=4)
