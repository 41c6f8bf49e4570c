"""TransformerConfig: every architectural choice of a t5lite network in one frozen dataclass.

Sizes are set from gin (gin/models/*.gin); the defaults are a laptop-sized T5 v1.1.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from t5lite.errors import UserError
from t5lite.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLS

ARCHITECTURES = ("encoder_decoder", "decoder_only")
REMAT_POLICIES = ("none", "minimal", "full")
POSITION_ENCODINGS = ("relative_bias", "rope")
MLP_ACTIVATIONS = ("gelu", "silu")
INIT_SCHEMES = ("t5", "scaled", "t_fixup")  # formulas: t5lite/model/init_schemes.py


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a T5 v1.1-style or Llama-style Transformer.

    architecture: "encoder_decoder" (T5) or "decoder_only" (causal or prefix LM; which one is
      decided by the data: a `decoder_causal_attention` feature makes the prefix bidirectional).
    vocab_size: rows of the embedding table (padded above the tokenizer's size, e.g. 8100 -> 8192).
    dtype: compute dtype of activations and matmuls: "auto" (float32 on CPU, bfloat16 on TPU/GPU)
      or a dtype name. Params, softmax, norms and loss are always float32.
    scan_layers: stack layers with nn.scan (one compiled layer body, fast compile).
    remat_policy: "none" keeps all activations, "minimal" recomputes everything but the
      weight-matmul outputs, "full" recomputes the whole layer in the backward pass.

    The Llama family (decoder-only; gin/models/llama_*.gin; t5lite.hf_llama maps it to Hugging Face
    LlamaForCausalLM):
    position_encoding: "relative_bias" (T5's bucketed bias, one table per stack) or "rope" (rotary
      embeddings on queries and keys, Llama's rotate-half layout, base `rope_base`). "rope" also
      brings Llama's other conventions (`llama_conventions`).
    num_kv_heads: key/value heads; None is num_heads (multi-head attention), a divisor of num_heads
      groups the query heads (grouped-query attention; 1: multi-query). The decoding cache holds
      num_kv_heads heads.
    mlp_activation: "gelu" (T5 v1.1's gated GELU) or "silu" (SwiGLU, Llama's).
    layer_norm_epsilon: added to the mean square in RMSNorm (T5 1e-6, Llama 1e-5).

    Initialisation (t5lite/model/init_schemes.py; docs/configuration-and-training.md, "Initialisation"):
    init_scheme: "t5" (T5 v1.1's, the default), "scaled" (residual-branch outputs / sqrt(2 * layers)) or
      "t_fixup" (T-Fixup, Huang et al. 2020).
    embedding_init_file: a word2vec / GloVe text file; `python -m t5lite.train` copies the vectors of the
      vocabulary's pieces into the token embedding of a fresh run (not a resumed or fine-tuned one),
      rescaled to the scheme's embedding std unless embedding_init_keep_scale.

    attention_impl: the attention kernel of training and teacher-forced passes (t5lite/model/attention.py):
      "xla" (t5lite's einsums, the reference), "dot_product_attention" (jax.nn.dot_product_attention, kernel
      chosen by jax) or "cudnn" (cuDNN flash attention; NVIDIA GPU, bfloat16). Decoding steps use "xla".
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
    position_encoding: str = "relative_bias"
    rope_base: float = 10000.0
    num_kv_heads: int | None = None
    mlp_activation: str = "gelu"
    layer_norm_epsilon: float = 1e-6
    init_scheme: str = "t5"
    embedding_init_file: str | None = None
    embedding_init_keep_scale: bool = False
    attention_impl: str = "xla"

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
        self._check_llama_options()
        if self.init_scheme not in INIT_SCHEMES:
            raise UserError(f"TransformerConfig.init_scheme={self.init_scheme!r}; choose one of {INIT_SCHEMES}.")
        self._check_attention_impl()

    def _check_llama_options(self) -> None:
        for name, choices in (("position_encoding", POSITION_ENCODINGS), ("mlp_activation", MLP_ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise UserError(f"TransformerConfig.{name}={getattr(self, name)!r}; choose one of {choices}.")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise UserError(f"TransformerConfig.num_kv_heads={self.num_kv_heads} must divide num_heads="
                            f"{self.num_heads} (None: as many as num_heads).")
        grouped = self.kv_heads != self.num_heads
        if self.is_encoder_decoder and (self.position_encoding == "rope" or grouped):
            raise UserError("TransformerConfig.position_encoding='rope' and num_kv_heads are for decoder-only models "
                            "(architecture='decoder_only'); the encoder-decoder keeps T5's relative position bias "
                            "and multi-head attention.")
        if self.position_encoding == "rope" and (self.head_dim % 2 or self.rope_base <= 0):
            raise UserError(f"Rotary embeddings need an even head_dim and rope_base > 0; got head_dim="
                            f"{self.head_dim}, rope_base={self.rope_base}.")
        if self.layer_norm_epsilon <= 0:
            raise UserError(f"TransformerConfig.layer_norm_epsilon={self.layer_norm_epsilon} must be positive.")

    def _check_attention_impl(self) -> None:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise UserError(f"TransformerConfig.attention_impl={self.attention_impl!r}; "
                            f"choose one of {ATTENTION_IMPLS}.")
        if self.attention_impl != "cudnn":
            return
        if self.dtype not in ("auto", "bfloat16", "float16"):  # "auto" is bfloat16 on a GPU
            raise UserError(f"attention_impl='cudnn' computes in bfloat16 or float16, not dtype={self.dtype!r}; "
                            "set TransformerConfig.dtype='bfloat16' or use attention_impl='dot_product_attention'.")
        if self.head_dim % 8 or self.head_dim > 256:
            raise UserError(f"attention_impl='cudnn' needs head_dim a multiple of 8 and at most 256 (128 before "
                            f"Hopper); got {self.head_dim}. Use attention_impl='dot_product_attention'.")

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == "auto":
            return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return jnp.dtype(self.dtype)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.architecture == "encoder_decoder"

    @property
    def kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or num_heads when that is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def llama_conventions(self) -> bool:
        """The rope family follows Llama where T5 differs, so Hugging Face Llama weights map 1:1:
        attention logits are scaled by head_dim**-0.5 in compute (T5 folds that into the query init),
        tied output logits are not rescaled (T5 divides them by sqrt(emb_dim)), and the token
        embedding is initialised with stddev emb_dim**-0.5 (T5: 1), so tied logits start near unit scale."""
        return self.position_encoding == "rope"
