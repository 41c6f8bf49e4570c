"""Loss normalisation and gradient accumulation: the arithmetic every run depends on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import partitioning, trainer
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model, cross_entropy_with_z_loss

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=1, num_decoder_layers=1)


def _batch(seed: int, batch: int = 4):
    """Rows with very different numbers of real target tokens (so per-row means would differ)."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, 64, (batch, 10)).astype(np.int32)
    tgt = rng.integers(2, 64, (batch, 6)).astype(np.int32)
    real = np.array([6, 1, 3, 2][:batch])
    weights = (np.arange(6)[None] < real[:, None]).astype(np.int32)
    tgt = tgt * weights
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": weights}


@pytest.fixture(scope="module")
def model_and_params():
    model = Model(TINY)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), model.input_shapes(4, {"inputs": 10, "targets": 6}))["params"])
    return model, params


def test_loss_is_mean_over_real_target_tokens_of_the_whole_batch(model_and_params):
    model, params = model_and_params
    batch = _batch(0)
    step = trainer.make_train_step(model, optax.sgd(0.0), optax.constant_schedule(0.0),
                                   loss_config=trainer.LossConfig(z_loss=0.0), use_dropout=False)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.sgd(0.0).init(params))
    _, metrics = step(state, batch, jax.random.PRNGKey(0))

    logits = np.asarray(model.logits(params, batch), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    w = batch["decoder_loss_weights"]
    np.testing.assert_allclose(metrics["loss"], (nll * w).sum() / w.sum(), rtol=1e-5)
    assert float(metrics["num_tokens"]) == w.sum() == 12
    # Not the mean of per-row means (which weights the 1-token row like the 6-token row).
    assert not np.isclose(float(metrics["loss"]), np.mean((nll * w).sum(1) / w.sum(1)), rtol=1e-4)


def test_padding_targets_do_not_change_the_loss(model_and_params):
    model, params = model_and_params
    batch = _batch(0)
    noisy = dict(batch, decoder_target_tokens=np.where(batch["decoder_loss_weights"] > 0,
                                                       batch["decoder_target_tokens"], 7))
    a = model.loss_sums(params, batch)[0]
    b = model.loss_sums(params, noisy)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_z_loss_and_label_smoothing_terms():
    logits = jnp.array([[[2.0, 0.5, -1.0, 0.0]]])
    targets = jnp.array([[0]])
    log_z = np.log(np.exp(np.array([2.0, 0.5, -1.0, 0.0])).sum())
    loss, z_term, nll = cross_entropy_with_z_loss(logits, targets, z_loss=1e-2)
    np.testing.assert_allclose(nll, log_z - 2.0, rtol=1e-6)
    np.testing.assert_allclose(z_term, 1e-2 * log_z**2, rtol=1e-6)
    np.testing.assert_allclose(loss, nll + z_term, rtol=1e-6)
    # Label smoothing 0.1 over 4 classes: soft target [0.9, 1/30, 1/30, 1/30], minus its entropy.
    smoothed, _, _ = cross_entropy_with_z_loss(logits, targets, label_smoothing=0.1)
    soft = np.array([0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3])
    logp = np.array([2.0, 0.5, -1.0, 0.0]) - log_z
    np.testing.assert_allclose(smoothed, -(soft * logp).sum() + (soft * np.log(soft)).sum(), rtol=1e-5)


def test_accumulated_gradient_equals_the_one_big_batch_gradient(model_and_params):
    model, params = model_and_params
    batch = _batch(1)
    grads = {}
    for n in (1, 2, 4):
        g, sums = jax.jit(lambda p, b, n=n: trainer.grad_and_metric_sums(
            model, p, b, None, trainer.LossConfig(), num_microbatches=n))(params, batch)
        grads[n] = jax.tree_util.tree_map(lambda x, sums=sums: x / sums["num_tokens"], g)
    for n in (2, 4):
        for a, b in zip(jax.tree_util.tree_leaves(grads[1]), jax.tree_util.tree_leaves(grads[n]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# SGD only: Adam's and Adafactor's first updates are ~lr * sign(g), so an element whose gradient
# is ~0 flips on float round-off; for them the gradients (compared above) are the meaningful check.
@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9)], ids=["sgd", "momentum"])
def test_gradient_accumulation_update_equals_one_big_batch_update(model_and_params, optimizer):
    model, params = model_and_params
    batch = _batch(1)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    results = []
    for n in (1, 2, 4):
        step = jax.jit(trainer.make_train_step(model, optimizer, optax.constant_schedule(0.1),
                                               loss_config=trainer.LossConfig(), num_microbatches=n,
                                               use_dropout=False))
        results.append(step(state, batch, jax.random.PRNGKey(0)))
    (one, m1), *others = results
    for other, m in others:
        np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], m1["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(other.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_keeps_params_and_optimizer_state(model_and_params):
    model, params = model_and_params
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = trainer.TrainState(step=jnp.ones((), jnp.int32), params=params, opt_state=optimizer.init(params))
    step = jax.jit(trainer.make_train_step(model, optimizer, optax.constant_schedule(0.1),
                                           loss_config=trainer.LossConfig(), use_dropout=False))
    poisoned = _batch(1)
    poisoned["encoder_input_tokens"][0, 0] = 1000  # outside the 64-row embedding: jnp.take gives NaN

    skipped, metrics = step(state, poisoned, jax.random.PRNGKey(0))
    assert not np.isfinite(metrics["loss"]) and metrics["update_skipped"] == 1.0
    assert int(skipped.step) == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, (skipped.params, skipped.opt_state),
                           (state.params, state.opt_state))

    applied, metrics = step(state, _batch(1), jax.random.PRNGKey(0))
    assert metrics["update_skipped"] == 0.0
    assert not np.array_equal(applied.params["token_embedder"]["embedding"], params["token_embedder"]["embedding"])


def test_microbatches_must_divide_the_batch(model_and_params):
    model, params = model_and_params
    step = trainer.make_train_step(model, optax.sgd(0.1), optax.constant_schedule(0.1),
                                   loss_config=trainer.LossConfig(), num_microbatches=3, use_dropout=False)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
        step(state, _batch(0), jax.random.PRNGKey(0))


def test_sharded_init_places_params_by_logical_rules():
    model = Model(TINY)
    mesh = partitioning.make_mesh()
    init = trainer.make_sharded_init(model, optax.adamw(1e-3), model.input_shapes(4, {"inputs": 10, "targets": 6}),
                                     mesh, partitioning.axis_rules("fsdp"))
    state = init.init_fn(jax.random.PRNGKey(0))
    emb = state.params["token_embedder"]["embedding"]
    # Rules resolve in order: "embed" takes fsdp first, so vocab stays unsharded here.
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    mu = state.opt_state[0].mu["token_embedder"]["embedding"]
    assert mu.sharding == emb.sharding  # Adam moments follow their parameter


def test_cpu_compiler_options_change_the_train_step_only_by_rounding(model_and_params):
    """jit_train_step compiles with trainer.CPU_TRAIN_COMPILER_OPTIONS on CPU (YNNPACK fuses each
    matmul with its producers): the update must equal the one XLA's default compile gives."""
    model, _ = model_and_params
    tx = optax.adamw(1e-2)
    mesh, rules = partitioning.make_mesh(), partitioning.axis_rules("dp")
    assert trainer.train_compiler_options(mesh) == trainer.CPU_TRAIN_COMPILER_OPTIONS
    init = trainer.make_sharded_init(model, tx, model.input_shapes(4, {"inputs": 10, "targets": 6}), mesh, rules)
    batch = partitioning.shard_batch(_batch(1), mesh)
    fused = trainer.jit_train_step(model, tx, optax.constant_schedule(1e-2), init, mesh, rules,
                                   loss_config=trainer.LossConfig(), use_dropout=False)
    default = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(1e-2),
                                              loss_config=trainer.LossConfig(), use_dropout=False))
    key = jax.random.PRNGKey(0)
    (a, ma), (b, mb) = fused(init.init_fn(key), batch, key), default(init.init_fn(key), batch, key)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
