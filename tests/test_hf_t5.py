"""Golden test: a transformers T5 v1.1 and its t5lite import give the same logits, both ways."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5lite import hf_t5
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_model(tie: bool):
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                tie_word_embeddings=tie)
    # transformers 5 always ties unless the attribute is set after construction (T5 v1.1 is untied).
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the default init leaves some tensors tiny; randomise everything
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        # As in every T5 checkpoint, both stacks embed with the shared table (untying in
        # transformers 5 gives them their own copies).
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model


def _batch():
    rng = np.random.default_rng(0)
    enc = rng.integers(2, 96, (2, 11)).astype(np.int32)
    enc[1, 8:] = 0  # padding in the second row
    tgt = rng.integers(2, 96, (2, 7)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1)
    return enc, dec_in, tgt


def _hf_logits(model, enc, dec_in):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0),
                    decoder_input_ids=torch.tensor(dec_in, dtype=torch.long))
    return out.logits.numpy()


def _t5lite_logits(config, params, enc, dec_in, tgt):
    return np.asarray(Model(config).logits(params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                                                    "decoder_target_tokens": tgt}))


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tie", [False, True], ids=["v1_1_untied", "tied"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_hf_to_t5lite_logits_match(tmp_path, tie, scan):
    model = _hf_model(tie)
    model.save_pretrained(tmp_path)
    config, params = hf_t5.load_hf_t5(str(tmp_path), scan_layers=scan)
    assert config.tie_embeddings == tie and config.num_decoder_layers == 3
    enc, dec_in, tgt = _batch()
    assert _rel_err(_t5lite_logits(config, params, enc, dec_in, tgt), _hf_logits(model, enc, dec_in)) <= 1e-4


@pytest.mark.parametrize("tie", [False, True], ids=["v1_1_untied", "tied"])
def test_t5lite_to_hf_logits_match(tmp_path, tie):
    config = TransformerConfig(vocab_size=96, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48, num_encoder_layers=2,
                               num_decoder_layers=3, tie_embeddings=tie)
    model = Model(config)
    boxed = model.init(jax.random.PRNGKey(1), model.input_shapes(2, {"inputs": 11, "targets": 7}))["params"]
    params = jax.tree_util.tree_map(np.asarray, nn.unbox(boxed))
    hf_t5.save_hf_t5(params, config, str(tmp_path))
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    enc, dec_in, tgt = _batch()
    assert _rel_err(_hf_logits(hf_model, enc, dec_in), _t5lite_logits(config, params, enc, dec_in, tgt)) <= 1e-4
    # And back: the round trip is exact.
    _, again = hf_t5.load_hf_t5(str(tmp_path))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_v1_1_configs_and_bad_directories_are_refused(tmp_path):
    with pytest.raises(UserError, match="gated-gelu"):
        hf_t5.config_from_hf({"feed_forward_proj": "relu", "vocab_size": 8, "d_model": 8, "num_heads": 1,
                              "d_kv": 8, "d_ff": 8, "num_layers": 1})
    with pytest.raises(UserError, match="config.json"):
        hf_t5.load_hf_t5(str(tmp_path))
    with pytest.raises(UserError, match="decoder-only|encoder-decoder"):
        hf_t5.hf_config_from(dataclasses.replace(TransformerConfig(), architecture="decoder_only"))
