"""Model wrapper: maps seqio feature-converter batches to the network: loss, predict and score.

Loss functions return SUMS over tokens (and the number of real target tokens); the trainer
divides by the real-token count of the global batch, so N microbatches of gradient
accumulation give exactly the one-big-batch loss and gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5lite.model import decoding, weights
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
    correct = (decoding.argmax(logits) == targets).astype(jnp.float32)
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


def unstack_layers(params):
    """Scanned params ({"layers": leaves [layers, ...]}) -> unrolled ({"layers_0": ..., ...})."""
    if not isinstance(params, Mapping):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        num_layers = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
        for i in range(num_layers):
            out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
    return out


# The weights the layers cast to the compute dtype wherever they use them: matmul kernels and the
# token embedding. Norm scales and the relative-position table are used in float32.
COMPUTE_DTYPE_WEIGHTS = frozenset({"query", "key", "value", "out", "wi_0", "wi_1", "wo", "logits_dense", "embedding"})


def cast_compute_weights(params, dtype: jnp.dtype):
    """`params` with COMPUTE_DTYPE_WEIGHTS in `dtype`: the same values the layers compute with."""
    def cast(path, x):
        named = getattr(path[-1], "key", None) in COMPUTE_DTYPE_WEIGHTS
        return x.astype(dtype) if named and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map_with_path(cast, params)


def without_prefix_attention(batch: Batch) -> Batch:
    """seqio's prefix-LM features mark the prompt for bidirectional attention; a causal LM never saw
    that in training, so it reads them without the mark (the loss weights still pick the targets)."""
    return {k: v for k, v in batch.items() if k != "decoder_causal_attention"}


class Model:
    """A network plus what training and evaluation need from it: init, loss sums, predict, score."""

    def __init__(self, config: TransformerConfig):
        self.config = config
        self.module: nn.Module = build_network(config)
        # Decoding runs the layers unrolled: a scanned stack would copy every layer's cache slice
        # in and out of the scan at each step. Same parameters, split per layer (unstack_layers).
        self.decode_module: nn.Module = build_network(
            dataclasses.replace(config, scan_layers=False, remat_policy="none"))

    def decode_params(self, params):
        """`params` laid out as predict_batch decodes with them: split per layer if scanned, the
        matmul weights in the compute dtype (the values the layers cast them to anyway).

        predict_batch accepts either layout, but converts inside every call: ~70 ms of copying per
        call for T5 v1.1 small on CPU. Convert once per checkpoint instead:
        `decode_params = jax.jit(model.decode_params)(params)`. In bfloat16 (TPU) the copy is half
        the size of the float32 params, and a decode with fsdp-sharded params all-gathers half the
        bytes (T5 v1.1 XXL on v5e:2x4, see t5lite.precompile --decode)."""
        params = weights.materialize(params)  # quantized / LoRA-updated kernels (model/weights.py) as floats
        params = unstack_layers(params) if self.config.scan_layers else params
        return cast_compute_weights(params, self.config.compute_dtype)

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
        """[batch, target_length, vocab] float32. Dropout is on iff a dropout_rng is given.

        params may hold quantized or LoRA-updated kernels (model/weights.py): those of a scanned layer
        stack are made float inside the scan, one layer at a time; the others here, once per call."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        params = weights.materialize(params, except_under="layers" if self.config.scan_layers else None)
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

    def score_batch(self, params, batch: Batch, bidirectional_prompt: bool = True) -> Array:
        """Log-likelihood of each row's targets [batch] (float32): sum of log p(target token).

        Rows are single examples (an unpacked batch); decoder_loss_weights (default: target not
        padding) select the scored tokens, so a prefix-LM row scores its targets, not its prompt.
        bidirectional_prompt=False: a decoder-only prompt marked by decoder_causal_attention is read
        causally (a causal LM's), as predict_batch does.
        """
        if not bidirectional_prompt:
            batch = without_prefix_attention(batch)
        logits = self.logits(params, batch)
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = batch["decoder_target_tokens"] > 0
        _, _, nll = cross_entropy_with_z_loss(logits, batch["decoder_target_tokens"])
        return -jnp.sum(nll * weights.astype(jnp.float32), axis=1)

    def predict_batch(
        self, params, batch: Batch, config: decoding.DecodeConfig, rng: Array | None = None,
        bidirectional_prompt: bool = True,
    ) -> tuple[Array, Array]:
        """Decodes each row: -> (tokens [batch, config.max_decode_length] int32, scores [batch]).

        Encoder-decoder: conditions on encoder_input_tokens. Decoder-only: the prompt is the part
        of decoder_input_tokens marked by decoder_causal_attention (seqio's prefix-LM features;
        attended both ways, as logits() and score_batch() attend it, unless bidirectional_prompt is
        False: a causal LM's), or just BOS without it; tokens are the continuation after it.
        Generated tokens end with EOS (then zeros). Scores: see decoding.decode.
        """
        if self.config.is_encoder_decoder:
            encoder_tokens = batch["encoder_input_tokens"]
            batch_size = encoder_tokens.shape[0]
            prompt = jnp.zeros((batch_size, 1), jnp.int32)  # BOS
            prompt_lengths = jnp.ones((batch_size,), jnp.int32)
        else:
            tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
            batch_size = tokens.shape[0]
            has_prompt = "decoder_causal_attention" in batch
            prefix_lm = has_prompt and bidirectional_prompt
            if has_prompt:
                prompt_mask = jnp.asarray(batch["decoder_causal_attention"], jnp.int32)
                prompt, prompt_lengths = tokens * prompt_mask, jnp.sum(prompt_mask, axis=1)
            else:
                prompt = jnp.zeros((batch_size, 1), jnp.int32)
                prompt_lengths = jnp.ones((batch_size,), jnp.int32)
        sequences = jnp.concatenate([prompt, jnp.zeros((batch_size, config.max_decode_length), jnp.int32)], axis=1)
        length = sequences.shape[1]
        module = self.decode_module
        params = self.decode_params(params)  # a no-op for params already split per layer

        if self.config.is_encoder_decoder:
            encoder_segment_ids = (encoder_tokens > 0).astype(jnp.int32)
            encoded = module.apply({"params": params}, encoder_tokens, encoder_segment_ids, method="encode")
            step_segment_ids = jnp.repeat(encoder_segment_ids, config.beams, axis=0)

            def run(cache, tokens, index, segment_ids, encoded=None):
                return module.apply({"params": params, "cache": cache}, tokens, segment_ids, index, length,
                                         encoded, method="decode", mutable=["cache"])

            cache = self._zero_cache(run, batch_size, length, encoder_segment_ids, encoded)
            # The prefill only computes the cross-attention keys/values: it gets no tokens, as the
            # loop's first step feeds BOS (position 0) itself. Feeding BOS here too ran one more
            # full decoder step (~10 ms of ~1.25 s for T5 v1.1 small, batch 8).
            prefill = lambda c, t: run(c, t[:, :0], 0, encoder_segment_ids, encoded)[1]["cache"]  # noqa: E731
            step_args = (step_segment_ids,)
        else:
            def run(cache, tokens, index, prefix_lengths=None):
                return module.apply({"params": params, "cache": cache}, tokens, index, length, prefix_lengths,
                                    method="decode", mutable=["cache"])

            cache = self._zero_cache(run, batch_size, length)
            # A prefix-LM prompt is bidirectional: the prefill sees all of it, and a row still
            # inside its prompt in the loop (longer prompts) sees the rest of it in the cache.
            prefix_lengths = prompt_lengths if prefix_lm else None
            prefill = lambda c, t: run(c, t, 0, prefix_lengths)[1]["cache"]  # noqa: E731
            step_args = (jnp.repeat(prompt_lengths, config.beams, axis=0),) if prefix_lm else ()

        def step(cache, tokens, index):
            logits, variables = run(cache, tokens, index, *step_args)
            return logits[:, -1], variables["cache"]

        sequences, scores = decoding.decode(prefill, step, cache, sequences, prompt_lengths, config, rng)
        # The continuation after each row's prompt, aligned at column 0.
        positions = prompt_lengths[:, None] + jnp.arange(config.max_decode_length)[None]
        return jnp.take_along_axis(sequences, positions, axis=1), scores

    @staticmethod
    def _zero_cache(run, batch_size: int, length: int, *run_args) -> dict:
        """An all-zero attention cache for `length` positions (shapes from an abstract init call)."""
        def init(tokens):
            return run({}, tokens, jnp.zeros((), jnp.int32), *run_args)[1]["cache"]

        shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((batch_size, length), jnp.int32))
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
