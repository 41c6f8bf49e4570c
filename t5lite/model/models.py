"""Model wrapper: maps seqio feature-converter batches to the network, and computes the loss.

Loss functions return SUMS over tokens (and the number of real target tokens); the trainer
divides by the real-token count of the global batch, so N microbatches of gradient
accumulation give exactly the one-big-batch loss and gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.model.config import TransformerConfig
from t5lite.model.network import build_network

Array = jax.Array
Batch = Mapping[str, Array]


def cross_entropy_with_z_loss(
    logits: Array, targets: Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array, Array]:
    """Per-token losses from logits [batch, length, vocab] (float32) and targets [batch, length].

    Returns (loss, z_loss_term, nll), each [batch, length]:
      nll = -log p(target), the quantity behind perplexity;
      loss = cross entropy against label-smoothed targets, minus its minimum possible value (so a
        perfect model scores 0 as without smoothing, as in T5X), plus z_loss * log(Z)^2, which keeps
        the softmax normaliser near 1 for bfloat16 stability (PaLM).
    """
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0.0:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        smoothed = -(confidence * -nll + low * (jnp.sum(log_probs, axis=-1) + nll))
        min_entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low))
        loss = smoothed - min_entropy
    else:
        loss = nll
    z_term = z_loss * jnp.square(log_z)
    return loss + z_term, z_term, nll


def loss_and_metric_sums(
    logits: Array, targets: Array, weights: Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    """Weighted token SUMS: (loss_sum, metrics). weights [batch, length] are 1 on real tokens."""
    weights = weights.astype(jnp.float32)
    loss, z_term, nll = cross_entropy_with_z_loss(
        logits, targets, label_smoothing=label_smoothing, z_loss=z_loss
    )
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    loss_sum = jnp.sum(loss * weights)
    metrics = {
        "loss": loss_sum,
        "z_loss": jnp.sum(z_term * weights),
        "cross_entropy": jnp.sum(nll * weights),
        "correct": jnp.sum(correct * weights),
        "num_tokens": jnp.sum(weights),
    }
    return loss_sum, metrics


def normalize_metric_sums(sums: Mapping[str, Array]) -> dict[str, Array]:
    """Token sums -> per-token means: loss, z_loss, cross_entropy, accuracy, perplexity."""
    n = jnp.maximum(sums["num_tokens"], 1.0)
    ce = sums["cross_entropy"] / n
    return {
        "loss": sums["loss"] / n,
        "z_loss": sums["z_loss"] / n,
        "cross_entropy": ce,
        "accuracy": sums["correct"] / n,
        "perplexity": jnp.exp(ce),
        "num_tokens": sums["num_tokens"],
    }


def _segment_ids(batch: Batch, prefix: str) -> Array:
    """Packed batches carry segment ids; unpacked ones use 'target token is not padding'."""
    key = f"{prefix}_segment_ids"
    if key in batch:
        return batch[key]
    tokens = batch["encoder_input_tokens" if prefix == "encoder" else "decoder_target_tokens"]
    return (tokens > 0).astype(jnp.int32)


class Model:
    """A network plus what training needs from it: init from batch shapes and loss sums."""

    def __init__(self, config: TransformerConfig):
        self.config = config
        self.module: nn.Module = build_network(config)

    def input_shapes(self, batch_size: int, feature_lengths: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Shapes of the model's features for given task feature lengths ("inputs"/"targets")."""
        if self.config.is_encoder_decoder:
            return {
                "encoder_input_tokens": (batch_size, feature_lengths["inputs"]),
                "decoder_input_tokens": (batch_size, feature_lengths["targets"]),
            }
        # Decoder-only: a prefix-LM example concatenates inputs and targets.
        length = feature_lengths["targets"] + feature_lengths.get("inputs", 0)
        return {"decoder_input_tokens": (batch_size, length)}

    def init(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]):
        """Boxed (logically partitioned) variables {'params': ...} for the given input shapes."""
        dummy = {k: jnp.ones(s, jnp.int32) for k, s in input_shapes.items()}
        if "decoder_input_tokens" in dummy:
            dummy["decoder_target_tokens"] = dummy["decoder_input_tokens"]
        return self.module.init({"params": rng, "dropout": rng}, **self._network_inputs(dummy))

    def _network_inputs(self, batch: Batch) -> dict[str, Array]:
        if self.config.is_encoder_decoder:
            return {
                "encoder_input_tokens": batch["encoder_input_tokens"],
                "decoder_input_tokens": batch["decoder_input_tokens"],
                "encoder_segment_ids": _segment_ids(batch, "encoder"),
                "decoder_segment_ids": _segment_ids(batch, "decoder"),
            }
        return {
            "decoder_input_tokens": batch["decoder_input_tokens"],
            "decoder_segment_ids": _segment_ids(batch, "decoder"),
            "decoder_causal_attention": batch.get("decoder_causal_attention"),
        }

    def logits(self, params, batch: Batch, *, dropout_rng: Array | None = None) -> Array:
        """[batch, target_length, vocab] float32. Dropout is on iff a dropout_rng is given."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        return self.module.apply(
            {"params": params}, **self._network_inputs(batch),
            deterministic=dropout_rng is None, rngs=rngs,
        )

    def loss_sums(
        self, params, batch: Batch, *, dropout_rng: Array | None = None,
        label_smoothing: float = 0.0, z_loss: float = 0.0,
    ) -> tuple[Array, dict[str, Array]]:
        """(sum of per-token losses over real target tokens, metric sums)."""
        logits = self.logits(params, batch, dropout_rng=dropout_rng)
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = batch["decoder_target_tokens"] > 0
        return loss_and_metric_sums(
            logits, batch["decoder_target_tokens"], weights,
            label_smoothing=label_smoothing, z_loss=z_loss,
        )
