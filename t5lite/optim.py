"""Learning-rate schedules and optimizers for T5 pretraining (optax, gin-configurable).

    opt = make_optimizer()                # Optimizer(tx, schedule), both set from gin
    opt_state = opt.tx.init(params)
    updates, opt_state = opt.tx.update(grads, opt_state, params)
    lr = float(opt.schedule(step))        # for logging: the lr the update at `step` uses

`step` counts optimizer updates from 0: schedule(step) is the learning rate applied by the
update that turns the params of step `step` into those of step `step + 1`.

Weight decay means the same for every optimizer: decoupled from the gradient statistics and
multiplied by the current learning rate, so a decayed param shrinks by a factor
(1 - schedule(step) * weight_decay) per step on top of its gradient update (as optax.adamw and
PyTorch's AdamW do).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from t5lite.errors import UserError

SCHEDULE_NAMES = ("constant", "rsqrt", "cosine", "step", "exponential", "linear")

# Leaf names never decayed even when stacked into >= 2 dims by nn.scan ([layers, embed]).
NO_DECAY_PARAM_NAMES = frozenset({"scale", "bias"})

Params = Any  # a pytree of float32 arrays, e.g. nested dicts from flax
WeightDecayMask = Callable[[Params], Any]  # params -> same-structured pytree of bools


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and the learning-rate schedule it uses (kept for logging)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@gin.configurable
def make_schedule(
    *,
    name: str = "rsqrt",
    learning_rate: float = 1e-2,
    warmup_steps: int = 1000,
    total_steps: int | None = None,
    decay_rate: float = 0.5,
    decay_steps: int = 1000,
    end_learning_rate: float = 0.0,
) -> optax.Schedule:
    """A function step -> learning rate. Every schedule but "rsqrt" warms up linearly from 0.

    name:
      "constant":    learning_rate after a linear warmup (warmup_steps=0: no warmup).
      "rsqrt":       T5's rsqrt_decay, learning_rate / sqrt(max(step, warmup_steps, 1)): constant
                     learning_rate / sqrt(warmup_steps) up to warmup_steps, then decays as
                     1/sqrt(step). T5 uses learning_rate=1.0, warmup_steps=10000 -> peak 0.01.
                     Unlike the others, learning_rate here is not the peak value.
      "cosine":      warmup to learning_rate, then cosine decay to end_learning_rate at
                     total_steps (required), constant after.
      "linear":      warmup to learning_rate, then linear decay to end_learning_rate at
                     total_steps (required), constant after.
      "step":        warmup, then multiplied by decay_rate every decay_steps steps
                     (lr * decay_rate ** floor((step - warmup_steps) / decay_steps)).
      "exponential": the smooth version of "step": lr * decay_rate ** ((step - warmup_steps) /
                     decay_steps). "step" and "exponential" never go below end_learning_rate.
    """
    if name not in SCHEDULE_NAMES:
        raise UserError(f"make_schedule: name={name!r}; choose one of {SCHEDULE_NAMES}.")
    if warmup_steps < 0:
        raise UserError(f"make_schedule: warmup_steps={warmup_steps} must be >= 0.")
    if name == "rsqrt":
        return _rsqrt_schedule(learning_rate, warmup_steps)
    after_warmup = _schedule_after_warmup(
        name, learning_rate, warmup_steps, total_steps, decay_rate, decay_steps, end_learning_rate
    )
    return _with_linear_warmup(after_warmup, learning_rate, warmup_steps)


def _rsqrt_schedule(learning_rate: float, warmup_steps: int) -> optax.Schedule:
    """learning_rate / sqrt(max(step, warmup_steps, 1)), T5's rsqrt_decay."""
    # The floor of 1 keeps step 0 finite when warmup_steps is 0.
    plateau_steps = float(max(warmup_steps, 1))

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        return learning_rate * jax.lax.rsqrt(jnp.maximum(jnp.float32(step), plateau_steps))

    return schedule


def _schedule_after_warmup(
    name: str,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int | None,
    decay_rate: float,
    decay_steps: int,
    end_learning_rate: float,
) -> optax.Schedule:
    """The schedule counted from the end of warmup (its step 0 is step warmup_steps overall)."""
    if name == "constant":
        return optax.constant_schedule(learning_rate)
    if name in ("step", "exponential"):
        if decay_steps <= 0 or not 0.0 < decay_rate < 1.0:
            raise UserError(
                f"make_schedule: name={name!r} needs decay_steps > 0 and 0 < decay_rate < 1; "
                f"got decay_steps={decay_steps}, decay_rate={decay_rate} "
                "(use 'constant' for no decay)."
            )
        return optax.exponential_decay(
            learning_rate,
            decay_steps,
            decay_rate,
            staircase=(name == "step"),
            end_value=end_learning_rate,
        )
    if total_steps is None or total_steps <= warmup_steps:
        raise UserError(
            f"make_schedule: name={name!r} needs total_steps > warmup_steps (the step at which "
            f"the learning rate reaches end_learning_rate); got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}."
        )
    if name == "cosine":
        end_fraction = end_learning_rate / learning_rate if learning_rate else 0.0
        return optax.cosine_decay_schedule(
            learning_rate, total_steps - warmup_steps, alpha=end_fraction
        )
    return optax.linear_schedule(learning_rate, end_learning_rate, total_steps - warmup_steps)


def _with_linear_warmup(
    after_warmup: optax.Schedule, learning_rate: float, warmup_steps: int
) -> optax.Schedule:
    """Linear 0 -> learning_rate over warmup_steps, then after_warmup(step - warmup_steps)."""
    # optax.linear_schedule with 0 transition steps returns its init value (0) forever.
    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [warmup_steps])


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


def default_weight_decay_mask(params: Params) -> Any:
    """True for params to decay: >= 2-D (kernels, embeddings) except norm scales and biases.

    ndim alone is not enough: nn.scan stacks a norm scale [embed] into [layers, embed].
    """

    def should_decay(path: tuple, leaf: jax.Array) -> bool:
        leaf_name = getattr(path[-1], "key", None) if path else None
        return leaf.ndim >= 2 and leaf_name not in NO_DECAY_PARAM_NAMES

    return jax.tree_util.tree_map_with_path(should_decay, params)


@gin.configurable(denylist=["schedule", "weight_decay", "weight_decay_mask"])
def make_adafactor(
    *,
    schedule: optax.Schedule,
    weight_decay: float,
    weight_decay_mask: WeightDecayMask,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: float | None = None,
    eps: float = 1e-30,
) -> optax.GradientTransformation:
    """optax.adafactor with T5's defaults (no momentum, factored second moments, update clipping).

    Stacked layers (nn.scan, kernel [layers, embed, mlp]): second moments are factored per layer
    (over the two largest dims), but update clipping and multiply_by_parameter_scale use the RMS
    of the whole stacked tensor, i.e. one scale shared by all layers instead of T5's per layer.
    """
    # optax adds weight_decay_rate * param after the lr scaling, so it is not multiplied by the
    # learning rate; passing weight_decay * schedule keeps this module's lr-scaled semantics.
    decay_schedule = _scaled_schedule(schedule, weight_decay) if weight_decay else None
    return optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        weight_decay_rate=decay_schedule,
        eps=eps,
        factored=factored,
        weight_decay_mask=weight_decay_mask,
    )


@gin.configurable(denylist=["schedule", "weight_decay", "weight_decay_mask"])
def make_adamw(
    *,
    schedule: optax.Schedule,
    weight_decay: float,
    weight_decay_mask: WeightDecayMask,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """optax.adamw (b2=0.95 is the usual choice for stability in large-model pretraining)."""
    return optax.adamw(
        learning_rate=schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
    )


@gin.configurable(denylist=["schedule", "weight_decay", "weight_decay_mask"])
def make_sgd(
    *,
    schedule: optax.Schedule,
    weight_decay: float,
    weight_decay_mask: WeightDecayMask,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """SGD with (heavy-ball or Nesterov) momentum; momentum=0 keeps no momentum buffer."""
    # Built from parts rather than optax.sgd so the decay sits after momentum (decoupled: it
    # is not accumulated by the momentum buffer) and before the lr scaling (lr-scaled).
    return optax.chain(
        optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def _scaled_schedule(schedule: optax.Schedule, factor: float) -> optax.Schedule:
    """step -> factor * schedule(step)."""
    return lambda step: factor * schedule(step)


_OPTIMIZER_BUILDERS = {"adafactor": make_adafactor, "adamw": make_adamw, "sgd": make_sgd}
OPTIMIZER_NAMES = tuple(_OPTIMIZER_BUILDERS)


@gin.configurable
def make_optimizer(
    *,
    name: str = "adafactor",
    schedule: optax.Schedule | None = None,
    weight_decay: float = 0.0,
    clip_global_norm: float | None = None,
    weight_decay_mask: WeightDecayMask | None = None,
) -> Optimizer:
    """The optimizer `name` driven by `schedule`, with optional clipping and weight decay.

    name: "adafactor", "adamw" or "sgd"; their own settings are gin-bound on make_adafactor,
      make_adamw and make_sgd (e.g. `make_adamw.b2 = 0.95`).
    schedule: step -> learning rate; None builds make_schedule() (gin-configured).
    weight_decay: decoupled, lr-scaled decay (see the module docstring); 0 disables it.
    clip_global_norm: if set, gradients are rescaled to at most this global L2 norm before
      the optimizer sees them.
    weight_decay_mask: params -> pytree of bools, True where to decay; None uses
      default_weight_decay_mask (>= 2-D params except norm scales and biases).
    """
    if name not in _OPTIMIZER_BUILDERS:
        raise UserError(f"make_optimizer: name={name!r}; choose one of {OPTIMIZER_NAMES}.")
    schedule = make_schedule() if schedule is None else schedule
    tx = _OPTIMIZER_BUILDERS[name](
        schedule=schedule,
        weight_decay=weight_decay,
        weight_decay_mask=weight_decay_mask or default_weight_decay_mask,
    )
    if clip_global_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_global_norm), tx)
    return Optimizer(tx=tx, schedule=schedule)


def count_params(params: Params) -> int:
    """Total number of scalars in a params pytree (arrays, ShapeDtypeStructs or boxed params)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
