"""Initialisation schemes (TransformerConfig.init_scheme): how each weight of the network starts.

Per stack ("encoder" or "decoder", N = its number of layers; d = emb_dim, h x k = heads x head_dim,
f = mlp_dim), the standard deviation of each weight kind; "fan-in normal" is N(0, 1 / fan_in),
"Xavier" is U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), std sqrt(2 / (fan_in + fan_out)):

  "t5" (default; T5 v1.1 / Mesh TensorFlow, bit for bit what t5lite always did)
      query            fan-in normal / sqrt(k)    (the 1/sqrt(k) of the logits, folded in; rope family: no fold)
      key, value       fan-in normal              std d^-1/2
      out              fan-in normal              std (h k)^-1/2
      wi_0, wi_1, wo   fan-in truncated normal    std d^-1/2, d^-1/2, f^-1/2
      embedding        N(0, 1)                    (rope family: N(0, d^-1/2), Llama's)
      logits_dense     fan-in truncated normal    std d^-1/2
  "scaled" (depth-aware; GPT-2 / Megatron-LM's scaled init of the residual branches' outputs)
      as "t5", but every residual branch's output projection -- attention `out` (self and cross) and
      the MLP's `wo` -- has std / sqrt(2 N), N the layers of its stack, so that the sum of the 2N
      branches the residual stream accumulates starts at the size of one branch.
  "t_fixup" (T-Fixup, Huang et al. 2020, "Improving Transformer Optimization Through Better
      Initialization", Algorithm 1)
      query, key       Xavier                     (query / sqrt(k) as in "t5", rope family: no fold)
      value, out, wi_0, wi_1, wo: Xavier times s, with
        encoder  s = 0.67 N_e^-1/4
        decoder  s = (9 N_d)^-1/4                 (self- and cross-attention's value and out alike)
      embedding        N(0, d^-1/2) times (9 N_d)^-1/4   (the table encoder and decoder share)
      logits_dense     Xavier
    t5lite keeps its pre-layer RMSNorms (T-Fixup removes layer normalisation); see
    docs/configuration-and-training.md, "Initialisation", for this and the other differences.

Unchanged by every scheme: RMSNorm scales (ones) and the relative-position bias table (Xavier).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5lite.model.config import TransformerConfig

Initializer = Callable[..., jax.Array]

# T-Fixup's encoder factor (the paper's 0.67 N_e^-1/4) and decoder factor ((9 N_d)^-1/4).
T_FIXUP_ENCODER_GAIN = 0.67
T_FIXUP_DECODER_LAYERS_FACTOR = 9


@dataclasses.dataclass(frozen=True)
class ParamInits:
    """The initializers of one stack's attention (query, key, value, out; shapes [d, h, k] and
    [h, k, d]) and MLP (wi for wi_0 and wi_1 [d, f], wo [f, d]) weights."""

    query: Initializer
    key: Initializer
    value: Initializer
    out: Initializer
    wi: Initializer
    wo: Initializer


def scaled_by(init: Initializer, factor: float) -> Initializer:
    """`init` with every value multiplied by `factor`."""
    def scaled(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * factor
    return scaled


def _fan_in(distribution: str, attention_axis: str | None = None) -> Initializer:
    return _variance_scaling("fan_in", distribution, attention_axis)


def _xavier(attention_axis: str | None = None) -> Initializer:
    return _variance_scaling("fan_avg", "uniform", attention_axis)


def _variance_scaling(mode: str, distribution: str, attention_axis: str | None) -> Initializer:
    """attention_axis: "in" for [d, h, k] kernels (fans d and h k), "out" for [h, k, d]; None: a matrix."""
    axes = {"in": dict(in_axis=0, out_axis=(1, 2)), "out": dict(in_axis=(0, 1), out_axis=2), None: {}}
    return nn.initializers.variance_scaling(1.0, mode, distribution, **axes[attention_axis])


def _query(base: Initializer, head_dim: int, scale_logits: bool) -> Initializer:
    # T5 scales the query init by 1/sqrt(head_dim) instead of the logits (Mesh TF); Llama scales logits.
    return base if scale_logits else lambda *a: base(*a) / np.sqrt(head_dim)


def t5(head_dim: int, scale_logits: bool) -> ParamInits:
    """T5 v1.1's initializers (they do not depend on depth)."""
    fan_in = _fan_in("normal", "in")
    mlp = _fan_in("truncated_normal")
    return ParamInits(query=_query(fan_in, head_dim, scale_logits), key=fan_in, value=fan_in,
                      out=_fan_in("normal", "out"), wi=mlp, wo=mlp)


def scaled(head_dim: int, scale_logits: bool, num_layers: int) -> ParamInits:
    """T5's, with the residual branches' output projections (out, wo) / sqrt(2 * num_layers)."""
    base = t5(head_dim, scale_logits)
    factor = (2 * num_layers) ** -0.5
    return dataclasses.replace(base, out=scaled_by(base.out, factor), wo=scaled_by(base.wo, factor))


def t_fixup(head_dim: int, scale_logits: bool, factor: float) -> ParamInits:
    """Xavier everywhere; value, out and the MLP's weights times `factor` (t_fixup_factor)."""
    return ParamInits(query=_query(_xavier("in"), head_dim, scale_logits), key=_xavier("in"),
                      value=scaled_by(_xavier("in"), factor), out=scaled_by(_xavier("out"), factor),
                      wi=scaled_by(_xavier(), factor), wo=scaled_by(_xavier(), factor))


def t_fixup_factor(cfg: TransformerConfig, stack: str) -> float:
    """T-Fixup's scale of a stack's value / out / MLP weights: 0.67 N_e^-1/4 (encoder), (9 N_d)^-1/4 (decoder)."""
    if stack == "encoder":
        return T_FIXUP_ENCODER_GAIN * cfg.num_encoder_layers ** -0.25
    return (T_FIXUP_DECODER_LAYERS_FACTOR * cfg.num_decoder_layers) ** -0.25


def stack_inits(cfg: TransformerConfig, stack: str) -> ParamInits:
    """The initializers of the layers of `stack` ("encoder" or "decoder") under cfg.init_scheme."""
    num_layers = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    scale_logits = cfg.llama_conventions
    if cfg.init_scheme == "scaled":
        return scaled(cfg.head_dim, scale_logits, num_layers)
    if cfg.init_scheme == "t_fixup":
        return t_fixup(cfg.head_dim, scale_logits, t_fixup_factor(cfg, stack))
    return t5(cfg.head_dim, scale_logits)


def embedding_stddev(cfg: TransformerConfig) -> float:
    """Std of the token embedding [vocab, d]: 1 (T5), d^-1/2 (rope family), d^-1/2 (9 N_d)^-1/4 (T-Fixup)."""
    if cfg.init_scheme == "t_fixup":
        return cfg.emb_dim ** -0.5 * t_fixup_factor(cfg, "decoder")
    return cfg.emb_dim ** -0.5 if cfg.llama_conventions else 1.0


def logits_init(cfg: TransformerConfig) -> Initializer:
    """The untied output layer logits_dense [d, vocab]: fan-in truncated normal (T5), Xavier (T-Fixup)."""
    return _xavier() if cfg.init_scheme == "t_fixup" else _fan_in("truncated_normal")
