"""Parameter-efficient fine-tuning as parameter transforms: freezing, LoRA, weight quantization.

All three act on the params pytree, so the network code is untouched:

    labels = trainable_labels(params, trainable=[r"decoder/"])            # freeze all but the decoder
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

    lora = init_lora(rng, params, patterns=[r"attention/(query|value)$"], rank=8)
    loss(merge_lora(params, lora, alpha=16, rank=8), batch)               # grads flow to `lora` only

    q = quantize(params, bits=4, block_size=64)                           # int4 base for QLoRA
    loss(merge_lora(dequantize(q), lora, ...), batch)

Parameter names are "/"-joined paths such as "encoder/layers/attention/query" (scanned layers
keep their leading [layers] axis; LoRA factors get it too).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5lite.errors import UserError

Params = Any

# How many leading (non-"layers") dims of each kernel are contracted with the activation (the
# token embedding [vocab, embed]: its row index, the token id).
KERNEL_INPUT_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "wi_0": 1, "wi_1": 1, "wo": 1, "logits_dense": 1,
                     "embedding": 1}


def param_names(params: Params) -> Params:
    """A pytree like params holding each leaf's "/"-joined path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def trainable_labels(params: Params, *, trainable: Sequence[str] | None = None,
                     frozen: Sequence[str] = ()) -> Params:
    """"train" / "freeze" per parameter, for optax.multi_transform.

    trainable: regexes of parameters to train (None: all); frozen: regexes frozen even if
    trainable matches. Raises if no parameter is left to train.
    """
    labels = jax.tree_util.tree_map(
        lambda n: "train" if (trainable is None or _matches(n, trainable)) and not _matches(n, frozen) else "freeze",
        param_names(params))
    if "train" not in jax.tree_util.tree_leaves(labels):
        raise UserError(f"No parameter is trainable with trainable={trainable} and frozen={list(frozen)}.")
    return labels


def count_trainable(params: Params, labels: Params) -> int:
    return sum(int(np.prod(p.shape)) for p, lab in zip(jax.tree_util.tree_leaves(params),
                                                       jax.tree_util.tree_leaves(labels), strict=True)
               if lab == "train")


# --- LoRA -----------------------------------------------------------------------------------------

def _split_kernel_shape(name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(layer dims, input dims, output dims) of a kernel named by its path."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf not in KERNEL_INPUT_DIMS:
        raise UserError(f"LoRA pattern matched {name!r}, which is not a dense kernel ({sorted(KERNEL_INPUT_DIMS)}).")
    n_in = KERNEL_INPUT_DIMS[leaf]
    # Kernels have 1 + n_out dims beyond the inputs: query [embed, heads, kv] etc.; a scanned
    # kernel has one more, leading, layers dim.
    n_out = {"query": 2, "key": 2, "value": 2}.get(leaf, 1)
    n_layers = len(shape) - n_in - n_out
    return shape[:n_layers], shape[n_layers:n_layers + n_in], shape[n_layers + n_in:]


def init_lora(rng: jax.Array, params: Params, *, patterns: Sequence[str], rank: int) -> dict[str, dict[str, jax.Array]]:
    """{kernel name: {"a": [layers.., in.., rank], "b": [layers.., rank, out..]}}; b = 0, so the
    adapted model starts equal to the base (LoRA, Hu et al. 2021).

    The token embedding is the other way round, as in Hugging Face PEFT: a [vocab, rank] = 0 and
    b [rank, embed] ~ N(0, 1). Its "input" is a one-hot token, so a scaled by 1/sqrt(vocab)
    would make the updates of b vanishingly small; a zero a gets a gradient from b at once.
    """
    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}.")
    names = dict(zip(jax.tree_util.tree_leaves(param_names(params)), jax.tree_util.tree_leaves(params), strict=True))
    chosen = {n: p for n, p in names.items() if _matches(n, patterns)}
    if not chosen:
        raise UserError(f"No parameter matches the LoRA patterns {list(patterns)}; names look like "
                        f"{sorted(names)[:4]}.")
    lora = {}
    for i, (name, kernel) in enumerate(sorted(chosen.items())):
        layers, ins, outs = _split_kernel_shape(name, tuple(kernel.shape))
        key = jax.random.fold_in(rng, i)
        if name.rsplit("/", 1)[-1] == "embedding":
            lora[name] = {"a": jnp.zeros((*layers, *ins, rank), jnp.float32),
                          "b": jax.random.normal(key, (*layers, rank, *outs), jnp.float32)}
            continue
        a = jax.random.normal(key, (*layers, *ins, rank), jnp.float32) / np.sqrt(int(np.prod(ins)))
        lora[name] = {"a": a, "b": jnp.zeros((*layers, rank, *outs), jnp.float32)}
    return lora


def lora_delta(factors: dict[str, jax.Array], *, num_layer_dims: int, alpha: float, rank: int) -> jax.Array:
    """(alpha / rank) * a b: a [L.., I.., r] times b [L.., r, O..] -> [L.., I.., O..] (L: layer dims)."""
    a, b = factors["a"], factors["b"]
    lead = a.shape[:num_layer_dims]
    delta = jnp.einsum("...ir,...ro->...io", a.reshape(lead + (-1, rank)), b.reshape(lead + (rank, -1)))
    return (alpha / rank) * delta.reshape(a.shape[:-1] + b.shape[num_layer_dims + 1:])


def merge_lora(params: Params, lora: dict[str, dict[str, jax.Array]], *, alpha: float, rank: int) -> Params:
    """Base params with W + (alpha / rank) a b on every adapted kernel (also the export merge)."""

    def merge(name: str, p: jax.Array) -> jax.Array:
        if name not in lora:
            return p
        layers, _, _ = _split_kernel_shape(name, tuple(p.shape))
        return p + lora_delta(lora[name], num_layer_dims=len(layers), alpha=alpha, rank=rank).astype(p.dtype)

    return jax.tree_util.tree_map(merge, param_names(params), params)


# --- Weight quantization ----------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedTensor:
    """Symmetric blockwise integer weights: value ~= codes * scale.

    A block is consecutive values of the last dimension (block_size of them, or the whole
    dimension if it is shorter; a last block that does not fill up is zero-padded). The other
    dimensions keep their layout, so the codes can be sharded like the float weights
    (finetune.LoraAdaptation.state_shardings) and dequantizing needs no communication.
    """

    codes: jax.Array  # int8 [..., n_blocks, block] (int4 values stored in int8)
    scale: jax.Array  # float32 [..., n_blocks, 1]
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    bits: int = dataclasses.field(metadata={"static": True})

    def nbytes(self) -> int:
        """Storage with int4 packed two per byte, as a serving format would hold it."""
        return self.codes.size * self.bits // 8 + self.scale.size * 4


def quantize_tensor(x: jax.Array, *, bits: int, block_size: int) -> QuantizedTensor:
    if bits not in (4, 8):
        raise UserError(f"Weight quantization supports 4 or 8 bits, got {bits}.")
    q_max = 2 ** (bits - 1) - 1
    shape, x = tuple(x.shape), jnp.atleast_1d(x)
    block = min(block_size, x.shape[-1])
    pad = (-x.shape[-1]) % block
    blocks = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, block)
    scale = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / q_max
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round(blocks / scale), -q_max, q_max).astype(jnp.int8)
    return QuantizedTensor(codes, scale.astype(jnp.float32), shape, bits)


def dequantize_tensor(q: QuantizedTensor) -> jax.Array:
    values = (q.codes.astype(jnp.float32) * q.scale).reshape(*q.codes.shape[:-2], -1)
    return values[..., : q.shape[-1] if q.shape else 1].reshape(q.shape)


def quantize(params: Params, *, bits: int, block_size: int = 64, min_size: int = 4096) -> Params:
    """Quantizes every parameter with at least `min_size` elements (kernels, embeddings);
    norms and small tables stay float32."""
    return jax.tree_util.tree_map(
        lambda p: quantize_tensor(p, bits=bits, block_size=block_size) if p.size >= min_size else p, params)


def dequantize(params: Params) -> Params:
    return jax.tree_util.tree_map(lambda p: dequantize_tensor(p) if isinstance(p, QuantizedTensor) else p, params,
                                  is_leaf=lambda p: isinstance(p, QuantizedTensor))


def nbytes(params: Params) -> int:
    """Bytes held by params, quantized tensors at their packed size."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda p: isinstance(p, QuantizedTensor))
    return sum(p.nbytes() if isinstance(p, QuantizedTensor) else p.size * p.dtype.itemsize for p in leaves)
