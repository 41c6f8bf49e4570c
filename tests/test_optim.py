"""Tests for t5lite.optim: schedule values, optimizer behaviour, clipping, weight decay, gin."""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import optim


def constant_lr(learning_rate: float) -> optax.Schedule:
    return optim.make_schedule(name="constant", learning_rate=learning_rate, warmup_steps=0)


def kernel_and_bias(seed: int) -> dict:
    """{"kernel": [128, 256], "bias": [256]}: the kernel is big enough for adafactor to factor."""
    kernel_key, bias_key = jax.random.split(jax.random.key(seed))
    return {
        "kernel": jax.random.normal(kernel_key, (128, 256)),
        "bias": jax.random.normal(bias_key, (256,)),
    }


# --- schedules --------------------------------------------------------------------------------


def schedule_values(schedule: optax.Schedule, steps: list[int]) -> list[float]:
    return [float(schedule(step)) for step in steps]


def test_rsqrt_is_t5_rsqrt_decay():
    schedule = optim.make_schedule(name="rsqrt", learning_rate=1.0, warmup_steps=100)
    np.testing.assert_allclose(
        schedule_values(schedule, [0, 1, 50, 100, 400, 10_000]),
        [0.1, 0.1, 0.1, 0.1, 0.05, 0.01],
        rtol=1e-6,
    )


def test_rsqrt_without_warmup_is_finite_at_step_0():
    schedule = optim.make_schedule(name="rsqrt", learning_rate=1.0, warmup_steps=0)
    np.testing.assert_allclose(schedule_values(schedule, [0, 1, 4]), [1.0, 1.0, 0.5], rtol=1e-6)


def test_constant_warms_up_linearly():
    schedule = optim.make_schedule(name="constant", learning_rate=0.5, warmup_steps=10)
    np.testing.assert_allclose(
        schedule_values(schedule, [0, 5, 10, 1000]), [0.0, 0.25, 0.5, 0.5], rtol=1e-6
    )


def test_constant_without_warmup_starts_at_learning_rate():
    # optax.warmup_constant_schedule(0, lr, 0) would stay at 0 forever.
    np.testing.assert_allclose(schedule_values(constant_lr(0.5), [0, 1000]), [0.5, 0.5])


def test_cosine_warms_up_then_decays_to_end():
    schedule = optim.make_schedule(
        name="cosine", learning_rate=1.0, warmup_steps=10, total_steps=110, end_learning_rate=0.1
    )
    # Midpoint of the decay (step 60): end + (peak - end) * (1 + cos(pi / 2)) / 2 = 0.55.
    np.testing.assert_allclose(
        schedule_values(schedule, [0, 5, 10, 60, 110, 500]),
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1],
        rtol=1e-5,
    )


def test_linear_warms_up_then_decays_to_end():
    schedule = optim.make_schedule(
        name="linear", learning_rate=1.0, warmup_steps=10, total_steps=110, end_learning_rate=0.0
    )
    np.testing.assert_allclose(
        schedule_values(schedule, [0, 5, 10, 35, 60, 110, 500]),
        [0.0, 0.5, 1.0, 0.75, 0.5, 0.0, 0.0],
        atol=1e-6,
    )


def test_step_halves_every_decay_steps_after_warmup():
    schedule = optim.make_schedule(
        name="step", learning_rate=1.0, warmup_steps=10, decay_rate=0.5, decay_steps=100
    )
    np.testing.assert_allclose(
        schedule_values(schedule, [5, 10, 109, 110, 209, 310]),
        [0.5, 1.0, 1.0, 0.5, 0.5, 0.125],
        rtol=1e-6,
    )


def test_exponential_decays_smoothly_after_warmup():
    schedule = optim.make_schedule(
        name="exponential", learning_rate=1.0, warmup_steps=10, decay_rate=0.5, decay_steps=100
    )
    np.testing.assert_allclose(
        schedule_values(schedule, [10, 60, 110, 310]),
        [1.0, 0.5**0.5, 0.5, 0.125],
        rtol=1e-6,
    )


def test_step_and_exponential_stop_at_end_learning_rate():
    for name in ("step", "exponential"):
        schedule = optim.make_schedule(
            name=name,
            learning_rate=1.0,
            warmup_steps=0,
            decay_rate=0.5,
            decay_steps=10,
            end_learning_rate=0.2,
        )
        np.testing.assert_allclose(schedule_values(schedule, [1000]), [0.2])


@pytest.mark.parametrize("name", optim.SCHEDULE_NAMES)
def test_schedules_give_same_values_under_jit_with_int32_steps(name):
    # optax calls the schedule inside jit with its int32 update count.
    schedule = optim.make_schedule(name=name, learning_rate=1.0, warmup_steps=10, total_steps=110)
    steps = [0, 7, 10, 60, 110, 300]
    jitted = jax.jit(schedule)
    np.testing.assert_allclose(
        [float(jitted(jnp.int32(step))) for step in steps],
        schedule_values(schedule, steps),
        rtol=1e-6,
    )


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as error:
        optim.make_schedule(name="triangle")
    for name in optim.SCHEDULE_NAMES:
        assert repr(name) in str(error.value)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_to_end_needs_total_steps(name):
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(name=name)
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(name=name, warmup_steps=100, total_steps=100)


# --- optimizers -------------------------------------------------------------------------------


def quadratic_loss(params: dict, target: dict) -> jax.Array:
    return 0.5 * sum(jnp.sum(jnp.square(params[k] - target[k])) for k in params)


@pytest.mark.parametrize(
    ("name", "learning_rate"), [("adafactor", 0.1), ("adamw", 0.1), ("sgd", 0.1)]
)
def test_optimizer_minimizes_quadratic(name, learning_rate):
    params, target = kernel_and_bias(0), kernel_and_bias(1)
    opt = optim.make_optimizer(name=name, schedule=constant_lr(learning_rate))

    @jax.jit
    def train_step(params, opt_state):
        grads = jax.grad(quadratic_loss)(params, target)
        updates, opt_state = opt.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    initial_loss = quadratic_loss(params, target)
    opt_state = opt.tx.init(params)
    for _ in range(50):
        params, opt_state = train_step(params, opt_state)
    assert quadratic_loss(params, target) < 0.1 * initial_loss


def test_adafactor_keeps_no_full_size_state_for_a_matrix():
    params = kernel_and_bias(0)
    opt_state = optim.make_optimizer(name="adafactor").tx.init(params)
    kernel_size = params["kernel"].size
    assert all(leaf.size < kernel_size for leaf in jax.tree.leaves(opt_state))


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError) as error:
        optim.make_optimizer(name="lamb")
    for name in optim.OPTIMIZER_NAMES:
        assert repr(name) in str(error.value)


def test_clipping_bounds_the_update_global_norm():
    gin.parse_config("make_sgd.momentum = 0.0")
    opt = optim.make_optimizer(name="sgd", schedule=constant_lr(1.0), clip_global_norm=1.0)
    params = kernel_and_bias(0)
    huge_grads = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    updates, _ = opt.tx.update(huge_grads, opt.tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", optim.OPTIMIZER_NAMES)
def test_weight_decay_shrinks_matrices_but_not_vectors_or_norm_scales(name):
    params = {
        "kernel": jnp.ones((128, 256)),
        "bias": jnp.ones((256,)),
        "layers": {"scale": jnp.ones((4, 256))},  # a norm scale stacked by nn.scan
    }
    opt = optim.make_optimizer(name=name, schedule=constant_lr(0.1), weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.tx.update(zero_grads, opt.tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    # Decoupled and lr-scaled: a decayed param shrinks by 1 - lr * weight_decay = 0.95.
    np.testing.assert_allclose(new_params["kernel"], 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new_params["bias"], params["bias"])
    np.testing.assert_array_equal(new_params["layers"]["scale"], params["layers"]["scale"])


def test_default_weight_decay_mask():
    params = {
        "embedding": jnp.zeros((8, 4)),
        "layers": {"kernel": jnp.zeros((2, 4, 6)), "scale": jnp.zeros((2, 4))},
        "final_norm": {"scale": jnp.zeros((4,))},
    }
    assert optim.default_weight_decay_mask(params) == {
        "embedding": True,
        "layers": {"kernel": True, "scale": False},
        "final_norm": {"scale": False},
    }


def test_gin_selects_the_optimizer():
    gin.parse_config("make_optimizer.name = 'adamw'")
    opt = optim.make_optimizer()
    params = kernel_and_bias(0)
    grads = kernel_and_bias(1)
    updates, _ = opt.tx.update(grads, opt.tx.init(params), params)
    reference = optax.adamw(opt.schedule, weight_decay=0.0)
    expected, _ = reference.update(grads, reference.init(params), params)
    jax.tree.map(np.testing.assert_allclose, updates, expected)


def test_count_params():
    params = {
        "dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))},
        "boxed": nn.LogicallyPartitioned(jnp.zeros((2, 5)), names=("embed", "mlp")),
    }
    assert optim.count_params(params) == 12 + 4 + 10
    assert optim.count_params(jax.eval_shape(lambda: params)) == 26
