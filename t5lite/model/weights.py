"""Weights the network reads in another form than a float array, made float where a layer uses them.

    QuantizedTensor   blockwise int8 / int4 / NF4 codes with a float32 scale per block (t5lite.peft.quantize)
    LowRankUpdate     a kernel (float or quantized) plus scale * a b, its LoRA factors (t5lite.adaptation)

Model.logits takes params holding either. The leaves outside the scanned layer stack are made float
once per call (materialize); those of the scanned stack inside the scan body, one layer at a time
(network.run_layers wraps the layer in materialize_layer), so a train step never holds the whole
model's float kernels: at most one layer's. materialize_layer is checkpointed, so the backward pass
recomputes a layer's float kernels from its codes and factors instead of keeping every layer's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

Array = jax.Array
Params = Any

CODEBOOKS = ("int", "nf4")


def normal_float_codebook(offset: float = 0.9677083) -> np.ndarray:
    """NormalFloat4 (QLoRA, Dettmers et al. 2023): 16 values in [-1, 1] with an exact 0.

    8 quantiles of N(0, 1) for the positive half, 7 for the negative half (so 0 is a code), taken at
    evenly spaced probabilities from 0.5 to `offset` and divided by the largest: bitsandbytes'
    create_normal_map(offset=0.9677083, use_extra_value=True)."""
    positive = ndtri(np.linspace(offset, 0.5, 9)[:-1])
    negative = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return (values / values.max()).astype(np.float32)


NF4_VALUES = normal_float_codebook()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedTensor:
    """Symmetric blockwise weights: value ~= codebook(codes) * scale.

    A block is consecutive values of the last dimension (block_size of them, or the whole
    dimension if it is shorter; a last block that does not fill up is zero-padded). The other
    dimensions keep their layout, so the codes can be sharded like the float weights
    (adaptation.LoraAdaptation.state_shardings), dequantizing needs no communication, and a scan
    over the leading "layers" dimension slices codes and scales alike.

    codebook "int": codes are the integers -(2^(bits-1) - 1) .. 2^(bits-1) - 1 and scale is the
    block's absmax / 2^(bits-1) - 1; "nf4": codes index NF4_VALUES and scale is the block's absmax.
    """

    codes: jax.Array  # int8 [..., n_blocks, block] (4-bit codes stored one per int8)
    scale: jax.Array  # float32 [..., n_blocks, 1]
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})  # of the whole (unsliced) tensor
    bits: int = dataclasses.field(metadata={"static": True})
    codebook: str = dataclasses.field(default="int", metadata={"static": True})

    def nbytes(self) -> int:
        """Storage with 4-bit codes packed two per byte, as a serving format would hold it."""
        return self.codes.size * self.bits // 8 + self.scale.size * 4


def dequantize_tensor(q: QuantizedTensor) -> Array:
    """Float32 values of `q`, [..., last] with the codes' leading dimensions (a scan's slice of a
    stacked tensor drops the layers dimension of q.shape)."""
    if q.codebook == "nf4":
        values = jnp.take(jnp.asarray(NF4_VALUES), q.codes.astype(jnp.int32)) * q.scale
    else:
        values = q.codes.astype(jnp.float32) * q.scale
    if not q.shape:
        return values.reshape(())
    values = values.reshape(*q.codes.shape[:-2], -1)
    return values[..., : q.shape[-1]]


def low_rank_delta(a: Array, b: Array, *, num_input_dims: int, scale: float) -> Array:
    """scale * a b: a [L.., in.., rank] times b [L.., rank, out..] -> [L.., in.., out..] (L: layer dims)."""
    rank = a.shape[-1]
    lead = a.shape[: a.ndim - 1 - num_input_dims]
    delta = jnp.einsum("...ir,...ro->...io", a.reshape(lead + (-1, rank)), b.reshape(lead + (rank, -1)))
    return scale * delta.reshape(a.shape[:-1] + b.shape[len(lead) + 1:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LowRankUpdate:
    """kernel + scale * a b (LoRA). kernel: a float array or a QuantizedTensor; a [L.., in.., rank] and
    b [L.., rank, out..] share the kernel's leading layer dims L (a scan slices all three alike)."""

    kernel: Any
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})
    num_input_dims: int = dataclasses.field(metadata={"static": True})


def _is_stored(x: Any) -> bool:
    return isinstance(x, QuantizedTensor | LowRankUpdate)


def _to_float(x: Any) -> Any:
    if isinstance(x, QuantizedTensor):
        return dequantize_tensor(x)
    if isinstance(x, LowRankUpdate):
        kernel = _to_float(x.kernel)
        return kernel + low_rank_delta(x.a, x.b, num_input_dims=x.num_input_dims, scale=x.scale).astype(kernel.dtype)
    return x


def has_stored(params: Params) -> bool:
    """Whether `params` hold any QuantizedTensor or LowRankUpdate."""
    return any(_is_stored(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_stored))


def materialize(params: Params, *, except_under: str | None = None) -> Params:
    """`params` with every QuantizedTensor / LowRankUpdate made a float array (other leaves as they are);
    leaves under a key named `except_under` (the scanned stack's "layers") are left for the layer."""
    def to_float(path, x):
        if except_under is not None and any(getattr(k, "key", None) == except_under for k in path):
            return x
        return _to_float(x)

    return jax.tree_util.tree_map_with_path(to_float, params, is_leaf=_is_stored)


# Nothing saved: the backward pass recomputes the float kernels from the codes and factors, so no
# stacked [layers, ...] float copy outlives the layer that uses it.
_materialize_recomputed = jax.checkpoint(materialize, policy=jax.checkpoint_policies.nothing_saveable,
                                         prevent_cse=False)  # inside a scan, which already blocks CSE


def materialize_layer(params: Params) -> Params:
    """One layer's params made float inside its scan body (flax map_variables' trans_in_fn)."""
    return _materialize_recomputed(params) if has_stored(params) else params
