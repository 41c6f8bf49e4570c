"""TransformerConfig.attention_impl: jax.nn.dot_product_attention gives the einsum attention's ("xla", the
reference) logits and gradients, for every family and mask t5lite trains with; bad choices fail early."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model

# One layer per stack (scanned, as by default): the layers share their stack's bias, so more add only compile time.
TINY = dict(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48, num_encoder_layers=1,
            num_decoder_layers=1)
FAMILIES = {
    "t5_encoder_decoder": TransformerConfig(**TINY),
    "t5_decoder_only": TransformerConfig(**TINY, architecture="decoder_only"),
    "rope_gqa": TransformerConfig(**TINY, architecture="decoder_only", position_encoding="rope", num_kv_heads=2,
                                  mlp_activation="silu", layer_norm_epsilon=1e-5),
}
# Two packed examples and padding in the first row, one example filling the second.
SEGMENTS = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
TARGET_SEGMENTS = np.array([[1] * 4 + [2] * 3 + [0], [1] * 8])
PREFIX = np.array([[1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1] + [0] * 9])


def packed_batch(config: TransformerConfig, prefix_lm: bool = False) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    tokens = lambda segments: rng.integers(1, config.vocab_size, segments.shape) * (segments > 0)  # noqa: E731
    if config.is_encoder_decoder:
        batch = {"encoder_input_tokens": tokens(SEGMENTS), "encoder_segment_ids": SEGMENTS,
                 "decoder_input_tokens": tokens(TARGET_SEGMENTS), "decoder_target_tokens": tokens(TARGET_SEGMENTS),
                 "decoder_segment_ids": TARGET_SEGMENTS}
    else:
        batch = {"decoder_input_tokens": tokens(SEGMENTS), "decoder_target_tokens": tokens(SEGMENTS),
                 "decoder_segment_ids": SEGMENTS}
        if prefix_lm:
            batch["decoder_causal_attention"] = PREFIX
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@functools.cache
def init_params(config: TransformerConfig):
    model = Model(config)
    shapes = model.input_shapes(2, {"inputs": 12, "targets": 8})
    return jax.jit(lambda rng: nn.unbox(model.init(rng, shapes)["params"]))(jax.random.PRNGKey(0))


def logits_and_grads(config: TransformerConfig, params, batch, dropout_rng=None):
    model = Model(config)

    @jax.jit  # compiled: a few seconds, where running op by op takes tens
    def run(params, batch, dropout_rng):
        loss = lambda p: model.loss_sums(p, batch, dropout_rng=dropout_rng)[0]  # noqa: E731
        return model.logits(params, batch, dropout_rng=dropout_rng), jax.grad(loss)(params)

    return run(params, batch, dropout_rng)


def assert_close(reference, other, rtol: float = 1e-5) -> None:
    """Each array's largest difference relative to its largest value."""
    def relative(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(a)), 1e-30))

    errors = jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(relative, reference, other))
    worst = max(errors, key=lambda e: e[1])
    assert worst[1] < rtol, f"{jax.tree_util.keystr(worst[0])}: relative error {worst[1]:.2e}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dot_product_attention_gives_the_reference_logits_and_gradients(family):
    config = FAMILIES[family]
    params, batch = init_params(config), packed_batch(config)
    reference = logits_and_grads(config, params, batch)
    fused = logits_and_grads(dataclasses.replace(config, attention_impl="dot_product_attention"), params, batch)
    assert_close(reference, fused)


def test_prefix_lm_mask_goes_to_the_kernel_too():
    config = FAMILIES["rope_gqa"]
    params, batch = init_params(config), packed_batch(config, prefix_lm=True)
    reference = logits_and_grads(config, params, batch)
    assert_close(reference, logits_and_grads(dataclasses.replace(config, attention_impl="dot_product_attention"),
                                             params, batch))


def test_attention_dropout_runs_the_reference_path():
    """The kernels have no attention dropout: with dropout on, a layer rebuilds the additive bias and runs
    the einsums, so the same dropout rng gives the same step."""
    config = dataclasses.replace(FAMILIES["t5_decoder_only"], dropout_rate=0.1)
    params, batch, rng = init_params(config), packed_batch(config), jax.random.PRNGKey(1)
    reference = logits_and_grads(config, params, batch, rng)
    fused = logits_and_grads(dataclasses.replace(config, attention_impl="dot_product_attention"), params, batch, rng)
    assert_close(reference, fused)


def test_decoding_is_unchanged():
    """Decoding steps keep the einsum path; the encoder's pass takes the kernel."""
    config = FAMILIES["t5_encoder_decoder"]
    params, batch = init_params(config), packed_batch(config)
    decode = DecodeConfig(max_decode_length=5)
    tokens, scores = Model(config).predict_batch(params, batch, decode)
    fused = Model(dataclasses.replace(config, attention_impl="dot_product_attention"))
    fused_tokens, fused_scores = fused.predict_batch(params, batch, decode)
    np.testing.assert_array_equal(tokens, fused_tokens)
    np.testing.assert_allclose(scores, fused_scores, rtol=1e-5)


def test_bad_choices_are_user_errors():
    with pytest.raises(UserError, match="attention_impl='flash'; choose one of"):
        TransformerConfig(attention_impl="flash")
    with pytest.raises(UserError, match="bfloat16 or float16"):
        TransformerConfig(attention_impl="cudnn", dtype="float32")
    with pytest.raises(UserError, match="head_dim a multiple of 8"):
        TransformerConfig(attention_impl="cudnn", head_dim=20)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a GPU runs cuDNN")
def test_cudnn_without_a_gpu_fails_at_first_use():
    config = dataclasses.replace(FAMILIES["rope_gqa"], attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        init_params(config)
