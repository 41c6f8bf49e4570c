"""TransformerConfig: every architectural choice of a t5lite network in one frozen dataclass.

Sizes are set from gin (gin/models/*.gin); the defaults are a laptop-sized T5 v1.1.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from t5lite.errors import UserError

ARCHITECTURES = ("encoder_decoder", "decoder_only")
REMAT_POLICIES = ("none", "minimal", "full")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a T5 v1.1-style Transformer.

    architecture: "encoder_decoder" (T5) or "decoder_only" (causal or prefix LM; which one is
      decided by the data: a `decoder_causal_attention` feature makes the prefix bidirectional).
    vocab_size: rows of the embedding table (padded above the tokenizer's size, e.g. 8100 -> 8192).
    dtype: compute dtype of activations and matmuls: "auto" (float32 on CPU, bfloat16 on TPU/GPU)
      or a dtype name. Params, softmax, norms and loss are always float32.
    scan_layers: stack layers with nn.scan (one compiled layer body, fast compile).
    remat_policy: "none" keeps all activations, "minimal" recomputes everything but the
      weight-matmul outputs, "full" recomputes the whole layer in the backward pass.
    """

    architecture: str = "encoder_decoder"
    vocab_size: int = 8192
    emb_dim: int = 256
    num_heads: int = 4
    head_dim: int = 64
    mlp_dim: int = 640
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dropout_rate: float = 0.0
    dtype: str = "auto"
    tie_embeddings: bool = False
    relpos_num_buckets: int = 32
    relpos_max_distance: int = 128
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"TransformerConfig.architecture={self.architecture!r}; choose one of {ARCHITECTURES}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise UserError(
                f"TransformerConfig.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}."
            )
        if self.dtype != "auto":
            try:
                jnp.dtype(self.dtype)
            except TypeError as e:
                raise UserError(f"TransformerConfig.dtype={self.dtype!r} is not a dtype; use 'auto', "
                                "'float32' or 'bfloat16'.") from e

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return jnp.dtype(self.dtype)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture == "encoder_decoder"
