"""The T5 v1.1 Transformer: encoder-decoder and decoder-only networks built from layers.py.

Per stack, one relative-position bias table and one combined [batch, heads, q, k] bias (position
bias + segment/causal mask) are built once and broadcast to every layer. The Llama family
(`position_encoding="rope"`, decoder-only) builds the mask and the rotary angles once instead. With an
`attention_impl` kernel (model/attention.py) bias and mask stay apart (an AttentionBias). Layers are
stacked with nn.scan (parameters get a leading "layers" axis) unless `scan_layers=False`.

Params may hold quantized or LoRA-updated kernels (model/weights.py): a scanned stack makes its
layer's float kernels inside the scan body, one layer at a time.

Decoding (`decode_index` given to the Decoder) keeps attention keys/values in the flax "cache"
collection; under nn.scan its leaves are [batch, layers, ...] (batch first, so decoding code can
repeat and reorder sequences without knowing the layout).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model import init_schemes, weights
from t5lite.model.attention import AttentionBias
from t5lite.model.config import TransformerConfig
from t5lite.model.layers import (
    Embed,
    GatedMlp,
    MultiHeadAttention,
    RelativePositionBias,
    RMSNorm,
    attention_mask,
    attention_mask_bias,
    constrain,
    decode_mask_bias,
    logical_param,
    rotary_embedding,
    segment_positions,
)

Array = jax.Array

REMAT_POLICIES = {
    # Save the weight-matmul outputs (no batch dims in their dot_general), recompute the rest.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _norm(cfg: TransformerConfig, name: str) -> RMSNorm:
    return RMSNorm(dtype=cfg.compute_dtype, epsilon=cfg.layer_norm_epsilon, name=name)


def _dropout(cfg: TransformerConfig, x: Array, deterministic: bool) -> Array:
    # Broadcast over length, as T5X does for residual-stream dropout.
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


def _attention_bias(
    cfg: TransformerConfig, relpos: Array | None, q_segment_ids: Array, k_segment_ids: Array, *,
    causal: bool = False, prefix: Array | None = None,
) -> Array | AttentionBias:
    """A stack's attention pattern, built once for all its layers (not when decoding).

    "xla": one additive float32 bias [batch, heads|1, q, k], relpos [1, heads, q, k] (or None) plus the
    segment mask (attention_mask_bias). A kernel (attention_impl): an AttentionBias with the parts apart.
    """
    if cfg.attention_impl == "xla":
        mask_bias = attention_mask_bias(q_segment_ids, k_segment_ids, causal=causal, prefix=prefix)
        return mask_bias if relpos is None else relpos + mask_bias
    is_causal = causal and prefix is None  # a prefix-LM prefix attends both ways: then the mask says it all
    mask = attention_mask(q_segment_ids, k_segment_ids, causal=causal and not is_causal, prefix=prefix)
    return AttentionBias(relpos, mask, is_causal, cfg.attention_impl)


class EncoderLayer(nn.Module):
    config: TransformerConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, None]:
        cfg, dt = self.config, self.config.compute_dtype
        inits = init_schemes.stack_inits(cfg, "encoder")
        h = _norm(cfg, "pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, dt, cfg.dropout_rate, inits=inits, name="attention")(
            h, h, bias, self.deterministic
        )
        x = x + _dropout(cfg, h, self.deterministic)
        h = _norm(cfg, "pre_mlp_layer_norm")(x)
        h = GatedMlp(cfg.mlp_dim, dt, cfg.dropout_rate, activation=cfg.mlp_activation, inits=inits, name="mlp")(
            h, self.deterministic)
        x = x + _dropout(cfg, h, self.deterministic)
        return constrain(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
    """Self-attention, then cross-attention (encoder-decoder), then the MLP.

    decode: keys/values go through the attention cache (see MultiHeadAttention); `cache_index`
    is the position of the first input token, and `encoded` may be None to reuse the cached
    cross-attention keys/values. `rotary`: the (cos, sin) of the tokens' positions (rope family).
    """

    config: TransformerConfig
    deterministic: bool
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: Array, self_bias: Array, encoded: Array | None, cross_bias: Array | None,
        cache_index: Array | None = None, rotary: tuple[Array, Array] | None = None,
    ) -> tuple[Array, None]:
        cfg, dt = self.config, self.config.compute_dtype
        inits = init_schemes.stack_inits(cfg, "decoder")
        h = _norm(cfg, "pre_self_attention_layer_norm")(x)
        h = MultiHeadAttention(
            cfg.num_heads, cfg.head_dim, dt, cfg.dropout_rate, self.decode, num_kv_heads=cfg.kv_heads,
            scale_logits=cfg.llama_conventions, inits=inits, name="self_attention",
        )(h, h, self_bias, self.deterministic, cache_index, rotary)
        x = x + _dropout(cfg, h, self.deterministic)
        if cfg.is_encoder_decoder:
            h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
            h = MultiHeadAttention(
                cfg.num_heads, cfg.head_dim, dt, cfg.dropout_rate, self.decode, inits=inits,
                name="encoder_decoder_attention",
            )(h, encoded, cross_bias, self.deterministic)
            x = x + _dropout(cfg, h, self.deterministic)
        h = _norm(cfg, "pre_mlp_layer_norm")(x)
        h = GatedMlp(cfg.mlp_dim, dt, cfg.dropout_rate, fused_wi=self.decode, activation=cfg.mlp_activation,
                     inits=inits, name="mlp")(h, self.deterministic)
        x = x + _dropout(cfg, h, self.deterministic)
        return constrain(x, ("batch", "length", "embed")), None


def run_layers(
    layer_cls: type[nn.Module], cfg: TransformerConfig, num_layers: int, deterministic: bool,
    x: Array, *broadcast_args, stored_weights: bool = False, **layer_attributes,
) -> Array:
    """Applies `num_layers` copies of `layer_cls` (scanned or unrolled, optionally rematted).

    Must be called from inside a compact method: the layers become submodules "layers"
    (scanned, params [layers, ...], cache [batch, layers, ...]) or "layers_0".."layers_{n-1}"
    (unrolled). `layer_attributes` are extra module attributes of every layer (e.g. decode).
    stored_weights: the scanned params hold QuantizedTensor / LowRankUpdate leaves, made float in
    the scan body for the one layer it runs (weights.materialize_layer); Model.logits makes them
    float beforehand when the layers are not scanned.
    """
    if stored_weights and cfg.scan_layers:
        layer_cls = nn.map_variables(layer_cls, "params", trans_in_fn=weights.materialize_layer)
    if cfg.remat_policy != "none":
        # prevent_cse is unneeded (and slower) inside scan, which already blocks CSE.
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "cache": 1},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(broadcast_args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, name="layers", **layer_attributes)
        x, _ = stack(x, *broadcast_args)
        return x
    for i in range(num_layers):
        x, _ = layer_cls(cfg, deterministic, name=f"layers_{i}", **layer_attributes)(x, *broadcast_args)
    return x


class Encoder(nn.Module):
    config: TransformerConfig
    embedder: Embed

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array, deterministic: bool) -> Array:
        """tokens, segment_ids [batch, length] -> encoded [batch, length, embed]."""
        cfg = self.config
        x = _dropout(cfg, self.embedder(tokens), deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        length = tokens.shape[1]
        relpos = RelativePositionBias(
            cfg.num_heads, bidirectional=True, num_buckets=cfg.relpos_num_buckets,
            max_distance=cfg.relpos_max_distance, name="relpos_bias",
        )(length, length)
        bias = _attention_bias(cfg, relpos, segment_ids, segment_ids)  # [batch, heads, q, k]
        x = run_layers(EncoderLayer, cfg, cfg.num_encoder_layers, deterministic, x, bias,
                       stored_weights=weights.has_stored(self.variables))
        x = _norm(cfg, "encoder_norm")(x)
        return _dropout(cfg, x, deterministic)


class Decoder(nn.Module):
    """Causal decoder; with `encoded` it cross-attends (T5), without it is a decoder-only LM."""

    config: TransformerConfig
    embedder: Embed

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        segment_ids: Array | None,
        deterministic: bool,
        encoded: Array | None = None,
        encoder_segment_ids: Array | None = None,
        causal_attention: Array | None = None,
        decode_index: Array | None = None,
        decode_length: int | None = None,
        decode_prefix_lengths: Array | None = None,
    ) -> Array:
        """tokens, segment_ids [batch, length] -> logits [batch, length, vocab] (float32).

        causal_attention [batch, length]: 1 on prefix-LM inputs (bidirectional among themselves).
        Decoding (decode_index, an int32 scalar or [batch] per-row positions, given): `tokens` sit at
        positions decode_index + arange(length) of a cache of decode_length positions; segment_ids are unused, and
        `encoded` may be None after the first call (cached cross-attention keys/values);
        decode_prefix_lengths [batch] (prefix LM): the prompt positions, bidirectional as in training.
        """
        cfg = self.config
        x = _dropout(cfg, self.embedder(tokens), deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        length = tokens.shape[1]
        rope = cfg.position_encoding == "rope"
        decode = decode_index is not None
        rotary, relpos = None, None
        if rope:  # absolute positions when decoding (the cache's), else positions inside each packed segment
            positions = (jnp.reshape(decode_index, (-1, 1)) + jnp.arange(length)[None] if decode  # [batch|1, length]
                         else segment_positions(segment_ids))
            rotary = rotary_embedding(positions, cfg.head_dim, cfg.rope_base)
        else:
            relpos_bias = RelativePositionBias(
                cfg.num_heads, bidirectional=False, num_buckets=cfg.relpos_num_buckets,
                max_distance=cfg.relpos_max_distance, name="relpos_bias",
            )
            relpos = relpos_bias(length, decode_length, decode_index) if decode else relpos_bias(length, length)
        if decode:  # decoding steps always take the einsum path (see t5lite/model/attention.py)
            self_bias = decode_mask_bias(length, decode_length, decode_index, decode_prefix_lengths)
            self_bias = self_bias if relpos is None else relpos + self_bias
            segment_ids = jnp.ones(tokens.shape, jnp.int32)  # cross-attention queries: all real
        else:
            self_bias = _attention_bias(cfg, relpos, segment_ids, segment_ids, causal=True, prefix=causal_attention)
        cross_bias = None
        if cfg.is_encoder_decoder and decode:
            cross_bias = attention_mask_bias(segment_ids, encoder_segment_ids)  # [batch, 1, q, k]
        elif cfg.is_encoder_decoder:
            cross_bias = _attention_bias(cfg, None, segment_ids, encoder_segment_ids)
        x = run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, deterministic, x, self_bias, encoded, cross_bias,
                       decode_index, rotary, decode=decode, stored_weights=weights.has_stored(self.variables))
        x = _norm(cfg, "decoder_norm")(x)
        x = _dropout(cfg, x, deterministic)
        return self._logits(x)

    def _logits(self, x: Array) -> Array:
        cfg = self.config
        if cfg.tie_embeddings and cfg.llama_conventions:
            logits = self.embedder.attend(x)  # Llama: tied logits as they are
        elif cfg.tie_embeddings:
            # Tied logits are rescaled so their size does not grow with emb_dim (T5 v1.0).
            logits = self.embedder.attend(x) / np.sqrt(cfg.emb_dim)
        else:
            kernel = logical_param(
                self, "logits_dense",
                init_schemes.logits_init(cfg),
                (cfg.emb_dim, cfg.vocab_size), ("embed", "vocab"),
            )
            logits = jnp.einsum("ble,ev->blv", x, kernel.astype(cfg.compute_dtype))
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class EncoderDecoder(nn.Module):
    """T5: a shared token embedding, a bidirectional encoder and a cross-attending decoder."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.compute_dtype,
                                    init_stddev=init_schemes.embedding_stddev(cfg))
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array, deterministic: bool = True) -> Array:
        return self.encoder(encoder_input_tokens, encoder_segment_ids, deterministic)

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        encoder_segment_ids: Array,
        decoder_segment_ids: Array,
        deterministic: bool = True,
    ) -> Array:
        """-> logits [batch, target_length, vocab] (float32).

        A decoder batch k times the encoder's (k answers per prompt, as preference pairs give) reads
        encoder row i in decoder rows k*i .. k*i+k-1: each prompt is encoded once, not k times."""
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic)
        answers_per_prompt, rest = divmod(decoder_input_tokens.shape[0], encoder_input_tokens.shape[0])
        if rest:
            raise ValueError(f"The decoder batch ({decoder_input_tokens.shape[0]} rows) must be a multiple of the "
                             f"encoder batch ({encoder_input_tokens.shape[0]} rows).")
        if answers_per_prompt > 1:
            encoded = jnp.repeat(encoded, answers_per_prompt, axis=0)
            encoder_segment_ids = jnp.repeat(encoder_segment_ids, answers_per_prompt, axis=0)
        return self.decoder(
            decoder_input_tokens, decoder_segment_ids, deterministic,
            encoded=encoded, encoder_segment_ids=encoder_segment_ids,
        )

    def decode(
        self, decoder_input_tokens: Array, encoder_segment_ids: Array, decode_index: Array, decode_length: int,
        encoded: Array | None = None,
    ) -> Array:
        """One cached decoding call: tokens [batch, n] at decode_index.. -> logits [batch, n, vocab].

        Pass `encoded` on the first call (it fills the cross-attention cache), None afterwards.
        """
        return self.decoder(
            decoder_input_tokens, None, True, encoded=encoded, encoder_segment_ids=encoder_segment_ids,
            decode_index=decode_index, decode_length=decode_length,
        )


class DecoderOnly(nn.Module):
    """Causal LM (or prefix LM when `decoder_causal_attention` marks the prefix)."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.compute_dtype,
                                    init_stddev=init_schemes.embedding_stddev(cfg))
        self.decoder = Decoder(cfg, self.token_embedder)

    def __call__(
        self,
        decoder_input_tokens: Array,
        decoder_segment_ids: Array,
        decoder_causal_attention: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """-> logits [batch, length, vocab] (float32)."""
        return self.decoder(
            decoder_input_tokens, decoder_segment_ids, deterministic, causal_attention=decoder_causal_attention
        )

    def decode(self, decoder_input_tokens: Array, decode_index: Array, decode_length: int,
               prefix_lengths: Array | None = None) -> Array:
        """One cached decoding call: tokens [batch, n] at decode_index.. -> logits [batch, n, vocab].

        prefix_lengths [batch]: prefix-LM prompts (BOS + prompt), attended both ways as in training.
        """
        return self.decoder(decoder_input_tokens, None, True, decode_index=decode_index, decode_length=decode_length,
                            decode_prefix_lengths=prefix_lengths)


def build_network(config: TransformerConfig) -> nn.Module:
    return EncoderDecoder(config) if config.is_encoder_decoder else DecoderOnly(config)
