"""Parameter-efficient fine-tuning as parameter transforms: freezing, LoRA, weight quantization.

All three act on the params pytree (the network reads quantized and LoRA-updated kernels through
t5lite.model.weights, layer by layer inside a scanned stack):

    labels = trainable_labels(params, trainable=[r"decoder/"])            # freeze all but the decoder
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

    lora = init_lora(rng, params, patterns=[r"attention/(query|value)$"], rank=8)
    loss(merge_lora(params, lora, alpha=16, rank=8), batch)               # grads flow to `lora` only

    q = quantize(params, bits=4, block_size=64, codebook="nf4")           # NF4 base for QLoRA
    loss(merge_lora(dequantize(q), lora, ...), batch)                     # or: adaptation.LoraAdaptation

Parameter names are "/"-joined paths such as "encoder/layers/attention/query" (scanned layers
keep their leading [layers] axis; LoRA factors get it too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5lite.errors import UserError
from t5lite.model.weights import CODEBOOKS, NF4_VALUES, QuantizedTensor, dequantize_tensor, low_rank_delta

Params = Any

# How many leading (non-"layers") dims of each kernel are contracted with the activation (the
# token embedding [vocab, embed]: its row index, the token id).
KERNEL_INPUT_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "wi_0": 1, "wi_1": 1, "wo": 1, "logits_dense": 1,
                     "embedding": 1}


def is_quantized(x: Any) -> bool:
    """A QuantizedTensor: one leaf of a params tree (is_leaf of the tree functions here)."""
    return isinstance(x, QuantizedTensor)


def param_names(params: Params) -> Params:
    """A pytree like params holding each leaf's "/"-joined path (a QuantizedTensor is one leaf)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params, is_leaf=is_quantized)


def named_params(params: Params) -> dict[str, Any]:
    """{name: leaf} of a params-shaped tree (params, their shardings, ...), a QuantizedTensor one leaf."""
    names = jax.tree_util.tree_leaves(param_names(params))
    return dict(zip(names, jax.tree_util.tree_leaves(params, is_leaf=is_quantized), strict=True))


def params_matching(params: Params, patterns: Sequence[str]) -> dict[str, jax.Array]:
    """{name: param} of the params whose names match any of the regexes `patterns`."""
    return {n: p for n, p in named_params(params).items() if _matches(n, patterns)}


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
    return low_rank_delta(a, b, num_input_dims=a.ndim - 1 - num_layer_dims, scale=alpha / rank)


def merge_lora(params: Params, lora: dict[str, dict[str, jax.Array]], *, alpha: float, rank: int) -> Params:
    """Base params with W + (alpha / rank) a b on every adapted kernel (also the export merge)."""

    def merge(name: str, p: jax.Array) -> jax.Array:
        if name not in lora:
            return p
        layers, _, _ = _split_kernel_shape(name, tuple(p.shape))
        return p + lora_delta(lora[name], num_layer_dims=len(layers), alpha=alpha, rank=rank).astype(p.dtype)

    return jax.tree_util.tree_map(merge, param_names(params), params)


# --- Weight quantization ----------------------------------------------------------------------------
# QuantizedTensor and its dequantization live with the model (model/weights.py), which reads them.

def quantize_tensor(x: jax.Array, *, bits: int, block_size: int, codebook: str = "int") -> QuantizedTensor:
    """Blockwise absmax quantization along the last dimension (see QuantizedTensor).

    codebook "int": round(x / scale) with scale = absmax / (2^(bits-1) - 1); "nf4" (bits=4): the
    nearest NormalFloat4 value (NF4_VALUES) to x / absmax, QLoRA's code for normally distributed weights.
    """
    if bits not in (4, 8):
        raise UserError(f"Weight quantization supports 4 or 8 bits, got {bits}.")
    if codebook not in CODEBOOKS or (codebook == "nf4" and bits != 4):
        raise UserError(f"Quantization codebook {codebook!r} with {bits} bits: use 'int' (8 or 4 bits) or "
                        "'nf4' (4 bits).")
    shape, x = tuple(x.shape), jnp.atleast_1d(x)
    block = min(block_size, x.shape[-1])
    pad = (-x.shape[-1]) % block
    blocks = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    if codebook == "nf4":
        scale = jnp.where(absmax == 0, 1.0, absmax)
        # The nearest code: count the midpoints between neighbouring values that lie below x / absmax.
        midpoints = jnp.asarray((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)
        codes = jnp.searchsorted(midpoints, blocks / scale).astype(jnp.int8)
        return QuantizedTensor(codes, scale.astype(jnp.float32), shape, bits, codebook)
    q_max = 2 ** (bits - 1) - 1
    scale = absmax / q_max
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = jnp.clip(jnp.round(blocks / scale), -q_max, q_max).astype(jnp.int8)
    return QuantizedTensor(codes, scale.astype(jnp.float32), shape, bits)


def quantize(params: Params, *, bits: int, block_size: int = 64, min_size: int = 4096, codebook: str = "int") -> Params:
    """Quantizes every parameter with at least `min_size` elements (kernels, embeddings);
    norms and small tables stay float32."""
    return jax.tree_util.tree_map(
        lambda p: quantize_tensor(p, bits=bits, block_size=block_size, codebook=codebook) if p.size >= min_size
        else p, params)


def dequantize(params: Params) -> Params:
    """Every QuantizedTensor of `params` as float32 (the whole model at once; Model.logits instead
    dequantizes a scanned stack layer by layer)."""
    return jax.tree_util.tree_map(lambda p: dequantize_tensor(p) if is_quantized(p) else p, params,
                                  is_leaf=is_quantized)


def nbytes(params: Params) -> int:
    """Bytes held by params, quantized tensors at their packed size."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized)
    return sum(p.nbytes() if isinstance(p, QuantizedTensor) else p.size * p.dtype.itemsize for p in leaves)
