"""Analytic FLOPs of a t5lite network, for MFU.

Counts matrix-multiply FLOPs (2 per multiply-add) of one forward pass over a batch; training is
3x forward (the backward pass computes two matmuls per forward matmul), plus one more forward
per layer under full remat. Elementwise work (norms, softmax, GELU) is left out, as in the
usual MFU convention (PaLM appendix B).

Attention is counted as computed: t5lite builds the full [q, k] score matrix, so causal
self-attention is NOT halved (a kernel that skips the masked half would do half the work).
"""

from __future__ import annotations

import dataclasses

from t5lite.model.config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """Forward FLOPs of one batch, by part of the network."""

    encoder: float = 0.0  # projections, attention scores and values, MLP of every encoder layer
    decoder_self_attention: float = 0.0  # q/k/v/out projections and the full [q, k] matrices
    cross_attention: float = 0.0  # q/out on decoder tokens, k/v on encoder tokens, scores and values
    decoder_mlp: float = 0.0
    logits: float = 0.0

    @property
    def forward(self) -> float:
        return self.encoder + self.decoder_self_attention + self.cross_attention + self.decoder_mlp + self.logits


def _attention(q_tokens: float, k_tokens: float, q_len: int, k_len: int, batch: int, c: TransformerConfig) -> float:
    """Projections (q, out on queries; k, v on keys, num_kv_heads of them) plus scores and weighted values."""
    hd, kv_hd = c.num_heads * c.head_dim, c.kv_heads * c.head_dim
    projections = 2 * c.emb_dim * (hd * 2 * q_tokens + kv_hd * 2 * k_tokens)
    scores_and_values = 2 * 2 * batch * q_len * k_len * hd
    return projections + scores_and_values


def _mlp(tokens: float, c: TransformerConfig) -> float:
    return 2 * tokens * 3 * c.emb_dim * c.mlp_dim  # wi_0, wi_1, wo


def forward_flops(config: TransformerConfig, batch: int, inputs_length: int, targets_length: int) -> FlopsBreakdown:
    """Forward FLOPs for [batch, inputs_length] encoder and [batch, targets_length] decoder tokens.

    Decoder-only models: pass inputs_length 0 and the full sequence length as targets_length.
    """
    c = config
    enc_tokens, dec_tokens = batch * inputs_length, batch * targets_length
    encoder = 0.0
    cross = 0.0
    if c.is_encoder_decoder:
        per_layer = _attention(enc_tokens, enc_tokens, inputs_length, inputs_length, batch, c) + _mlp(enc_tokens, c)
        encoder = c.num_encoder_layers * per_layer
        cross = c.num_decoder_layers * _attention(dec_tokens, enc_tokens, targets_length, inputs_length, batch, c)
    self_attention = c.num_decoder_layers * _attention(dec_tokens, dec_tokens, targets_length, targets_length,
                                                       batch, c)
    return FlopsBreakdown(
        encoder=encoder, decoder_self_attention=self_attention, cross_attention=cross,
        decoder_mlp=c.num_decoder_layers * _mlp(dec_tokens, c), logits=2 * dec_tokens * c.emb_dim * c.vocab_size)


def train_step_flops(config: TransformerConfig, batch: int, inputs_length: int, targets_length: int) -> float:
    """Model FLOPs of one training step (forward + backward), the numerator of MFU.

    Rematerialisation is not counted: MFU measures useful model work, not recomputation.
    """
    return 3 * forward_flops(config, batch, inputs_length, targets_length).forward


def mfu(config: TransformerConfig, batch: int, inputs_length: int, targets_length: int, step_seconds: float,
        peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (all devices)."""
    return train_step_flops(config, batch, inputs_length, targets_length) / step_seconds / peak_flops_per_second
