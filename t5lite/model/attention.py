"""Attention kernels for training and teacher-forced forward passes (TransformerConfig.attention_impl).

    "xla"                    t5lite's einsum attention (layers.MultiHeadAttention): the reference and the
                             CPU path. Each stack builds one additive float32 bias [batch, heads, q, k]
                             (relative position bias + MASK_VALUE where attention is not allowed).
    "dot_product_attention"  jax.nn.dot_product_attention with implementation=None: jax picks the kernel
                             (jax 0.10 picks its own XLA path on every backend; cuDNN only when asked).
    "cudnn"                  jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention
                             on an NVIDIA GPU, bfloat16 / float16 only.

The kernels get the parts of the pattern separately (AttentionBias, built once per stack): T5's relative
position bias as `bias` [1, heads, q, k], the segment-id (packing, padding) mask as a boolean `mask`
[batch, 1, q, k], and causality as `is_causal` where nothing else (a prefix-LM prefix) breaks it, so a
kernel can skip the hidden half. The logit scale is 1: T5 folds 1/sqrt(head_dim) into the query init,
and the rope family scales the queries before they get here (as in "xla").

Decoding with the KV cache always takes the einsum path: a step has one query per row, which a flash
kernel does not speed up, and the cache is kept [batch, heads, length, kv] for those einsums while
jax.nn.dot_product_attention takes [batch, length, heads, kv].
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from t5lite.errors import UserError

Array = jax.Array

IMPLEMENTATIONS = ("xla", "dot_product_attention", "cudnn")


@flax.struct.dataclass
class AttentionBias:
    """What a stack's layers pass to a kernel instead of the "xla" path's additive bias.

    bias: [1, heads, q, k] float32 added to the logits (T5's relative position bias), or None.
    mask: [batch, 1, q, k] bool, True where a query may attend to a key, or None.
    is_causal: keys after the query are hidden too (on top of `mask`).
    implementation: "dot_product_attention" or "cudnn" (TransformerConfig.attention_impl).
    """

    bias: Array | None
    mask: Array | None
    is_causal: bool = flax.struct.field(pytree_node=False, default=False)
    implementation: str = flax.struct.field(pytree_node=False, default="dot_product_attention")

    def additive(self, q_len: int, k_len: int, mask_value: float) -> Array:
        """The same pattern as one additive float32 bias [batch|1, heads|1, q_len, k_len] (the einsum
        path's), for attention dropout, which the kernels lack."""
        allowed = jnp.ones((1, 1, q_len, k_len), bool) if self.mask is None else self.mask
        if self.is_causal:
            allowed = allowed & jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]
        mask_bias = jnp.where(allowed, 0.0, mask_value).astype(jnp.float32)
        return mask_bias if self.bias is None else self.bias + mask_bias


def dot_product_attention(q: Array, k: Array, v: Array, pattern: AttentionBias) -> Array:
    """q [batch, q_len, heads, kv], k and v [batch, k_len, kv_heads, kv] -> context [batch, q_len, heads, kv].

    kv_heads divides heads: query head i reads key/value head i // (heads // kv_heads), t5lite's and
    jax's grouping alike, so grouped keys and values are passed as they are, never repeated.
    """
    bias = pattern.bias
    implementation = None if pattern.implementation == "dot_product_attention" else pattern.implementation
    if implementation == "cudnn":
        check_cudnn_backend()
        bias = None if bias is None else bias.astype(q.dtype)  # cuDNN adds the bias in the inputs' dtype
    try:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=pattern.mask, scale=1.0,
                                            is_causal=pattern.is_causal, implementation=implementation)
    except NotImplementedError as e:  # cuDNN's own limits (dtype, head_dim, lengths, GPU generation)
        raise UserError(f"TransformerConfig.attention_impl='cudnn': cuDNN flash attention does not take these "
                        f"inputs ({e}); use attention_impl='dot_product_attention' or 'xla'.") from e


def check_cudnn_backend() -> None:
    """Raises UserError unless jax runs on a CUDA GPU (cuDNN's kernels exist nowhere else)."""
    backend = jax.default_backend()
    if backend != "gpu":
        raise UserError(f"TransformerConfig.attention_impl='cudnn' needs an NVIDIA GPU, and jax runs on {backend!r}; "
                        "use attention_impl='dot_product_attention' (any backend) or 'xla'.")
