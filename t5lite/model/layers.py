"""Building blocks of a T5 v1.1 or Llama Transformer, each parameter annotated with logical axis names.

Logical axes used here: batch, length, embed, mlp, heads, kv, vocab, relpos_buckets (and
"layers", added by nn.scan in network.py). Mesh axes are never named in model code. Key/value
heads of grouped-query attention are "heads" too: a tensor-parallel mesh splits query and
key/value heads alike, so each shard holds whole groups (its size must divide num_kv_heads).
Parameters are float32; matmuls run in the configured compute dtype; norms, softmax and
attention biases are float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model import attention, init_schemes

Array = jax.Array
Initializer = Callable[..., Array]

# Added to attention logits where attention is not allowed: large but finite, so a fully
# masked row (a padding query) gives a uniform softmax instead of NaN.
MASK_VALUE = -1e10


def logical_param(
    module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str]
) -> Array:
    """A float32 parameter carrying logical axis names (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(shape)} dims but axes {axes}")
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


def constrain(x: Array, axes: Sequence[str]) -> Array:
    """Shards an activation by logical axes (a no-op outside a mesh / axis-rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no bias, no mean subtraction; computed in float32."""

    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        return (x32 * jax.lax.rsqrt(variance + self.epsilon) * scale).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    init_stddev: float = 1.0

    def setup(self):
        self.embedding = logical_param(
            self, "embedding", nn.initializers.normal(stddev=self.init_stddev),
            (self.num_embeddings, self.features), ("vocab", "embed"),
        )

    def __call__(self, tokens: Array) -> Array:
        """[batch, length] int -> [batch, length, embed]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """[batch, length, embed] -> [batch, length, vocab]."""
        return jnp.einsum("ble,ve->blv", x, self.embedding.astype(self.dtype))


def project(x: Array, kernels: Sequence[Array], *, dtype: jnp.dtype, fused: bool) -> list[Array]:
    """x [batch, length, embed] times each kernel [embed, ...] -> [batch, length, ...] each.

    fused: one matmul over the kernels stacked on a new axis (a sharded kernel stays sharded, no
    communication). Decoding uses it: on CPU a step's [8, 512] x [512, 3 * 384] takes about half
    the time of three [512, 384] products, too small to run at memory bandwidth. Training does
    not: XLA:CPU builds the stacked output's gradient with a slow pad-and-add (the scanned
    T5-small train step was 6-8% slower fused).
    """
    x = x.astype(dtype)
    if not fused or len(kernels) == 1:
        return [jnp.einsum("ble,e...->bl...", x, kernel.astype(dtype)) for kernel in kernels]
    stacked = jnp.stack([kernel.astype(dtype) for kernel in kernels], axis=1)  # [embed, n, ...]
    y = jnp.einsum("ble,en...->bln...", x, stacked)
    return [y[:, :, i] for i in range(len(kernels))]


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(head_dim) on the logits (folded into the query init), no biases.

    Llama attention (scale_logits, `rotary`, num_kv_heads): queries are scaled by head_dim**-0.5 in
    compute, queries and keys are rotated by `rotary` (cos, sin of rotary_embedding; keys before
    they are cached), and num_kv_heads < num_heads shares each key/value head among num_heads /
    num_kv_heads consecutive query heads (grouped-query attention; Hugging Face's repeat_kv order).
    Keys and values, and their cache, have num_kv_heads heads: they are never repeated per query head.

    `bias` [batch|1, heads|1, q_len, k_len] (float32) carries both the relative position bias and
    the mask (MASK_VALUE where not allowed); it is built once per stack by the caller. With
    TransformerConfig.attention_impl other than "xla", training and teacher-forced passes get an
    attention.AttentionBias instead (the parts apart) and run that kernel; decoding never does.

    With `decode=True` keys and values live in the flax "cache" collection, [batch, kv_heads, k_len,
    kv] each: heads before length, so that the per-step attention matmuls read the cache as it is
    stored (in [batch, k_len, heads, kv] XLA:CPU copied every layer's cross-attention keys and
    values into that order at every step, ~60% of a T5-small decode step). The first call (an
    init with the full decode length) only creates the cache.
      self-attention (`cache_index` given): the q_len new positions' keys/values are written at
        cache_index..cache_index+q_len-1 and the queries attend over the whole cache (k_len =
        cache length; the caller's bias masks the future).
      cross-attention (`cache_index` None): keys/values of `inputs_kv` (the encoder output) are
        computed and cached when it is given; a call with inputs_kv=None reuses them, so they
        are computed once per sequence, not at every step.
    Decoding also projects what shares an input with one matmul (`project`): q, k and v when
    `inputs_kv is inputs_q` (self-attention; q apart from k and v when they have fewer heads), k and
    v of the encoder output.
    """

    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    decode: bool = False
    num_kv_heads: int | None = None  # None: num_heads
    scale_logits: bool = False
    inits: init_schemes.ParamInits | None = None  # None: T5's (init_schemes.t5)

    @nn.compact
    def __call__(
        self, inputs_q: Array, inputs_kv: Array | None, bias: Array, deterministic: bool,
        cache_index: Array | None = None, rotary: tuple[Array, Array] | None = None,
    ) -> Array:
        emb = inputs_q.shape[-1]
        h, d = self.num_heads, self.head_dim
        kv_h = self.num_kv_heads or h
        inits = self.inits or init_schemes.t5(d, self.scale_logits)
        wq = logical_param(self, "query", inits.query, (emb, h, d), ("embed", "heads", "kv"))
        wk = logical_param(self, "key", inits.key, (emb, kv_h, d), ("embed", "heads", "kv"))
        wv = logical_param(self, "value", inits.value, (emb, kv_h, d), ("embed", "heads", "kv"))
        wo = logical_param(self, "out", inits.out, (h, d, emb), ("heads", "kv", "embed"))

        dt = self.dtype
        # Keys and values [batch, k_len, heads, kv] in training; [batch, heads, k_len, kv] when decoding.
        kv_axes = ("batch", "heads", "length", "kv") if self.decode else ("batch", "length", "heads", "kv")

        def project_kv(x: Array, *kv: Array) -> tuple[Array, Array]:
            # Projected as [batch, k_len, heads, kv] (a plain matmul; projecting straight into
            # "bhkd" made XLA:CPU transpose the weights at every decode step), then reordered.
            k, v = kv or project(x, (wk, wv), dtype=dt, fused=self.decode)
            if rotary is not None:
                k = apply_rotary(k, *rotary)
            if self.decode:
                k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            return constrain(k, kv_axes), constrain(v, kv_axes)

        if inputs_kv is inputs_q and kv_h == h:  # self-attention
            q, *kv = project(inputs_q, (wq, wk, wv), dtype=dt, fused=self.decode)
        elif inputs_kv is inputs_q:  # grouped: k and v have fewer heads than q
            (q,), kv = project(inputs_q, (wq,), dtype=dt, fused=False), project(inputs_q, (wk, wv), dtype=dt,
                                                                               fused=self.decode)
        else:
            (q,), kv = project(inputs_q, (wq,), dtype=dt, fused=self.decode), ()
        if rotary is not None:
            q = apply_rotary(q, *rotary)
        if self.scale_logits:
            q = q * jnp.asarray(d ** -0.5, dt)
        q = constrain(q, ("batch", "length", "heads", "kv"))
        if not self.decode:
            k, v = project_kv(inputs_kv, *kv)
        elif cache_index is not None:
            k, v = self._append_to_cache(*project_kv(inputs_kv, *kv), cache_index)
        else:
            k, v = self._cached_encoder_kv(inputs_kv, project_kv)

        b, q_len = q.shape[:2]
        dropout = not deterministic and self.dropout_rate > 0.0
        if isinstance(bias, attention.AttentionBias) and not dropout:  # a kernel (attention_impl; never decoding)
            context = attention.dot_product_attention(q, k, v, bias)
        else:  # the kernels have no attention dropout: the einsums take their pattern as one additive bias
            if isinstance(bias, attention.AttentionBias):
                bias = bias.additive(q_len, k.shape[1], MASK_VALUE)
            context = self._einsum_attention(q, k, v, bias, dropout)
        # One contraction over heads*kv in memory order: jnp.einsum("bqhd,hde->bqe") contracts
        # (kv, heads), and XLA:CPU then transposes both the context and `out` at every call.
        out = jnp.einsum("bqf,fe->bqe", context.reshape(b, q_len, h * d), wo.astype(dt).reshape(h * d, emb))
        return constrain(out, ("batch", "length", "embed"))

    def _einsum_attention(self, q: Array, k: Array, v: Array, bias: Array, dropout: bool) -> Array:
        """The "xla" attention (and every decoding step's): q [batch, q_len, heads, kv], k and v [batch, k_len,
        kv_heads, kv] ([batch, kv_heads, k_len, kv] when decoding), bias [batch|1, heads|1, q_len, k_len]
        -> context [batch, q_len, heads, kv] ([batch, q_len, kv_heads, group, kv] when grouped)."""
        b, q_len, h, d = q.shape
        kv_layout = "bhkd" if self.decode else "bkhd"
        kv_h = k.shape[1 if self.decode else 2]
        if kv_h == h:
            logits = jnp.einsum(f"bqhd,{kv_layout}->bhqk", q, k)
        else:  # query heads [kv_heads, group]: head i reads key/value head i // group
            q = q.reshape(b, q_len, kv_h, h // kv_h, d)
            logits = jnp.einsum(f"bqhgd,{kv_layout}->bhgqk", q, k).reshape(b, h, q_len, -1)
        logits = logits.astype(jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if dropout:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        if kv_h == h:
            return jnp.einsum(f"bhqk,{kv_layout}->bqhd", weights, v)
        return jnp.einsum(f"bhgqk,{kv_layout}->bqhgd", weights.reshape(b, kv_h, h // kv_h, q_len, -1), v)

    def _append_to_cache(self, k: Array, v: Array, cache_index: Array) -> tuple[Array, Array]:
        """Writes k, v [batch, kv_heads, q_len, kv] at cache_index (a scalar, or [batch]: each row at its
        own position); -> the whole cache [batch, kv_heads, k_len, kv]."""
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not is_initialized:  # the init call only sizes the cache
            return k, v
        cache_index = jnp.asarray(cache_index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        if cache_index.ndim == 1:  # [batch] per-row positions (continuous batching): one write per row
            def write(cache, new):
                return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (zero, i, zero)))(
                    cache, new.astype(cache.dtype), cache_index)
        else:
            def write(cache, new):
                return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (zero, zero, cache_index, zero))
        cached_key.value = write(cached_key.value, k)
        cached_value.value = write(cached_value.value, v)
        return cached_key.value, cached_value.value

    def _cached_encoder_kv(
        self, encoded: Array | None, project_kv: Callable[[Array], tuple[Array, Array]]
    ) -> tuple[Array, Array]:
        """Cross-attention keys/values: computed from `encoded` and cached, or read from the cache."""
        if encoded is None:
            return self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
        k, v = project_kv(encoded)
        self.put_variable("cache", "cached_key", k)
        self.put_variable("cache", "cached_value", v)
        return k, v


def gated_activation(activation: Callable[[Array], Array]) -> Callable[[Array, Array], Array]:
    """(gate, linear) -> activation(gate) * linear, [..., mlp] each, with a VJP that saves only the inputs.

    The same values and gradients as autodiff of that expression (bitwise, on CPU); the custom
    VJP saves only the two inputs for the backward pass and recomputes the activation there.
    Autodiff saves ~6 GELU intermediates per layer, and XLA:CPU fuses reading them all (stacked
    over the scanned layers) into the transposing copy the weight-gradient matmul needs: the
    slowest op of a T5 training step on CPU (bench/profile_summary.py).
    """
    @jax.custom_vjp
    def gated(gate: Array, linear: Array) -> Array:
        return activation(gate) * linear

    def forward(gate: Array, linear: Array) -> tuple[Array, tuple[Array, Array]]:
        return gated(gate, linear), (gate, linear)

    def backward(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
        gate, linear = residuals
        activated, activation_vjp = jax.vjp(activation, gate)
        (d_gate,) = activation_vjp(g * linear)
        return d_gate, g * activated

    gated.defvjp(forward, backward)
    return gated


# T5 v1.1: tanh-approximate GELU. Llama (SwiGLU): SiLU.
gated_gelu = gated_activation(lambda x: jax.nn.gelu(x, approximate=True))
gated_silu = gated_activation(jax.nn.silu)


class GatedMlp(nn.Module):
    """Gated feed-forward without biases: wo(act(x wi_0) * (x wi_1)); act "gelu" (T5 v1.1's gated
    GELU) or "silu" (Llama's SwiGLU: wi_0, wi_1, wo are its gate_proj, up_proj, down_proj)."""

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    fused_wi: bool = False  # wi_0 and wi_1 as one matmul (decoding; see `project`)
    activation: str = "gelu"
    inits: init_schemes.ParamInits | None = None  # wi, wo; None: T5's (init_schemes.t5)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        emb = x.shape[-1]
        inits = self.inits or init_schemes.t5(head_dim=1, scale_logits=False)  # (wi, wo: no head_dim)
        wi_0 = logical_param(self, "wi_0", inits.wi, (emb, self.mlp_dim), ("embed", "mlp"))
        wi_1 = logical_param(self, "wi_1", inits.wi, (emb, self.mlp_dim), ("embed", "mlp"))
        wo = logical_param(self, "wo", inits.wo, (self.mlp_dim, emb), ("mlp", "embed"))
        dt = self.dtype
        gated = gated_gelu if self.activation == "gelu" else gated_silu
        hidden = gated(*project(x, (wi_0, wi_1), dtype=dt, fused=self.fused_wi))
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        # Dropout on the hidden units, broadcast over length as in T5X.
        hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
        out = jnp.einsum("blm,me->ble", hidden, wo.astype(dt))
        return constrain(out, ("batch", "length", "embed"))


def segment_positions(segment_ids: Array) -> Array:
    """[batch, length] -> each token's position inside its packed segment (0 at a segment's start).

    A segment is a run of equal ids (seqio packs each example contiguously); padding runs count too
    but are masked anyway.
    """
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    starts = jnp.where(segment_ids != previous, index, 0)
    return index - jax.lax.cummax(starts, axis=1)


def rotary_embedding(positions: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """RoPE angles for positions [batch|1, length]: (cos, sin), each [batch|1, length, 1, head_dim // 2]
    float32 (the 1 broadcasts over heads).

    Pair i of a head, (x_i, x_{i + head_dim/2}) (the rotate-half layout of Hugging Face Llama, so its
    weights need no permutation), turns by position * base**(-2i / head_dim), computed in float32 as
    transformers computes it.
    """
    inv_freq = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x [batch, length, heads, head_dim] by rotary_embedding's (cos, sin), in float32:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves x1, x2 of each head."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of (key_position - query_position) into `num_buckets` ids.

    Half the buckets (per direction, if bidirectional) hold exact small distances; the rest grow
    logarithmically up to `max_distance`, beyond which all distances share the last bucket.
    Causal (not bidirectional) maps every future position (relative_position > 0) to bucket 0.
    """
    ret = np.zeros_like(relative_position, dtype=np.int32)
    n = -np.asarray(relative_position)
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # np.maximum(n, 1) only keeps log() finite where the small branch is taken anyway.
    val_if_large = max_exact + (
        np.log(np.maximum(n, 1) / max_exact) / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large).astype(np.int32)


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by relative-position bucket; one table per stack."""

    num_heads: int
    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128

    @nn.compact
    def __call__(self, q_len: int, k_len: int, q_offset: int | Array = 0) -> Array:
        """-> [1, heads, q_len, k_len] float32 bias for queries at positions q_offset + arange(q_len).

        Positions are those inside a packed segment: tokens of a segment are contiguous, so
        relative positions within a segment equal arange differences and one table serves all
        examples; cross-segment pairs are masked by the caller. A traced q_offset (a decode step)
        needs q_offset + q_len <= k_len. A [batch] q_offset (rows at their own positions, continuous
        batching) gives [batch, heads, q_len, k_len].
        """
        k_pos = np.arange(k_len, dtype=np.int32)[None, :]
        if isinstance(q_offset, int):
            q_pos = np.arange(q_len, dtype=np.int32)[:, None] + q_offset
        else:  # bucket every query position of the cache, then slice the rows of this step
            q_pos = np.arange(k_len, dtype=np.int32)[:, None]
        buckets = relative_position_bucket(
            k_pos - q_pos, bidirectional=self.bidirectional,
            num_buckets=self.num_buckets, max_distance=self.max_distance,
        )
        per_row = not isinstance(q_offset, int) and jnp.ndim(q_offset) == 1
        if per_row:  # [batch, q_len, k_len]: each row's query positions
            buckets = jnp.asarray(buckets)[jnp.asarray(q_offset)[:, None] + jnp.arange(q_len)[None]]
        elif not isinstance(q_offset, int):
            buckets = jax.lax.dynamic_slice_in_dim(jnp.asarray(buckets), q_offset, q_len, axis=0)
        table = logical_param(
            self, "rel_embedding",
            nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"),
        )
        if per_row:
            return jnp.moveaxis(jnp.take(table, buckets, axis=1), 0, 1)
        return jnp.take(table, jnp.asarray(buckets), axis=1)[None]


def attention_mask_bias(
    q_segment_ids: Array, k_segment_ids: Array, *, causal: bool = False, prefix: Array | None = None
) -> Array:
    """Additive mask [batch, 1, q, k]: 0 where allowed, MASK_VALUE elsewhere (float32); see attention_mask."""
    allowed = attention_mask(q_segment_ids, k_segment_ids, causal=causal, prefix=prefix)
    return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)


def attention_mask(
    q_segment_ids: Array, k_segment_ids: Array, *, causal: bool = False, prefix: Array | None = None
) -> Array:
    """[batch, 1, q, k] bool, True where a query may attend to a key.

    Segment id 0 marks padding. Queries attend only to keys of their own (non-padding) segment,
    so packed examples never see each other. `causal` hides later keys; `prefix` [batch, q]
    (1 on the prefix-LM inputs) lets prefix positions see each other both ways.
    """
    allowed = (q_segment_ids[:, :, None] == k_segment_ids[:, None, :]) & (k_segment_ids[:, None, :] != 0)
    if causal:
        q_len, k_len = q_segment_ids.shape[1], k_segment_ids.shape[1]
        visible = jnp.arange(k_len)[None, None, :] <= jnp.arange(q_len)[None, :, None]
        if prefix is not None:
            prefix = prefix.astype(bool)
            visible = visible | (prefix[:, :, None] & prefix[:, None, :])
        allowed = allowed & visible
    return allowed[:, None]


def decode_mask_bias(q_len: int, cache_length: int, cache_index: Array, prefix_lengths: Array | None = None) -> Array:
    """Causal mask [1, 1, q_len, cache_length] for queries at cache_index + arange(q_len) (float32).

    With prefix_lengths [batch] (prefix LM): [batch, 1, q_len, cache_length], positions below a
    row's prefix length also see each other both ways, as attention_mask_bias's `prefix` does.
    A [batch] cache_index (each row at its own position) also gives [batch, 1, q_len, cache_length].
    """
    k_pos = jnp.arange(cache_length)[None, :]
    if jnp.ndim(cache_index) == 1:
        q_pos = jnp.asarray(cache_index)[:, None, None] + jnp.arange(q_len)[None, :, None]  # [batch, q_len, 1]
        visible = k_pos[None] <= q_pos
        if prefix_lengths is not None:
            prefix = prefix_lengths[:, None, None]
            visible = visible | ((q_pos < prefix) & (k_pos[None] < prefix))
        return jnp.where(visible, 0.0, MASK_VALUE).astype(jnp.float32)[:, None]
    q_pos = cache_index + jnp.arange(q_len)[:, None]
    visible = k_pos <= q_pos
    if prefix_lengths is None:
        return jnp.where(visible, 0.0, MASK_VALUE).astype(jnp.float32)[None, None]
    prefix = prefix_lengths[:, None, None]
    visible = visible[None] | ((q_pos[None] < prefix) & (k_pos[None] < prefix))
    return jnp.where(visible, 0.0, MASK_VALUE).astype(jnp.float32)[:, None]
