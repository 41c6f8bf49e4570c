"""Train state, sharded initialisation, and the ONE builder of the compiled train step.

build_train_program is what `python -m t5lite.train` runs and what `python -m t5lite.precompile`
compiles for a TPU slice: the model, optimizer, adaptation (full, frozen, LoRA, quantized base),
the schedule's offset for fine-tuning, the mesh and the rules come together only there.

The loss of a step is the sum of per-token losses over the GLOBAL batch divided by the number
of real target tokens in it. With gradient accumulation the batch is split into microbatches
whose gradient SUMS are added before that one division, so the update equals the update of
the whole batch at once. Preference tuning (PreferenceConfig.objective; t5lite.preference) runs
through the same step: its loss is a sum over pairs, divided once by the global number of pairs. So
does GRPO (GRPOConfig; t5lite.grpo) on batches of sampled completions (t5lite.rollouts): its loss sum
is divided once by the global count of its loss type (completion tokens or completions).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from t5lite import adaptation as adaptation_lib
from t5lite import checkpoints, partitioning
from t5lite import grpo as grpo_lib
from t5lite import preference as preference_lib
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model, normalize_metric_sums
from t5lite.optim import make_optimizer
from t5lite.run_config import GRPOConfig, LossConfig, PreferenceConfig, TrainConfig

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class PreferenceTrainState(TrainState):
    """A DPO / IPO train state without LoRA: also the starting params, the frozen reference model
    (never optimized nor differentiated). Checkpoints keep it beside `params`, which stay the model's
    params: eval, infer and export read them as any run's."""

    reference: Any


@dataclasses.dataclass
class ShardedInit:
    """Everything needed to create, restore and step a sharded TrainState."""

    init_fn: Callable[[Array], TrainState]  # jitted: rng -> sharded TrainState
    init_params: Callable[[Array], Any]  # jitted: rng -> the model's params (sharded), before adaptation
    state_from_params: Callable[[Any, Array], TrainState]  # jitted: (model params, rng) -> step-0 TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying shardings (orbax restore target)
    state_shardings: TrainState
    boxed_params_shapes: Any  # nn.LogicallyPartitioned shapes, for the model-info table


def make_sharded_init(
    model: Model, tx: optax.GradientTransformation, input_shapes: Mapping[str, tuple[int, ...]],
    mesh: Mesh, rules, adaptation: adaptation_lib.Adaptation | None = None, keep_reference: bool = False,
) -> ShardedInit:
    """Derives parameter shardings from the model's logical axes and builds a jitted init.

    `adaptation` (default: train every parameter) decides what the state's params hold (e.g. a
    frozen base and LoRA factors) and which part of them `tx` optimizes. keep_reference: the state
    is a PreferenceTrainState whose `reference` is a copy of the model's starting params.
    """
    adaptation = adaptation or adaptation_lib.FullAdaptation()

    def init_boxed(rng):
        return model.init(rng, input_shapes)["params"]

    def init_params(rng):
        return nn.unbox(init_boxed(rng))

    def state_from_params(params, rng) -> TrainState:
        adapted = adaptation.adapt(params, rng)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=adapted,
                           opt_state=tx.init(adaptation.trainable_params(adapted)))
        return PreferenceTrainState(**vars(state), reference=params) if keep_reference else state

    def init_state(rng) -> TrainState:
        return state_from_params(init_params(rng), rng)

    boxed_shapes = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    model_shardings = partitioning.logical_shardings(boxed_shapes, mesh, rules)
    state_shapes = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    params_shardings = adaptation.state_shardings(boxed_shapes, state_shapes.params, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = TrainState(
        step=replicated,
        params=params_shardings,
        opt_state=partitioning.derive_state_shardings(
            state_shapes.opt_state, adaptation.trainable_params(state_shapes.params),
            adaptation.trainable_params(params_shardings), mesh),
    )
    if keep_reference:
        state_shardings = PreferenceTrainState(**vars(state_shardings), reference=model_shardings)
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, state_shardings)
    with mesh, nn.logical_axis_rules(rules):
        init_fn = jax.jit(init_state, out_shardings=state_shardings)
        init_params_fn = jax.jit(init_params, out_shardings=model_shardings)
        from_params_fn = jax.jit(state_from_params, in_shardings=(model_shardings, None),
                                 out_shardings=state_shardings)
    return ShardedInit(init_fn, init_params_fn, from_params_fn, abstract_state, state_shardings, boxed_shapes)


def _split_microbatches(batch: Mapping[str, Array], num_microbatches: int) -> dict[str, Array]:
    """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...]."""
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"Batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}.")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def lm_loss_sums(model: Model, loss_config: LossConfig, params, batch: Mapping[str, Array],
                 dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """The language-modelling loss: (sum of token losses, metric sums); see Model.loss_sums."""
    return model.loss_sums(params, batch, dropout_rng=dropout_rng, label_smoothing=loss_config.label_smoothing,
                           z_loss=loss_config.z_loss)


def grad_and_metric_sums(
    model: Model, params, batch: Mapping[str, Array], dropout_rng: Array | None,
    loss_config: LossConfig, num_microbatches: int = 1, to_model_params: Callable[[Any], Any] = lambda p: p,
    loss_sums: Callable[[Any, Mapping[str, Array], Array | None], tuple[Array, dict[str, Array]]] | None = None,
) -> tuple[Any, dict[str, Array]]:
    """Gradient of the SUM of losses and the metric sums, accumulated over microbatches.

    The gradient is w.r.t. `params`; the network gets to_model_params(params) (e.g. LoRA factors
    merged into a frozen base, which is then not differentiated). loss_sums(model params, batch,
    dropout_rng) -> (loss sum, metric sums): default the LM loss of `loss_config` (lm_loss_sums).
    """
    loss_sums = loss_sums or functools.partial(lm_loss_sums, model, loss_config)

    def loss_fn(p, mb, rng):
        return loss_sums(to_model_params(p), mb, rng)

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        grads, sums = grad_fn(params, batch, dropout_rng)
        return grads, sums

    micro = _split_microbatches(batch, num_microbatches)

    def accumulate(carry, xs):
        grads_acc, sums_acc = carry
        index, mb = xs
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        grads, sums = grad_fn(params, mb, rng)
        return (jax.tree_util.tree_map(jnp.add, grads_acc, grads),
                jax.tree_util.tree_map(jnp.add, sums_acc, sums)), None

    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    first_mb = jax.tree_util.tree_map(lambda x: x[0], micro)
    zero_sums = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, first_mb, dropout_rng)[1]))
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums),
                                    (jnp.arange(num_microbatches), micro))
    return grads, sums


def make_train_step(
    model: Model, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
    loss_config: LossConfig, num_microbatches: int = 1, use_dropout: bool = True,
    adaptation: adaptation_lib.Adaptation | None = None, preference: PreferenceConfig | None = None,
    grpo: GRPOConfig | None = None,
) -> Callable[[TrainState, Mapping[str, Array], Array], tuple[TrainState, dict[str, Array]]]:
    """(state, batch, rng) -> (new_state, metrics); jit it with shardings and donate the state.

    metrics["update_skipped"] is 1.0 if the loss or the gradients were not finite: then new_state
    has the old params and optimizer state, and only the step counter advanced. With an
    `adaptation`, only its trainable part of the params is differentiated and updated. With an
    enabled `preference` config the batch holds pairs and the loss is a mean over them; DPO / IPO
    read the reference from the LoRA base or the state's PreferenceTrainState.reference. With an
    enabled `grpo` config the batch holds sampled completions (t5lite.rollouts) and the loss is GRPO's;
    a KL term (beta > 0) reads the reference as DPO does.
    """
    adaptation = adaptation or adaptation_lib.FullAdaptation()
    preference = preference if preference is not None and preference.enabled else None
    grpo = grpo if grpo is not None and grpo.enabled else None

    def train_step(state: TrainState, batch: Mapping[str, Array], rng: Array):
        dropout_rng = jax.random.fold_in(rng, state.step) if use_dropout else None
        adapter_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), 1)  # LoRA dropout, if any
        trainable = adaptation.trainable_params(state.params)
        loss_sums, count, normalize = None, "num_tokens", normalize_metric_sums
        if preference is not None:
            reference = preference_lib.reference_params(adaptation, state.params, getattr(state, "reference", None))
            loss_sums = _preference_loss_sums(model, preference, reference)
            count, normalize = "num_pairs", preference_lib.normalize_sums
        if grpo is not None:
            reference = preference_lib.reference_params(adaptation, state.params, getattr(state, "reference", None))
            loss_sums = functools.partial(_grpo_loss_sums, model, grpo, reference)
            count, normalize = grpo_lib.NORMALIZER, grpo_lib.normalize_sums
        grad_sums, sums = grad_and_metric_sums(
            model, trainable, batch, dropout_rng, loss_config, num_microbatches,
            to_model_params=lambda t: adaptation.step_params(state.params, t, adapter_rng), loss_sums=loss_sums)
        # One division by the global count of real tokens (LM), pairs, or GRPO's normalizer: a mean over them.
        num_tokens = jnp.maximum(sums[count], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / num_tokens, grad_sums)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        params = optax.apply_updates(trainable, updates)
        metrics = normalize(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        # A non-finite loss or gradient leaves params and optimizer state as they were; the step
        # still counts (the schedule and the data move on). LoopConfig.on_nonfinite decides what follows.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        params, opt_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state), (trainable, state.opt_state))
        metrics["update_skipped"] = 1.0 - finite.astype(jnp.float32)
        params = adaptation.with_trainable(state.params, params)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _preference_loss_sums(model: Model, config: PreferenceConfig, reference) -> Callable:
    """loss_sums (see grad_and_metric_sums) of a batch of pairs against the reference's params."""
    def loss_sums(params, batch, dropout_rng):
        return preference_lib.loss_sums(model, params, batch, config=config, reference_params=reference,
                                        dropout_rng=dropout_rng)
    return loss_sums


def _grpo_loss_sums(model: Model, config: GRPOConfig, reference, params, batch, dropout_rng):
    """loss_sums (see grad_and_metric_sums) of a batch of completions against the reference's params."""
    return grpo_lib.loss_sums(model, params, batch, config=config, reference_params=reference, dropout_rng=dropout_rng)


# XLA:CPU hands each matmul to YNNPACK on its own by default, so every weight gradient (x^T dy,
# a contraction over the major dimension of both) first writes a transposed copy of x or dy, and
# the MLP's GELU backward is fused into that strided copy. Letting YNNPACK fuse a matmul with its
# producers removes the copies: T5 v1.1 small, batch 8, 512 + 114, one step 4.9 s -> 4.1 s on a
# 2-core CPU (bench/train_throughput.py). The encoder's forward pass alone is slower with it
# (0.66 -> 0.86 s in greedy decoding), so inference keeps XLA's default.
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def train_compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """XLA options for compiling the train step on `mesh`'s devices (None: the backend's default)."""
    return dict(CPU_TRAIN_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def jit_train_step(
    model: Model, tx: optax.GradientTransformation, schedule: optax.Schedule, init: ShardedInit, mesh: Mesh,
    rules, *, loss_config: LossConfig, num_microbatches: int = 1, use_dropout: bool = True,
    adaptation: adaptation_lib.Adaptation | None = None, preference: PreferenceConfig | None = None,
    grpo: GRPOConfig | None = None,
) -> Callable[[TrainState, Mapping[str, Array], Array], tuple[TrainState, dict[str, Array]]]:
    """The train step jitted for the mesh: state sharded as `init` says, batch over the data axes,
    activations constrained by the rules, the state donated."""
    step = make_train_step(model, tx, schedule, loss_config=loss_config, num_microbatches=num_microbatches,
                           use_dropout=use_dropout, adaptation=adaptation, preference=preference, grpo=grpo)
    return jax.jit(
        partitioning.with_sharding_rules(step, mesh, rules),
        in_shardings=(init.state_shardings, partitioning.batch_sharding(mesh), None),
        out_shardings=(init.state_shardings, None),
        donate_argnums=(0,),
        compiler_options=train_compiler_options(mesh),
    )


def make_eval_step(model: Model, loss_config: LossConfig, adaptation: adaptation_lib.Adaptation | None = None,
                   preference: PreferenceConfig | None = None,
                   ) -> Callable[[Any, Mapping[str, Array]], dict[str, Array]]:
    """(params, batch) -> metric SUMS (teacher forced, no dropout); add them across batches.

    params: the train state's params (the model's, merged by `adaptation` if given); with an enabled
    `preference` config, (state params, the state's reference or None): see TrainProgram.eval_params.
    Normalize the sums with eval_normalizer(preference)."""
    adaptation = adaptation or adaptation_lib.FullAdaptation()

    def eval_step(params, batch):
        _, sums = model.loss_sums(adaptation.step_params(params), batch, label_smoothing=loss_config.label_smoothing,
                                  z_loss=loss_config.z_loss)
        return sums

    def preference_eval_step(params, batch):
        state_params, reference = params
        reference = preference_lib.reference_params(adaptation, state_params, reference)
        return preference_lib.loss_sums(model, adaptation.step_params(state_params), batch, config=preference,
                                        reference_params=reference)[1]

    return preference_eval_step if preference is not None and preference.enabled else eval_step


def eval_normalizer(preference: PreferenceConfig | None) -> Callable[[Mapping[str, Array]], dict[str, Array]]:
    """Metric sums of make_eval_step -> the figures: per-token means (LM) or means over pairs."""
    return preference_lib.normalize_sums if preference is not None and preference.enabled else normalize_metric_sums


def abstract_params(model: Model, mesh: Mesh, rules, adaptation: adaptation_lib.Adaptation | None = None) -> Any:
    """ShapeDtypeStructs, with shardings, of the params a train state holds (the model's; with a LoRA
    `adaptation`, its base and factors): the target that restores them, without building an optimizer."""
    adaptation = adaptation or adaptation_lib.FullAdaptation()
    input_shapes = model.input_shapes(1, {"inputs": 8, "targets": 8})  # the params do not depend on them

    rng = jax.random.PRNGKey(0)
    boxed_shapes = jax.eval_shape(lambda r: model.init(r, input_shapes)["params"], rng)
    shapes = jax.eval_shape(adaptation.adapt, nn.unbox(boxed_shapes), rng)  # the model is traced once
    shardings = adaptation.state_shardings(boxed_shapes, shapes, mesh, rules)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """A run's train step and everything it was built from."""

    model: Model
    adaptation: adaptation_lib.Adaptation
    optimizer: Any  # t5lite.optim.Optimizer: tx (wrapped by the adaptation here) and schedule
    tx: optax.GradientTransformation
    init: ShardedInit
    initial_step: int  # fine-tuning counts steps on from its initial checkpoint's
    step: Callable[[TrainState, Mapping[str, Array], Array], tuple[TrainState, dict[str, Array]]]  # jitted
    mesh: Mesh
    rules: Any
    preference: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)

    def eval_params(self, state: TrainState) -> Any:
        """What the eval step (jit_eval_step with eval_params_shardings) takes of a state: its params,
        and in a preference run the frozen reference beside them (None where there is none)."""
        if not self.preference.enabled:
            return state.params
        return state.params, getattr(state, "reference", None)

    @property
    def eval_params_shardings(self) -> Any:
        return self.eval_params(self.init.state_shardings)

    def lower(self, batch_shapes: Mapping[str, tuple[int, ...]]) -> jax.stages.Lowered:
        """The step lowered for batches of these feature shapes (no data, no state needed)."""
        sharding = partitioning.batch_sharding(self.mesh)
        batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding) for k, s in batch_shapes.items()}
        with jax.set_mesh(self.mesh):
            return self.step.lower(self.init.abstract_state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))


def build_train_program(config: TransformerConfig, run: TrainConfig, mesh: Mesh) -> TrainProgram:
    """The train step `python -m t5lite.train` runs for `run` on `mesh`, jitted (not yet compiled).

    The optimizer and the adaptation come from gin (optim.make_optimizer, adaptation.make_adaptation);
    with CheckpointConfig.initial_checkpoint_path the schedule counts from that checkpoint's step.
    """
    model = Model(config)
    rules = partitioning.axis_rules(run.partitioning_preset)
    partitioning.check_batch_size(run.data.batch_size, mesh)
    if run.data.batch_size % run.loop.num_microbatches:
        raise UserError(f"LoopConfig.num_microbatches={run.loop.num_microbatches} does not divide "
                        f"DataConfig.batch_size={run.data.batch_size}.")
    optimizer = make_optimizer()
    adaptation = adaptation_lib.make_adaptation()
    tx = adaptation.wrap_optimizer(optimizer.tx)
    input_shapes = model.input_shapes(run.data.batch_size, run.data.task_feature_lengths)
    keep_reference = (preference_lib.keeps_reference_copy(run.preference, adaptation)
                      or grpo_lib.keeps_reference_copy(run.grpo, adaptation))
    init = make_sharded_init(model, tx, input_shapes, mesh, rules, adaptation, keep_reference=keep_reference)
    initial_path = run.checkpoints.initial_checkpoint_path
    initial_step = checkpoints.read_step(initial_path) if initial_path else 0
    step = jit_train_step(
        model, tx, lambda s: optimizer.schedule(s - initial_step), init, mesh, rules, loss_config=run.loss,
        num_microbatches=run.loop.num_microbatches, use_dropout=config.dropout_rate > 0, adaptation=adaptation,
        preference=run.preference, grpo=run.grpo)
    return TrainProgram(model, adaptation, optimizer, tx, init, initial_step, step, mesh, rules, run.preference)


def jit_eval_step(model: Model, params_shardings: Any, mesh: Mesh, rules, *, loss_config: LossConfig,
                  adaptation: adaptation_lib.Adaptation | None = None, preference: PreferenceConfig | None = None,
                  ) -> Callable[[Any, Mapping[str, Array]], dict[str, Array]]:
    """make_eval_step jitted for the mesh: (state params, sharded as `params_shardings`; batch) -> metric sums.
    A preference run passes TrainProgram.eval_params and eval_params_shardings."""
    step = make_eval_step(model, loss_config, adaptation, preference)
    return jax.jit(partitioning.with_sharding_rules(step, mesh, rules),
                   in_shardings=(params_shardings, partitioning.batch_sharding(mesh)))
