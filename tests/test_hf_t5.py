"""Golden test: a transformers T5 v1.1 and its t5lite import give the same logits, both ways."""

import dataclasses
import os
import re

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest
import seqio

from t5lite import checkpoints, hf_t5
from t5lite import train as train_lib
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _run_model_config(model_dir):
    """The TransformerConfig of MODEL_DIR/config.gin; gin left clear."""
    gin.clear_config()
    with open(f"{model_dir}/config.gin") as f:
        gin.parse_config(f.read())
    config = TransformerConfig()
    gin.clear_config()
    return config


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


def test_sharded_bfloat16_weights_load_and_a_missing_shard_is_named(tmp_path):
    model = _hf_model(tie=False)
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")  # as large models are saved
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    config, params = hf_t5.load_hf_t5(str(tmp_path))
    enc, dec_in, tgt = _batch()
    reference = _hf_logits(model.float(), enc, dec_in)  # the bfloat16 weights, computed in float32
    assert _rel_err(_t5lite_logits(config, params, enc, dec_in, tgt), reference) <= 1e-4
    shards[-1].unlink()
    with pytest.raises(UserError, match="names shards that .* lacks"):
        hf_t5.load_hf_t5(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(UserError, match="index.json has no \"weight_map\""):
        hf_t5.load_hf_t5(str(tmp_path))


def test_non_v1_1_configs_and_bad_directories_are_refused(tmp_path):
    with pytest.raises(UserError, match="gated-gelu"):
        hf_t5.config_from_hf({"feed_forward_proj": "relu", "vocab_size": 8, "d_model": 8, "num_heads": 1,
                              "d_kv": 8, "d_ff": 8, "num_layers": 1})
    with pytest.raises(UserError, match="config.json"):
        hf_t5.load_hf_t5(str(tmp_path))
    (tmp_path / "config.json").write_text('{"d_model": 8,')  # cut short, as an interrupted copy leaves it
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        hf_t5.load_hf_t5(str(tmp_path))
    (tmp_path / "config.json").write_text('["d_model"]')
    with pytest.raises(UserError, match="config.json holds a JSON list, not an object"):
        hf_t5.load_hf_t5(str(tmp_path))
    with pytest.raises(UserError, match="decoder-only|encoder-decoder"):
        hf_t5.hf_config_from(dataclasses.replace(TransformerConfig(), architecture="decoder_only"))


def test_byte_vocabulary_exports_as_a_byt5_tokenizer_that_encodes_alike(tmp_path):
    vocabulary = seqio.ByteVocabulary(extra_ids=100)
    hf_t5.save_hf_tokenizer(vocabulary, str(tmp_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Café, naïve — 3 ✓ lines\nand tabs\t."
    assert tokenizer(text).input_ids == [*vocabulary.encode(text), vocabulary.eos_id]
    assert [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in (0, 99)] == [358, 259]  # seqio's order
    assert tokenizer.decode([*vocabulary.encode("ok "), 357]) == "ok <extra_id_1>"


@pytest.mark.slow
def test_a_trained_checkpoint_exports_as_a_hf_model_and_tokenizer_that_generate_what_t5lite_decodes(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    model_dir = str(tmp_path / "run")
    assert train_lib.main(["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin.TRAIN_STEPS=4",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8",
                           "--gin.EvalConfig.batches=1", "--gin.CheckpointConfig.every=4",
                           f"--gin.MODEL_DIR='{model_dir}'"]) == 0
    config = _run_model_config(model_dir)
    output = str(tmp_path / "hf")
    assert hf_t5.main([f"--checkpoint={model_dir}/checkpoints/4", f"--output={output}"]) == 0
    assert hf_t5.main([f"--checkpoint={model_dir}/checkpoints/4", f"--output={output}"]) == 2
    assert "already exists" in capsys.readouterr().err

    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(output).eval()
    vocabulary = get_default_vocabulary()
    # Lines of the embedded corpus; the tokenizers differ after a newline (T5Tokenizer's converter
    # starts a word there, t5lite's SentencePiece model has "\n" as a piece), so none holds one.
    texts = ["First Citizen: Before we proceed any further, hear me speak.",
             "The game 's development began in 2010 , carrying over a large portion of the work done on Valkyria "
             "Chronicles II . <extra_id_0> and <extra_id_1>"]
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    assert [list(row[row > 0]) for row in encoded.input_ids] == [[*vocabulary.encode(t), 1] for t in texts]

    with torch.no_grad():
        generated = hf_model.generate(input_ids=torch.tensor(encoded.input_ids),
                                      attention_mask=torch.tensor(encoded.attention_mask), max_new_tokens=12,
                                      do_sample=False, num_beams=1).numpy()[:, 1:]  # after the start token 0
    params = checkpoints.read_params(f"{model_dir}/checkpoints/4")
    tokens, _ = Model(config).predict_batch(params, {"encoder_input_tokens": encoded.input_ids.astype(np.int32)},
                                            DecodeConfig(method="greedy", max_decode_length=12))
    for hf_row, row in zip(generated, np.asarray(tokens), strict=True):
        np.testing.assert_array_equal(hf_row, row[:len(hf_row)])
    # Decoding: the same text; around sentinels seqio puts spaces that T5Tokenizer leaves out.
    assert tokenizer.decode(vocabulary.encode(texts[0])) == vocabulary.decode(vocabulary.encode(texts[0]))
    for row in generated:  # 4 steps of span corruption: mostly sentinels
        ids = [int(t) for t in row if t > 1]  # no padding or EOS
        assert tokenizer.decode(ids).replace(" ", "") == vocabulary.decode(ids).replace(" ", "")


def test_export_refuses_a_checkpoint_it_cannot_describe_as_a_hf_t5(tmp_path, capsys):
    def save(model_dir, params, gin_text=None):
        ckpt = checkpoints.Checkpointer(f"{model_dir}/checkpoints", save_every=1, keep=None, async_save=False)
        ckpt.save(3, {"step": np.int32(3), "params": params}, force=True)
        ckpt.close()
        if gin_text is not None:
            with open(f"{model_dir}/config.gin", "w") as f:
                f.write(gin_text)
        return f"{model_dir}/checkpoints/3"

    embedding = {"token_embedder": {"embedding": np.zeros((96, 32), np.float32)}}
    tiny = "import t5lite.model.config\nTransformerConfig.vocab_size = 96\nTransformerConfig.emb_dim = 32\n"
    cases = [
        (save(tmp_path / "no_gin", embedding), "config.gin does not exist"),
        (save(tmp_path / "lora", {"base": embedding, "lora": {"x": {"a": np.zeros((2, 2), np.float32)}}}, tiny),
         "LoRA fine-tuning checkpoint: merge its adapters first"),
        (save(tmp_path / "other", embedding, tiny.replace("= 96", "= 128")),
         r"token embedding is \(96, 32\), but .* describes a model of \(128, 32\)"),
        (save(tmp_path / "decoder_only", embedding, tiny + "TransformerConfig.architecture = 'decoder_only'\n"),
         "Only encoder-decoder"),
        (save(tmp_path / "user_tasks", embedding, "import my_unimportable_tasks\n" + tiny),
         r"user_tasks/config.gin: gin configuration error: .*my_unimportable_tasks"),
    ]
    for checkpoint, message in cases:
        assert hf_t5.main([f"--checkpoint={checkpoint}", f"--output={tmp_path / 'out'}"]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_a_hf_t5_imports_as_a_model_dir_that_fine_tunes_and_exports_back(tmp_path, monkeypatch, capsys):
    """A HF T5 directory with t5lite's SentencePiece model as its spiece.model (none can be downloaded
    here), imported, fine-tuned on t5lite's default data (its vocabulary matches) and exported."""
    monkeypatch.chdir(REPO)
    cfg = transformers.T5Config(vocab_size=8192, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.T5ForConditionalGeneration(cfg).eval()
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    hf_t5.save_hf_tokenizer(get_default_vocabulary(), str(hf_dir))  # spiece.model + tokenizer_config.json

    model_dir = str(tmp_path / "imported")
    assert hf_t5.main([f"--from_hf={hf_dir}", f"--output={model_dir}"]) == 0
    assert f'--gin.INITIAL_CHECKPOINT=\\"{model_dir}/checkpoints/0\\"' in capsys.readouterr().out
    assert checkpoints.read_step(f"{model_dir}/checkpoints/0") == 0
    config = _run_model_config(model_dir)
    assert (config.vocab_size, config.emb_dim, config.num_heads, config.scan_layers) == (8192, 32, 4, True)
    enc, dec_in, tgt = _batch()
    logits = _t5lite_logits(config, checkpoints.read_params(f"{model_dir}/checkpoints/0"), enc, dec_in, tgt)
    assert _rel_err(logits, _hf_logits(hf_model, enc, dec_in)) <= 1e-4

    run = str(tmp_path / "finetuned")
    assert train_lib.main(["--gin_file=gin/base.gin", f"--gin_file={model_dir}/config.gin", "--gin.TRAIN_STEPS=2",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=4",
                           "--gin.EvalConfig.batches=1", "--gin.CheckpointConfig.every=2",
                           f"--gin.CheckpointConfig.initial_checkpoint_path='{model_dir}/checkpoints/0'",
                           f"--gin.MODEL_DIR='{run}'"]) == 0
    gin.clear_config()
    assert f"Initialised the params from {model_dir}/checkpoints/0 (step 0)" in capsys.readouterr().out
    # Back to Hugging Face: the import as it was, and after fine-tuning.
    for step, directory in ((0, model_dir), (2, run)):
        assert hf_t5.main([f"--checkpoint={directory}/checkpoints/{step}", f"--output={tmp_path / f'back{step}'}"]) == 0
    back = [transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / f"back{s}").eval() for s in (0, 2)]
    assert _rel_err(_hf_logits(back[0], enc, dec_in), _hf_logits(hf_model, enc, dec_in)) <= 1e-6
    assert _rel_err(_hf_logits(back[1], enc, dec_in), _hf_logits(hf_model, enc, dec_in)) > 1e-3

    # A HF model with a SentencePiece model of more ids than its embedding has rows is refused.
    cfg.vocab_size = 4096
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "small")
    hf_t5.save_hf_tokenizer(get_default_vocabulary(), str(tmp_path / "small"))
    assert hf_t5.main([f"--from_hf={tmp_path / 'small'}", f"--output={tmp_path / 'refused'}"]) == 2
    assert "has 8100 ids, more than the model's 4096 embedding rows" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "refused")
