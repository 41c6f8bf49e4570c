"""MODEL_DIR/vocabulary.json: a checkpoint meets only data of the vocabulary it was trained with."""

import hashlib
import json
import os
import re

import gin
import pytest
import seqio
from test_eval import _gin_args, _save_random_checkpoint
from test_train import TINY_RUN

from t5lite import eval as eval_lib
from t5lite import evaluation, run_dir
from t5lite import infer as infer_lib
from t5lite import train as train_lib
from t5lite.data import vocab, vocab_record
from t5lite.errors import UserError

BYTES = seqio.ByteVocabulary()
LINES_A = [f"the {w} went over the hill and came back with {n} apples" for n in range(40)
           for w in ("cat", "dog", "fox")]
LINES_B = [f"a {w} sat by the river reading {n} old letters" for n in range(40) for w in ("crow", "owl", "wren")]


if "t5lite_test_bytes" not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        "t5lite_test_bytes",
        source=seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: None, splits=["validation"]),
        output_features={k: seqio.Feature(BYTES) for k in ("inputs", "targets")},
        preprocessors=[seqio.preprocessors.tokenize])


def _features(vocabulary):
    return {k: seqio.Feature(vocabulary) for k in ("inputs", "targets")}


def _sentencepiece(tmp_path, name, lines):
    path = vocab.train_sentencepiece(lines, str(tmp_path / name), vocab_size=40, byte_fallback=False)
    return seqio.SentencePieceVocabulary(path, extra_ids=vocab.DEFAULT_EXTRA_IDS)


def _record_bytes_vocabulary(model_dir):
    """MODEL_DIR says its model was trained on byte-tokenized data."""
    os.makedirs(model_dir, exist_ok=True)
    vocab_record.write(model_dir, _features(BYTES))


def test_description_identifies_a_sentencepiece_model_by_its_bytes():
    default = vocab.get_default_vocabulary()
    description = vocab_record.describe(default)
    with open(vocab.DEFAULT_VOCAB_PATH, "rb") as f:
        model_bytes = f.read()
    assert description == {"type": "SentencePieceVocabulary", "vocab_size": 8100, "extra_ids": 100,
                           "sha256": hashlib.sha256(model_bytes).hexdigest(), "file": vocab.DEFAULT_VOCAB_PATH}
    assert vocab_record.describe(BYTES) == {"type": "ByteVocabulary", "vocab_size": 259, "extra_ids": 0}


def test_two_sentencepiece_models_of_the_same_size_do_not_match(tmp_path):
    a, b = _sentencepiece(tmp_path, "a", LINES_A), _sentencepiece(tmp_path, "b", LINES_B)
    assert a.vocab_size == b.vocab_size == 140
    vocab_record.write(str(tmp_path), _features(a))
    assert json.load(open(tmp_path / "vocabulary.json"))["targets"]["sha256"] == vocab_record.describe(a)["sha256"]
    vocab_record.check(str(tmp_path), "task 'same'", _features(a))  # the same model elsewhere: fine
    moved = tmp_path / "moved.model"
    moved.write_bytes(open(a.sentencepiece_model_file, "rb").read())
    vocab_record.check(str(tmp_path), "task 'moved'",
                       _features(seqio.SentencePieceVocabulary(str(moved), extra_ids=vocab.DEFAULT_EXTRA_IDS)))
    with pytest.raises(UserError, match=r"task 'other' tokenizes 'inputs' with SentencePieceVocabulary of 140 ids "
                                        r"\(100 sentinels, model sha256 [0-9a-f]{12}, .*b.model\), but the model in "
                                        r".* was trained with SentencePieceVocabulary of 140 ids"):
        vocab_record.check(str(tmp_path), "task 'other'", _features(b))
    with pytest.raises(UserError, match="sentinels"):  # same model, other sentinel count
        vocab_record.check(str(tmp_path), "task 'x'", _features(seqio.SentencePieceVocabulary(
            a.sentencepiece_model_file, extra_ids=10)))


def test_a_feature_the_training_data_lacked_is_compared_with_its_targets(tmp_path):
    vocab_record.write(str(tmp_path), {"targets": seqio.Feature(BYTES)})  # a decoder-only LM's data
    vocab_record.check(str(tmp_path), "task 'prefix'", _features(BYTES))
    with pytest.raises(UserError, match="'inputs'"):
        vocab_record.check(str(tmp_path), "task 'prefix'",
                           {"inputs": seqio.Feature(vocab.get_default_vocabulary()), "targets": seqio.Feature(BYTES)})


def test_nothing_recorded_nothing_checked(tmp_path):
    vocab_record.check(str(tmp_path), "task 'any'", _features(BYTES))


def test_model_dir_of_a_checkpoint():
    for path in ("/r/run", "/r/run/", "/r/run/checkpoints", "/r/run/checkpoints/600", "/r/run/checkpoints/600/"):
        assert run_dir.model_dir_of(path) == "/r/run", path


def test_eval_and_infer_refuse_a_checkpoint_trained_with_another_vocabulary(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, 0)
    evaluation.check_trained_vocabulary(os.path.join(model_dir, "checkpoints"), "t5lite_test_eval")  # no record
    vocab_record.write(model_dir, _features(vocab.get_default_vocabulary()))
    evaluation.check_trained_vocabulary(os.path.join(model_dir, "checkpoints"), "t5lite_test_eval")

    _record_bytes_vocabulary(model_dir)
    assert eval_lib.main(_gin_args(model_dir)) == 2
    err = capsys.readouterr().err
    assert re.search(r"task 't5lite_test_\w+' tokenizes 'inputs' with SentencePieceVocabulary of 8100 ids", err)
    assert f"but the model in {model_dir} was trained with ByteVocabulary of 259 ids" in err

    gin.clear_config()
    task = "--gin.infer.task_name='t5lite_test_copy'"
    assert infer_lib.main(_infer_args(model_dir, tmp_path / "out.jsonl", task)) == 2
    assert "task 't5lite_test_copy' tokenizes 'inputs' with SentencePieceVocabulary" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def _infer_args(model_dir, output, *extra):
    return ["--gin_file=gin/runs/infer.gin", "--gin_file=gin/models/t5_1_1_tiny.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.infer.output_path='{output}'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 4}", *extra]


def test_infer_encodes_an_input_file_with_the_vocabulary_the_model_was_trained_with(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    _save_random_checkpoint(model_dir, 1, 0)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"inputs": "copy: apple", "targets": "apple"}) + "\n")
    _record_bytes_vocabulary(model_dir)
    assert isinstance(vocab_record.trained_vocabulary(model_dir), seqio.ByteVocabulary)
    # The same file and checkpoint score differently once the record is gone: the targets were
    # encoded with the byte vocabulary ("apple": 5 ids + EOS), then with the default one (fewer ids).
    scores = {}
    for name in ("bytes", "default"):
        if name == "default":
            os.remove(os.path.join(model_dir, "vocabulary.json"))
        gin.clear_config()
        out = tmp_path / f"{name}.jsonl"
        assert infer_lib.main(_infer_args(model_dir, out, f"--gin.infer.input_file='{inputs}'",
                                          "--gin.infer.mode='score'", "--gin.infer.batch_size=1")) == 0
        scores[name] = json.loads(out.read_text())["score"]
    assert scores["bytes"] != scores["default"]

    a = _sentencepiece(tmp_path, "a", LINES_A)
    vocab_record.write(model_dir, _features(a))
    assert vocab_record.describe(vocab_record.trained_vocabulary(model_dir)) == vocab_record.describe(a)
    os.replace(a.sentencepiece_model_file, tmp_path / "elsewhere.model")
    gin.clear_config()
    assert infer_lib.main(_infer_args(model_dir, tmp_path / "x.jsonl", f"--gin.infer.input_file='{inputs}'")) == 2
    assert f"trained with the SentencePiece model {a.sentencepiece_model_file} (vocabulary.json), which does not " \
           "exist here" in capsys.readouterr().err
    _sentencepiece(tmp_path, "a", LINES_B)  # another model at the recorded path
    with pytest.raises(UserError, match="has changed since the model"):
        vocab_record.trained_vocabulary(model_dir)

    # A run trained with the default vocabulary in another clone of t5lite (its recorded path is gone):
    # the default vocabulary here has the recorded bytes, so it is the one.
    default = vocab.get_default_vocabulary()
    record = {k: {**vocab_record.describe(default), "file": "/elsewhere/t5lite/data/vocab/default.model"}
              for k in ("inputs", "targets")}
    with open(os.path.join(model_dir, "vocabulary.json"), "w") as f:
        json.dump(record, f)
    assert vocab_record.trained_vocabulary(model_dir) is default


def test_training_refuses_to_resume_or_fine_tune_a_model_of_another_vocabulary(tmp_path, capsys):
    resumed = str(tmp_path / "resumed")
    _save_random_checkpoint(resumed, 1, 0)
    _record_bytes_vocabulary(resumed)
    assert train_lib.main(TINY_RUN + [f"--gin.MODEL_DIR='{resumed}'", "--gin.TRAIN_STEPS=2"]) == 2
    err = capsys.readouterr().err
    assert "the training data 't5lite_default_span_corruption' tokenizes 'inputs' with SentencePieceVocabulary" in err
    assert f"the model in {resumed} was trained with ByteVocabulary" in err
    assert vocab_record.read(resumed)["targets"]["type"] == "ByteVocabulary"  # the record is left as it was

    gin.clear_config()
    fresh = str(tmp_path / "fresh")
    assert train_lib.main(TINY_RUN + [f"--gin.MODEL_DIR='{fresh}'", "--gin.TRAIN_STEPS=2",
                                      f"--gin.CheckpointConfig.initial_checkpoint_path='{resumed}/checkpoints/1'"]) == 2
    assert f"the model in {resumed} was trained with ByteVocabulary" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(fresh, "checkpoints"))

    gin.clear_config()
    assert train_lib.main(TINY_RUN + [f"--gin.MODEL_DIR='{fresh}'", "--gin.TRAIN_STEPS=2",
                                      "--gin.EvalConfig.mixture_or_task_name='t5lite_test_bytes'"]) == 2
    assert ("eval task 't5lite_test_bytes' tokenizes 'inputs' with ByteVocabulary of 259 ids (0 sentinels), but the "
            "training data 't5lite_default_span_corruption' uses SentencePieceVocabulary") in capsys.readouterr().err
