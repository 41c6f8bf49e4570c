"""Golden tests: a transformers LlamaForCausalLM and t5lite's rope family give the same logits and the
same greedy tokens, both ways (multi-head, grouped- and multi-query attention, tied and untied output
layers); the exported tokenizer encodes text to seqio's ids."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from t5lite import checkpoints, hf_llama, hf_t5
from t5lite import train as train_lib
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PROMPT, NEW = 96, 5, 8
# rope_theta 500 (not the default) checks that rope_base is carried over.
TINY = TransformerConfig(architecture="decoder_only", vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                         num_decoder_layers=2, position_encoding="rope", rope_base=500.0, mlp_activation="silu",
                         layer_norm_epsilon=1e-5)


def _hf_model(kv_heads: int, tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                   tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and weights tiny; randomise everything
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def _tokens():
    tokens = np.random.default_rng(0).integers(2, VOCAB, (2, 13)).astype(np.int32)
    tokens[:, 0] = 0  # t5lite's decoder-only rows start with 0
    return tokens


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _t5lite_logits(config, params, tokens):
    batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.ones_like(tokens)}
    return np.asarray(jax.jit(Model(config).logits)(params, batch))


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _assert_greedy_tokens_equal(hf_model, config, params, prompts):
    """transformers' greedy generate and t5lite's greedy decode (a causal prompt) continue `prompts`
    [batch, length] (0 first) with the same tokens, up to and including EOS (1)."""
    with torch.no_grad():
        generated = hf_model.generate(input_ids=torch.tensor(prompts, dtype=torch.long),
                                      attention_mask=torch.ones(prompts.shape, dtype=torch.long), max_new_tokens=NEW,
                                      do_sample=False, num_beams=1).numpy()[:, prompts.shape[1]:]
    batch = {"decoder_input_tokens": prompts, "decoder_causal_attention": np.ones_like(prompts)}
    decode = DecodeConfig(max_decode_length=NEW, eos_id=1)
    predict = jax.jit(lambda p, b: Model(config).predict_batch(p, b, decode, bidirectional_prompt=False))
    tokens, _ = predict(params, batch)
    tokens = np.asarray(tokens)
    assert generated.shape[1] >= 3 and (generated[:, :3] > 1).all()  # a real continuation, not EOS at once
    np.testing.assert_array_equal(tokens[:, :generated.shape[1]], generated)  # HF pads a finished row with 0
    assert (tokens[:, generated.shape[1]:] == 0).all()


@pytest.mark.parametrize("kv_heads, tie, scan", [(4, False, True), (2, True, False)], ids=["mha_untied", "gqa_tied"])
def test_hf_to_t5lite_logits_and_greedy_tokens_match(tmp_path, kv_heads, tie, scan):
    model = _hf_model(kv_heads, tie)
    model.save_pretrained(tmp_path)
    config, params = hf_llama.load_hf_llama(str(tmp_path), scan_layers=scan)
    assert config == dataclasses.replace(TINY, num_kv_heads=None if kv_heads == 4 else kv_heads, tie_embeddings=tie,
                                         scan_layers=scan)
    tokens = _tokens()
    assert _rel_err(_t5lite_logits(config, params, tokens), _hf_logits(model, tokens)) <= 1e-5
    _assert_greedy_tokens_equal(model, config, params, tokens[:, :PROMPT])


@pytest.mark.parametrize("kv_heads, tie", [(2, False), (1, True)], ids=["gqa_untied", "mqa_tied"])
def test_t5lite_to_hf_logits_and_greedy_tokens_match_and_the_round_trip_is_exact(tmp_path, kv_heads, tie):
    config = dataclasses.replace(TINY, num_kv_heads=kv_heads, tie_embeddings=tie)
    model = Model(config)
    shapes = model.input_shapes(2, {"targets": 13})
    # Random values for every parameter (norm scales start at 1), as for the transformers model: each has to
    # land in its own place.
    abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), shapes))["params"])
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0.0, 0.5, x.shape).astype(np.float32), abstract)
    hf_llama.save_hf_llama(params, config, str(tmp_path))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.config.num_key_value_heads == kv_heads and hf_model.config.tie_word_embeddings == tie
    tokens = _tokens()
    assert _rel_err(_hf_logits(hf_model, tokens), _t5lite_logits(config, params, tokens)) <= 1e-5
    _assert_greedy_tokens_equal(hf_model, config, params, tokens[:, :PROMPT])
    # And back: the same config, the same params.
    again_config, again = hf_llama.load_hf_llama(str(tmp_path))
    assert again_config == config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def _corpus_texts():
    with open(os.path.join(REPO, "t5lite/data/corpus/tinyshakespeare/input.txt"), encoding="utf-8") as f:
        shakespeare = f.read().split("\n\n")[:300]
    with open(os.path.join(REPO, "t5lite/data/corpus/wikitext-2/valid.txt"), encoding="utf-8") as f:
        wikitext = f.read().split("\n")[:600]
    return shakespeare + wikitext


def test_the_exported_tokenizer_encodes_and_decodes_like_seqio(tmp_path):
    vocabulary = get_default_vocabulary()
    hf_llama.save_hf_tokenizer(vocabulary, str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # Newlines, runs of spaces and the text's ends, characters outside the pieces (byte fallback),
    # NFKC forms, WikiText's literal <unk>, sentinels; then 900 lines and paragraphs of the corpus.
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "  two  spaces \n and ends  ",
             "\nnewline first", "Café, naïve — 3 ✓ 🦜 中文 ｆｕｌｌ ﬁ", "carrying <unk> over x<unk>y",
             "a <extra_id_0> b <extra_id_1>", "", *_corpus_texts()]
    encoded = tokenizer(texts).input_ids
    mismatched = [t for t, ids in zip(texts, encoded, strict=True) if ids != [0, *vocabulary.encode(t)]]
    assert not mismatched, mismatched[:3]
    assert tokenizer.decode(encoded[0], skip_special_tokens=True) == vocabulary.decode(vocabulary.encode(texts[0]))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (0, 1, 0, 8100)
    assert os.path.exists(tmp_path / "tokenizer.model")


def test_what_llama_cannot_describe_is_refused(tmp_path):
    llama = hf_llama.hf_config_from(TINY)
    for change, message in (({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type"),
                            ({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "attention_bias"),
                            ({"model_type": "mistral"}, "model_type")):
        with pytest.raises(UserError, match=message):
            hf_llama.config_from_hf({**llama, **change})
    with pytest.raises(UserError, match="hf_t5"):
        hf_llama.hf_config_from(TransformerConfig())  # a T5
    with pytest.raises(UserError, match="hf_llama"):
        hf_t5.hf_config_from(dataclasses.replace(TINY, position_encoding="relative_bias"))
    with pytest.raises(UserError, match="only SentencePiece"):
        hf_llama.save_hf_tokenizer(seqio.ByteVocabulary(), str(tmp_path))
    with pytest.raises(UserError, match="config.json"):
        hf_llama.load_hf_llama(str(tmp_path))


@pytest.mark.slow
def test_a_trained_llama_exports_and_imports_back_and_hf_generates_what_t5lite_decodes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    model_dir = str(tmp_path / "run")
    assert train_lib.main(["--gin_file=gin/base.gin", "--gin_file=gin/models/llama_tiny.gin", "--gin.TRAIN_STEPS=4",
                           "--gin.MIXTURE_OR_TASK_NAME='t5lite_default_lm'",
                           "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.BATCH_SIZE=8",
                           "--gin.EvalConfig.batches=1", "--gin.CheckpointConfig.every=4",
                           f"--gin.MODEL_DIR='{model_dir}'"]) == 0
    output = str(tmp_path / "hf")
    assert hf_llama.main([f"--checkpoint={model_dir}/checkpoints/4", f"--output={output}"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(output).eval()
    texts = ["First Citizen: Before we proceed any further, hear me", "The game 's development began in"]
    vocabulary = get_default_vocabulary()
    prompts = [tokenizer(t).input_ids for t in texts]
    assert prompts == [[0, *vocabulary.encode(t)] for t in texts]
    params = checkpoints.read_params(f"{model_dir}/checkpoints/4")
    config, _ = hf_llama.load_hf_llama(output)
    for prompt in prompts:  # one row at a time: no padding to agree on
        _assert_greedy_tokens_equal(hf_model, config, params, np.array([prompt], np.int32))

    imported = str(tmp_path / "imported")
    assert hf_llama.main([f"--from_hf={output}", f"--output={imported}"]) == 0
    assert f'--gin.INITIAL_CHECKPOINT=\\"{imported}/checkpoints/0\\"' in capsys.readouterr().out
    again = checkpoints.read_params(f"{imported}/checkpoints/0")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # The same vocabulary recorded (another file, the same bytes), so fine-tuning on t5lite's data is allowed.
    with open(f"{model_dir}/vocabulary.json") as f, open(f"{imported}/vocabulary.json") as g:
        trained, recorded = (json.load(f)["targets"], json.load(g)["targets"])
    assert {k: v for k, v in trained.items() if k != "file"} == {k: v for k, v in recorded.items() if k != "file"}
    assert hf_llama.main([f"--checkpoint={model_dir}/checkpoints/4", f"--output={output}"]) == 2
    assert "already exists" in capsys.readouterr().err
