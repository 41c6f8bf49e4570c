"""Fine-tuning modes as train-state transforms: full, frozen by name, LoRA, LoRA on a quantized base.

An Adaptation says what the train state's params hold, which part of them the optimizer trains,
and how the network's params are made from them (t5lite.peft does the arithmetic):

    full / frozen   state params = the model's params; make_adaptation(trainable=[r"^decoder/"]) trains
                    the decoder only: optax.multi_transform gives frozen params set_to_zero updates
                    and no optimizer state.
    LoRA            state params = {"base": model params (float32, or int8 / int4 / NF4 blockwise with
                    base_bits), "lora": {kernel name: {"a", "b"}}, and with train_in_full "full":
                    {param name: float32 param}}. Only "lora" and "full" are differentiated and
                    optimized; a step's network reads dequantize(base) + (alpha/rank) a b, made float
                    layer by layer inside the scanned stack (step_params, model/weights.py), and the
                    "full" params in place of their base values. The base is never updated: it stays
                    quantized and is the starting model (the reference of preference tuning).

Configured by gin (`make_adaptation.lora_patterns = [r"attention/(query|value)$"]`, ...; see
gin/runs/finetune_lora.gin). t5lite.trainer builds every train step through an Adaptation;
`python -m t5lite.finetune` merges a LoRA run's adapters into its base (a normal checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5lite import partitioning, peft
from t5lite.errors import UserError
from t5lite.model import weights

Params = Any
LORA_RANK_AXIS = "lora_rank"  # no rule maps it: the rank dimension is replicated


@dataclasses.dataclass(frozen=True)
class FullAdaptation:
    """Trains the model's params; with `trainable` / `frozen` regexes (see peft.trainable_labels)
    only the chosen ones."""

    trainable: tuple[str, ...] | None = None
    frozen: tuple[str, ...] = ()

    @property
    def freezes(self) -> bool:
        return self.trainable is not None or bool(self.frozen)

    def adapt(self, params: Params, rng: jax.Array) -> Params:
        """Model params -> the train state's params."""
        del rng
        return params

    def trainable_params(self, state_params: Params) -> Params:
        """The subtree the optimizer sees (works on any tree shaped like the state's params)."""
        return state_params

    def with_trainable(self, state_params: Params, trainable: Params) -> Params:
        del state_params
        return trainable

    def model_params(self, state_params: Params, trainable: Params | None = None,
                     rng: jax.Array | None = None) -> Params:
        """The network's params; `trainable` (if given) replaces the state's trainable part."""
        del rng
        return state_params if trainable is None else trainable

    def step_params(self, state_params: Params, trainable: Params | None = None,
                    rng: jax.Array | None = None) -> Params:
        """The params a step's network reads (as model_params)."""
        return self.model_params(state_params, trainable, rng)

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        if not self.freezes:
            return tx
        labels = functools.partial(peft.trainable_labels, trainable=self.trainable, frozen=self.frozen)
        return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

    def state_shardings(self, boxed_shapes: Params, state_params_shapes: Params, mesh: Mesh, rules) -> Params:
        del state_params_shapes
        return partitioning.logical_shardings(boxed_shapes, mesh, rules)

    def num_trainable(self, state_params: Params) -> int:
        if not self.freezes:
            return _count(state_params)
        return peft.count_trainable(state_params, peft.trainable_labels(
            state_params, trainable=self.trainable, frozen=self.frozen))


@dataclasses.dataclass(frozen=True)
class LoraAdaptation:
    """LoRA factors on the kernels matching `patterns`, the base frozen (and quantized if base_bits).

    train_in_full: regexes of base params trained in full beside the factors (Hugging Face PEFT's
    modules_to_save), e.g. the final norms and the output layer. Their trained copies are float32 in
    the state's "full" (never quantized); the base keeps their starting values.

    dropout: the adapters are merged into the kernels, so the adapter input x cannot be dropped per
    token as in Hu et al.; instead each step drops input rows of `a` (the same input features for
    every token of the step's batch, scaled by 1 / (1 - dropout)), i.e. x diag(mask) a b.
    """

    patterns: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    base_bits: int | None = None
    block_size: int = 64
    min_quantized_size: int = 4096
    train_in_full: tuple[str, ...] = ()
    codebook: str = "int"  # of a quantized base: "int" or "nf4" (base_bits 4)

    def adapt(self, params: Params, rng: jax.Array) -> Params:
        lora = peft.init_lora(jax.random.fold_in(rng, 1), params, patterns=self.patterns, rank=self.rank)
        base = params if self.base_bits is None else peft.quantize(
            params, bits=self.base_bits, block_size=self.block_size, min_size=self.min_quantized_size,
            codebook=self.codebook)
        adapted = {"base": base, "lora": lora}
        if self.train_in_full:
            adapted["full"] = self._full_params(params, lora)
        return adapted

    def _full_params(self, params: Params, lora: Params) -> dict[str, jax.Array]:
        full = peft.params_matching(params, self.train_in_full)
        if not full:
            raise UserError(f"No parameter matches make_adaptation.lora_train_in_full={list(self.train_in_full)}; "
                            f"names look like {sorted(peft.named_params(params))[:4]}.")
        both = sorted(set(full) & set(lora))
        if both:
            raise UserError(f"{both} match both make_adaptation.lora_patterns and lora_train_in_full: train each "
                            "parameter either with LoRA or in full; narrow one of the two.")
        return full

    def trainable_params(self, state_params: Params) -> Params:
        # Without train_in_full the optimizer sees the factors alone, as in earlier checkpoints.
        if not self.train_in_full:
            return state_params["lora"]
        return {"lora": state_params["lora"], "full": state_params["full"]}

    def with_trainable(self, state_params: Params, trainable: Params) -> Params:
        if not self.train_in_full:
            return {"base": state_params["base"], "lora": trainable}
        return {"base": state_params["base"], **trainable}

    def step_params(self, state_params: Params, trainable: Params | None = None,
                    rng: jax.Array | None = None) -> Params:
        """The base's tree with each adapted kernel a weights.LowRankUpdate (its base kernel, float or
        quantized, and factors) and each train_in_full param its trained value: the network makes the
        kernels float where it uses them, one scanned layer at a time (model/weights.py).
        `trainable` (if given) replaces the state's trainable part; `rng` drops adapter inputs."""
        trained = self.with_trainable(state_params, trainable) if trainable is not None else state_params
        lora, full = trained["lora"], trained.get("full", {})
        if rng is not None and self.dropout > 0:
            lora = self._drop_adapter_inputs(lora, rng)

        def leaf(name: str, p: Any) -> Any:
            if name in full:
                return full[name]
            if name not in lora:
                return p
            return weights.LowRankUpdate(p, lora[name]["a"], lora[name]["b"], scale=self.alpha / self.rank,
                                         num_input_dims=peft.KERNEL_INPUT_DIMS[name.rsplit("/", 1)[-1]])

        base = state_params["base"]
        return jax.tree_util.tree_map(leaf, peft.param_names(base), base, is_leaf=peft.is_quantized)

    def model_params(self, state_params: Params, trainable: Params | None = None,
                     rng: jax.Array | None = None) -> Params:
        """The model's float params (the whole model at once: eval, decoding, the merged export)."""
        return weights.materialize(self.step_params(state_params, trainable, rng))

    def _drop_adapter_inputs(self, lora: Params, rng: jax.Array) -> Params:
        keep = 1.0 - self.dropout
        out = {}
        for i, (name, factors) in enumerate(sorted(lora.items())):
            a = factors["a"]  # [layers.., in.., rank]: one mask per input feature (and layer)
            mask = jax.random.bernoulli(jax.random.fold_in(rng, i), keep, a.shape[:-1] + (1,))
            out[name] = {"a": jnp.where(mask, a / keep, 0.0), "b": factors["b"]}
        return out

    def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        return tx

    def state_shardings(self, boxed_shapes: Params, state_params_shapes: Params, mesh: Mesh, rules) -> Params:
        """Base kernels as the model's rules say (quantized: see _quantized_sharding);
        a [.., in axes, lora_rank], b [.., lora_rank, out axes]; "full" params as their base params."""
        base_shardings = partitioning.logical_shardings(boxed_shapes, mesh, rules)
        base = jax.tree_util.tree_map(
            lambda s, q: _quantized_sharding(s, q) if peft.is_quantized(q) else s,
            base_shardings, state_params_shapes["base"], is_leaf=peft.is_quantized)
        shardings = {"base": base, "lora": partitioning.logical_shardings(
            self.lora_logical_shapes(boxed_shapes, state_params_shapes["lora"]), mesh, rules)}
        if "full" in state_params_shapes:  # as the float params they copy
            named = peft.named_params(base_shardings)
            shardings["full"] = {n: named[n] for n in state_params_shapes["full"]}
        return shardings

    def lora_logical_shapes(self, boxed_shapes: Params, lora_shapes: Params) -> Params:
        """The LoRA factors' shapes boxed with logical axis names derived from their kernels'."""
        axes = {n: b.names for n, b in _flat_boxed(boxed_shapes).items()}
        out = {}
        for name, factors in lora_shapes.items():
            names = tuple(axes[name])
            # kernel [layers.., in.., out..]; a [layers.., in.., rank]; b [layers.., rank, out..]
            n_layers = factors["a"].ndim - 1 + factors["b"].ndim - 1 - len(names)
            in_end = factors["a"].ndim - 1
            out[name] = {
                "a": nn.LogicallyPartitioned(factors["a"], names[:in_end] + (LORA_RANK_AXIS,)),
                "b": nn.LogicallyPartitioned(factors["b"], names[:n_layers] + (LORA_RANK_AXIS,) + names[in_end:]),
            }
        return out

    def num_trainable(self, state_params: Params) -> int:
        return _count(self.trainable_params(state_params))


def _count(tree: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _flat_boxed(boxed: Params) -> dict[str, nn.LogicallyPartitioned]:
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


Adaptation = FullAdaptation | LoraAdaptation


def _quantized_sharding(kernel: NamedSharding, q: peft.QuantizedTensor) -> peft.QuantizedTensor:
    """Codes [..., n_blocks, block] and scales [..., n_blocks, 1] sharded as their float kernel [..., last]:
    every dimension but the last as it is, the last's mesh axes on n_blocks (replicated if they do not
    divide it), the block unsplit. Each device dequantizes its own part of the kernel."""
    spec = tuple(kernel.spec) + (None,) * (len(q.shape) - len(kernel.spec))
    last = spec[-1]
    if q.codes.shape[-2] % partitioning.mesh_axes_size(kernel.mesh, last):
        last = None
    sharding = NamedSharding(kernel.mesh, PartitionSpec(*spec[:-1], last, None))
    return dataclasses.replace(q, codes=sharding, scale=sharding)


@gin.configurable
def make_adaptation(
    *,
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] = (),
    lora_patterns: Sequence[str] = (),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_train_in_full: Sequence[str] = (),
    base_bits: int | None = None,
    quantize_codebook: str = "int",
    quantize_block_size: int = 64,
    quantize_min_size: int = 4096,
) -> Adaptation:
    """How training adapts the model (defaults: train every parameter).

    trainable / frozen: regexes over parameter names ("decoder/layers/mlp/wi_0", ...): train only
      the params matching `trainable` (None: all) and not matching `frozen`. E.g. trainable=
      [r"^decoder/"] (decoder only), [r"norm/scale$"] (norms only), frozen=[r"token_embedder"].
    lora_patterns: regexes of the dense kernels (or the token embedding) that get LoRA factors of
      rank lora_rank, scaled by lora_alpha / lora_rank, with lora_dropout (see LoraAdaptation);
      everything else is frozen unless lora_train_in_full names it.
    lora_train_in_full: regexes of params trained in full beside the LoRA factors (PEFT's
      modules_to_save), e.g. [r'norm/scale$', r'logits_dense$']: the final norm sets the scale of the
      logits, which frozen keeps LoRA on SST-2's majority class (docs/fine-tuning.md). Kept float32.
    base_bits: 8 or 4 stores the frozen base quantized (blockwise scales over quantize_block_size
      values) for QLoRA-style training; needs lora_patterns. Params smaller than quantize_min_size
      (norm scales, position-bias tables) stay float32. quantize_codebook: 'int' (evenly spaced
      codes) or 'nf4' (NormalFloat4, QLoRA's; base_bits 4).
    """
    if base_bits is not None and not lora_patterns:
        raise UserError("make_adaptation.base_bits quantizes a frozen base, which needs LoRA adapters to train: "
                        "set make_adaptation.lora_patterns (e.g. [r'attention/(query|value)$']).")
    if lora_train_in_full and not lora_patterns:
        raise UserError("make_adaptation.lora_train_in_full trains params beside LoRA adapters: set "
                        "make_adaptation.lora_patterns, or train params alone with make_adaptation.trainable.")
    if not lora_patterns:
        return FullAdaptation(None if trainable is None else tuple(trainable), tuple(frozen))
    if trainable is not None or frozen:
        raise UserError("With make_adaptation.lora_patterns only the LoRA factors train; unset "
                        "make_adaptation.trainable / frozen.")
    if not 0.0 <= lora_dropout < 1.0:
        raise UserError(f"make_adaptation.lora_dropout must be in [0, 1), got {lora_dropout}.")
    if base_bits not in (None, 4, 8):
        raise UserError(f"make_adaptation.base_bits must be None, 8 or 4, got {base_bits}.")
    if quantize_codebook not in weights.CODEBOOKS or (quantize_codebook == "nf4" and base_bits != 4):
        raise UserError(f"make_adaptation.quantize_codebook={quantize_codebook!r} with base_bits={base_bits}: use "
                        "'int' (base_bits 8 or 4) or 'nf4' (base_bits 4).")
    return LoraAdaptation(tuple(lora_patterns), lora_rank, lora_alpha, lora_dropout, base_bits, quantize_block_size,
                          quantize_min_size, tuple(lora_train_in_full), quantize_codebook)


def _nbytes(tree: Params) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (quantized tensors at their packed size)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=peft.is_quantized)
    return sum(p.nbytes() if peft.is_quantized(p) else int(np.prod(p.shape)) * p.dtype.itemsize
               for p in leaves)


def _held_bytes(tree: Params) -> int:
    """Bytes the arrays of a tree occupy (int4 codes one per int8 byte)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def summary_lines(adaptation: Adaptation, state_shapes: Any, model_params_shapes: Params) -> list[str]:
    """What is trained and what the state holds, from ShapeDtypeStructs of a TrainState and of the
    model's params: trainable / total parameters, base bytes (before / after quantization), state bytes."""
    total = _count(model_params_shapes)
    trainable = adaptation.num_trainable(state_shapes.params)
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"]
    if isinstance(adaptation, LoraAdaptation):
        lines[0] += (f"; LoRA rank {adaptation.rank}, alpha {adaptation.alpha:g}, dropout {adaptation.dropout:g} on "
                     f"{len(state_shapes.params['lora'])} kernels {sorted(state_shapes.params['lora'])[:3]}...")
        if adaptation.train_in_full:
            lines[0] += f"; trained in full: {sorted(state_shapes.params['full'])}"
        bits = adaptation.base_bits
        code = "nf4" if adaptation.codebook == "nf4" else f"int{bits}"
        base = "float32" if bits is None else f"{code} ({adaptation.block_size}/scale)"
        held = _held_bytes(state_shapes.params["base"])
        lines.append(f"base parameters: {_nbytes(model_params_shapes):,} bytes float32 -> "
                     f"{_nbytes(state_shapes.params['base']):,} bytes {base}"
                     + (f" packed; {held:,} bytes held (int4 codes one per int8)" if bits == 4 else ""))
    lines.append(f"train state held in memory: params {_held_bytes(state_shapes.params):,} bytes, optimizer state "
                 f"{_held_bytes(state_shapes.opt_state):,} bytes")
    return lines
