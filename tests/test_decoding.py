"""Decoding and scoring: the cached loop against full forward passes, and the decoding methods
against each other."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite.errors import UserError
from t5lite.model import decoding
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig, filter_logits
from t5lite.model.layers import project
from t5lite.model.models import Model, cast_compute_weights

TINY = TransformerConfig(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)
DECODER_ONLY = dataclasses.replace(TINY, architecture="decoder_only")
# The Llama family: rotary positions, 4 query heads sharing 2 key/value heads, SwiGLU.
LLAMA = dataclasses.replace(DECODER_ONLY, num_heads=4, num_kv_heads=2, position_encoding="rope",
                            mlp_activation="silu", layer_norm_epsilon=1e-5)
MAX_NEW = 6


def _model(config, shapes):
    model = Model(config)
    return model, nn.unbox(model.init(jax.random.PRNGKey(0), shapes)["params"])


@functools.cache
def _encdec(scan_layers=True):
    return _model(dataclasses.replace(TINY, scan_layers=scan_layers),
                  {"encoder_input_tokens": (2, 10), "decoder_input_tokens": (2, MAX_NEW)})


@functools.cache
def _decoder_only():
    return _model(DECODER_ONLY, {"decoder_input_tokens": (2, 12)})


@functools.cache
def _llama():
    return _model(LLAMA, {"decoder_input_tokens": (2, 12)})


def _encdec_batch():
    tokens = np.random.default_rng(0).integers(2, 64, (2, 10)).astype(np.int32)
    tokens[1, 7:] = 0  # the second row is shorter: padding must be masked in cross-attention
    return {"encoder_input_tokens": tokens}


def _prompt_batch():
    """Decoder-only prompts of different lengths (BOS + 2 and BOS + 4 tokens), right-padded."""
    tokens = np.zeros((2, 6), np.int32)
    tokens[0, 1:3] = [5, 9]
    tokens[1, 1:5] = [7, 3, 11, 20]
    causal = np.zeros((2, 6), np.int32)
    causal[0, :3], causal[1, :5] = 1, 1
    return {"decoder_input_tokens": tokens, "decoder_causal_attention": causal}


def _predict(model, params, batch, config, rng=None, bidirectional_prompt=True):
    fn = jax.jit(lambda p, b, r: model.predict_batch(p, b, config, r, bidirectional_prompt=bidirectional_prompt))
    tokens, scores = fn(params, batch, rng)
    return np.asarray(tokens), np.asarray(scores)


def _greedy_by_full_forward(model, params, batch, prompts, max_new, eos_id, prefix_lm=False):
    """Greedy decoding that reruns the training forward pass on the whole sequence at every step
    (prefix_lm: BOS + prompt marked by decoder_causal_attention, attended both ways)."""
    logits_fn = jax.jit(model.logits)
    length = 1 + max(map(len, prompts)) + max_new  # fixed, so it compiles once; causal: the tail is unseen
    outputs = []
    for row, prompt in enumerate(prompts):
        sequence = [0, *prompt]
        generated = []
        for _ in range(max_new):
            inputs = np.zeros((1, length), np.int32)
            inputs[0, :len(sequence)] = sequence
            full = {"decoder_input_tokens": inputs, "decoder_target_tokens": np.ones_like(inputs)}
            if prefix_lm:
                full["decoder_causal_attention"] = (np.arange(length) <= len(prompt))[None].astype(np.int32)
            if "encoder_input_tokens" in batch:
                full["encoder_input_tokens"] = batch["encoder_input_tokens"][row:row + 1]
            next_token = int(np.argmax(logits_fn(params, full)[0, len(sequence) - 1]))
            generated.append(next_token)
            sequence.append(next_token)
            if next_token == eos_id:
                break
        outputs.append(generated + [0] * (max_new - len(generated)))
    return np.array(outputs)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_greedy_equals_full_forward_greedy_encoder_decoder(scan_layers):
    model, params = _encdec(scan_layers)
    batch = _encdec_batch()
    tokens, _ = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=63))
    expected = _greedy_by_full_forward(model, params, batch, [[], []], MAX_NEW, eos_id=63)
    np.testing.assert_array_equal(tokens, expected)


def test_params_split_per_layer_once_decode_like_scanned_params():
    model, params = _encdec(scan_layers=True)
    decode_params = jax.jit(model.decode_params)(params)
    assert "layers" not in decode_params["encoder"] and "layers_0" in decode_params["encoder"]
    config = DecodeConfig(max_decode_length=MAX_NEW, eos_id=63)
    tokens, scores = _predict(model, params, _encdec_batch(), config)
    split_tokens, split_scores = _predict(model, decode_params, _encdec_batch(), config)
    np.testing.assert_array_equal(split_tokens, tokens)
    np.testing.assert_allclose(split_scores, scores, rtol=1e-6)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_bfloat16_decode_params_hold_matmul_weights_in_bfloat16_and_change_no_result(architecture):
    config = dataclasses.replace(TINY, architecture=architecture, dtype="bfloat16")
    shapes = {"decoder_input_tokens": (2, MAX_NEW)}
    if architecture == "encoder_decoder":
        shapes["encoder_input_tokens"] = (2, 10)
    model, params = _model(config, shapes)
    decode_params = jax.jit(model.decode_params)(params)
    used_in_float32 = ("['scale']", "['rel_embedding']")  # norms and the position bias
    for path, leaf in jax.tree_util.tree_flatten_with_path(decode_params)[0]:
        name = jax.tree_util.keystr(path)
        assert leaf.dtype == (jnp.float32 if name.endswith(used_in_float32) else jnp.bfloat16), name
    # The layers compute with exactly these values: the training forward pass gives the same logits.
    tokens = np.random.default_rng(1).integers(2, 64, (2, MAX_NEW)).astype(np.int32)
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
    if architecture == "encoder_decoder":
        batch["encoder_input_tokens"] = _encdec_batch()["encoder_input_tokens"]
    np.testing.assert_array_equal(model.logits(cast_compute_weights(params, jnp.bfloat16), batch),
                                  model.logits(params, batch))
    decode_batch = _encdec_batch() if architecture == "encoder_decoder" else _prompt_batch()
    config = DecodeConfig(max_decode_length=MAX_NEW, eos_id=63)
    for got, expected in zip(_predict(model, decode_params, decode_batch, config),
                             _predict(model, params, decode_batch, config), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_cached_greedy_with_prefix_lm_prompts_equals_full_forward_greedy_decoder_only():
    # Prompts of different lengths, attended both ways (as in prefix-LM training) in the prefill and
    # by the rows still inside their prompt in the loop.
    model, params = _decoder_only()
    batch = _prompt_batch()
    tokens, scores = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=63))
    prompts = [[5, 9], [7, 3, 11, 20]]
    expected = _greedy_by_full_forward(model, params, batch, prompts, MAX_NEW, eos_id=63, prefix_lm=True)
    np.testing.assert_array_equal(tokens, expected)

    # The decode scores are the prefix-LM log-likelihoods of the generated tokens, and differ from
    # causal-prompt ones (the argmax tokens of this random model happen to be the same either way).
    def score(prefix_lm):
        rows = [[*prompt, *generated] for prompt, generated in zip(prompts, tokens.tolist(), strict=True)]
        targets = np.array([row + [0] * (12 - len(row)) for row in rows], np.int32)
        generated = (np.arange(12)[None] >= np.array([[2], [4]])) & (targets > 0)
        scored = {"decoder_target_tokens": targets, "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
                  "decoder_loss_weights": generated.astype(np.int32),
                  "decoder_segment_ids": np.ones_like(targets)}
        if prefix_lm:
            scored["decoder_causal_attention"] = (np.arange(12)[None] <= np.array([[2], [4]])).astype(np.int32)
        return np.asarray(model.score_batch(params, scored))

    np.testing.assert_allclose(scores, score(prefix_lm=True), rtol=1e-4, atol=1e-4)
    assert np.abs(scores - score(prefix_lm=False)).max() > 1e-3


@pytest.mark.parametrize("prefix_lm", [False, True], ids=["causal_prompt", "prefix_lm_prompt"])
def test_cached_greedy_with_rope_and_grouped_query_attention_equals_full_forward_greedy(prefix_lm):
    # RoPE rotates each cached key at its absolute position (the cache index) and each query at its own:
    # prompts of different lengths, the rows still inside their prompt fed in the loop.
    model, params = _llama()
    tokens, _ = _predict(model, params, _prompt_batch(), DecodeConfig(max_decode_length=MAX_NEW, eos_id=63),
                         bidirectional_prompt=prefix_lm)
    expected = _greedy_by_full_forward(model, params, _prompt_batch(), [[5, 9], [7, 3, 11, 20]], MAX_NEW, eos_id=63,
                                       prefix_lm=prefix_lm)
    np.testing.assert_array_equal(tokens, expected)


def _llama_decode_run(model, params, length):
    decode_params = model.decode_params(params)

    def run(cache, tokens, index):
        return model.decode_module.apply({"params": decode_params, "cache": cache}, tokens, index, length,
                                         method="decode", mutable=["cache"])

    return run


def test_grouped_query_cache_holds_each_key_value_head_once():
    model, params = _llama()
    cache = Model._zero_cache(_llama_decode_run(model, params, 16), 2, 16)
    shapes = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]}
    assert len(shapes) == 2 * LLAMA.num_decoder_layers
    assert set(shapes.values()) == {(2, LLAMA.num_kv_heads, 16, LLAMA.head_dim)}  # [batch, kv_heads, length, kv]


def test_rope_decoding_with_a_position_per_row_equals_the_full_forward():
    """Continuous batching decodes each row at its own position ([batch] cache indices)."""
    model, params = _llama()
    tokens = np.random.default_rng(2).integers(2, 64, (2, 8)).astype(np.int32)
    tokens[:, 0] = 0
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.ones_like(tokens)}  # all real
    full = jax.jit(model.logits)(params, batch)
    run = jax.jit(_llama_decode_run(model, params, 8))
    _, prefilled = run(Model._zero_cache(run, 2, 8), tokens[:, :6], 0)
    positions = np.array([3, 5])  # row 0 rewrites position 3 (the same token) and must not see 4 and 5
    logits, _ = run(prefilled["cache"], tokens[np.arange(2), positions][:, None], jnp.asarray(positions))
    np.testing.assert_allclose(logits[:, 0], np.asarray(full)[np.arange(2), positions], rtol=1e-5, atol=1e-5)


def test_causal_lm_prompts_are_attended_causally_when_asked():
    model, params = _decoder_only()
    config = DecodeConfig(max_decode_length=MAX_NEW, eos_id=63)
    tokens, scores = _predict(model, params, _prompt_batch(), config, bidirectional_prompt=False)
    expected = _greedy_by_full_forward(model, params, _prompt_batch(), [[5, 9], [7, 3, 11, 20]], MAX_NEW, eos_id=63)
    np.testing.assert_array_equal(tokens, expected)
    _, bidirectional_scores = _predict(model, params, _prompt_batch(), config)
    assert np.abs(scores - bidirectional_scores).max() > 1e-3


def test_causal_lm_without_a_prefix_mask_decodes_from_bos_like_the_full_forward():
    model, params = _decoder_only()
    batch = {"decoder_input_tokens": np.zeros((2, 6), np.int32)}
    tokens, _ = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=63))
    expected = _greedy_by_full_forward(model, params, batch, [[], []], MAX_NEW, eos_id=63)
    np.testing.assert_array_equal(tokens, expected)


def test_decoding_stops_at_eos_per_sequence():
    model, params = _encdec()
    batch = _encdec_batch()
    free, _ = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=63))
    eos = int(free[0, 0])  # row 0 must stop after its first token; row 1 where it meets this token
    tokens, _ = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=eos))
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else MAX_NEW
        np.testing.assert_array_equal(tokens[row], [*free[row, :end]] + [0] * (MAX_NEW - end))
    assert (tokens[0, 1:] == 0).all() and (free[0, 1:] != 0).all()


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_greedy_scores_equal_score_batch_of_the_decoded_tokens(architecture):
    if architecture == "encoder_decoder":
        model, params = _encdec()
        batch = _encdec_batch()
    else:
        model, params = _decoder_only()
        batch = {"decoder_input_tokens": np.zeros((2, 1), np.int32)}  # unconditional: BOS only
    tokens, scores = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=63))
    targets = tokens
    scored = {"decoder_target_tokens": targets,
              "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
              "decoder_loss_weights": np.ones_like(targets)}
    if architecture == "encoder_decoder":
        scored["encoder_input_tokens"] = batch["encoder_input_tokens"]
    scored["decoder_segment_ids"] = np.ones_like(targets)
    np.testing.assert_allclose(model.score_batch(params, scored), scores, rtol=1e-4, atol=1e-4)


def test_score_batch_is_the_sum_of_target_log_probs_of_the_training_forward_pass():
    model, params = _encdec()
    rng = np.random.default_rng(1)
    targets = rng.integers(2, 64, (2, 5)).astype(np.int32)
    targets[1, 3:] = 0  # padding is not scored
    batch = {**_encdec_batch(), "decoder_target_tokens": targets,
             "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1]}
    log_probs = jax.nn.log_softmax(model.logits(params, batch), axis=-1)
    expected = [sum(float(log_probs[r, t, targets[r, t]]) for t in range(5) if targets[r, t]) for r in range(2)]
    np.testing.assert_allclose(model.score_batch(params, batch), expected, rtol=1e-5)
    # The teacher-forced eval loss agrees: cross entropy sum = -sum of the scores.
    _, sums = model.loss_sums(params, batch)
    np.testing.assert_allclose(sums["cross_entropy"], -np.sum(expected), rtol=1e-5)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_one_beam_and_near_zero_temperature_and_top_k_1_equal_greedy(architecture):
    model, params = _encdec() if architecture == "encoder_decoder" else _decoder_only()
    batch = _encdec_batch() if architecture == "encoder_decoder" else _prompt_batch()
    greedy, greedy_scores = _predict(model, params, batch, DecodeConfig(max_decode_length=MAX_NEW, eos_id=63))
    beam, beam_scores = _predict(model, params, batch, DecodeConfig(
        method="beam", num_beams=1, length_penalty_alpha=0.0, max_decode_length=MAX_NEW, eos_id=63))
    np.testing.assert_array_equal(beam, greedy)
    np.testing.assert_allclose(beam_scores, greedy_scores, rtol=1e-5)
    rng = jax.random.PRNGKey(3)
    cold, _ = _predict(model, params, batch, DecodeConfig(
        method="sample", temperature=1e-4, max_decode_length=MAX_NEW, eos_id=63), rng)
    top1, _ = _predict(model, params, batch, DecodeConfig(
        method="sample", top_k=1, max_decode_length=MAX_NEW, eos_id=63), rng)
    np.testing.assert_array_equal(cold, greedy)
    np.testing.assert_array_equal(top1, greedy)


def test_beam_search_returns_a_beam_whose_score_is_its_penalised_log_likelihood():
    model, params = _encdec()
    batch = _encdec_batch()
    config = DecodeConfig(method="beam", num_beams=4, length_penalty_alpha=0.6, max_decode_length=MAX_NEW,
                          eos_id=63)
    tokens, scores = _predict(model, params, batch, config)
    assert (tokens != 63).all()
    scored = {**batch, "decoder_target_tokens": tokens, "decoder_segment_ids": np.ones_like(tokens),
              "decoder_input_tokens": np.pad(tokens, ((0, 0), (1, 0)))[:, :-1],
              "decoder_loss_weights": np.ones_like(tokens)}
    penalty = ((5.0 + MAX_NEW) / 6.0) ** 0.6  # no EOS was produced: full length
    np.testing.assert_allclose(np.asarray(model.score_batch(params, scored)) / penalty, scores, rtol=1e-4)


def test_sampling_is_seeded_and_differs_from_greedy():
    model, params = _decoder_only()
    batch = {"decoder_input_tokens": np.zeros((2, 1), np.int32)}
    config = DecodeConfig(method="sample", temperature=2.0, max_decode_length=MAX_NEW, eos_id=63)
    a, _ = _predict(model, params, batch, config, jax.random.PRNGKey(1))
    b, _ = _predict(model, params, batch, config, jax.random.PRNGKey(1))
    c, _ = _predict(model, params, batch, config, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_and_top_p_keep_the_expected_tokens():
    probs = jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = jnp.log(probs)
    kept = lambda filtered: np.flatnonzero(np.asarray(filtered[0]) > -1e6).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.8)) == [0, 1, 2]  # 0.5 + 0.2 < 0.8 <= 0.85
    assert kept(filter_logits(logits, top_k=2, top_p=0.99)) == [0, 1]


def test_bad_decode_settings_are_user_errors():
    with pytest.raises(UserError, match="method"):
        DecodeConfig(method="nucleus")
    with pytest.raises(UserError, match="top_p"):
        DecodeConfig(top_p=0.0)


def test_argmax_equals_jnp_argmax_with_ties_infinities_and_nan():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 3, 1000)).astype(np.float32)
    logits[0, 0, [5, 17, 900]] = 50.0  # a tie: the first index wins
    logits[1, 1, :] = -np.inf  # all -inf: index 0
    logits[2, 2, [7, 30]] = np.inf
    logits[3, 0, [400, 12]] = np.nan  # NaN wins, the first one
    logits[3, 1, 999] = np.nan
    np.testing.assert_array_equal(decoding.argmax(jnp.asarray(logits)), jnp.argmax(jnp.asarray(logits), axis=-1))
    assert decoding.argmax(jnp.asarray(logits)).dtype == jnp.argmax(jnp.asarray(logits), axis=-1).dtype


def test_fused_projections_equal_separate_ones():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    kernels = [jnp.asarray(rng.standard_normal((16, 4, 3)), jnp.float32) for _ in range(3)]
    fused = project(x, kernels, dtype=jnp.float32, fused=True)
    separate = project(x, kernels, dtype=jnp.float32, fused=False)
    for a, b, kernel in zip(fused, separate, kernels, strict=True):
        assert a.shape == (2, 5, 4, 3)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, jnp.einsum("ble,ehd->blhd", x, kernel), rtol=1e-5, atol=1e-5)
