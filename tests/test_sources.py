"""Data sources over files, TFRecords and TFDS; bad rows; hash splits; the README's new-task guide."""

import collections
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5lite.data import embedded_corpus, sources
from t5lite.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(source, split, **kwargs):
    return [{k: v.decode() for k, v in ex.items()}
            for ex in source.get_dataset(split=split, shuffle=False, **kwargs).as_numpy_iterator()]


def test_hash_split_is_deterministic_and_follows_the_fractions():
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    splits = [sources.hash_split(f"example {i}", fractions) for i in range(20000)]
    counts = collections.Counter(splits)
    assert abs(counts["train"] / 20000 - 0.8) < 0.015 and abs(counts["test"] / 20000 - 0.1) < 0.01
    assert splits == [sources.hash_split(f"example {i}", fractions) for i in range(20000)]


def test_hash_split_source_partitions_the_examples(tmp_path):
    path = tmp_path / "lines.txt.gz"
    import gzip

    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(f"line number {i}\n" for i in range(300)))
    src = sources.file_source(str(path), file_format="text", hash_splits={"train": 0.7, "validation": 0.3})
    train = {ex["text"] for ex in _examples(src, "train")}
    val = {ex["text"] for ex in _examples(src, "validation")}
    assert not train & val and len(train | val) == 300 and 150 < len(train) < 250


def test_jsonl_bad_rows_are_reported_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n{not json}\n{"q": "only question"}\n\n{"q": "c", "a": "d"}\n')
    src = sources.file_source({"train": str(path)}, file_format="jsonl", fields=("q", "a"))
    with caplog.at_level(logging.WARNING):
        examples = _examples(src, "train")
    assert examples == [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}]
    assert f"{path}:2: invalid JSON" in caplog.text and f"{path}:3: missing field(s) ['a']" in caplog.text
    strict = sources.file_source({"train": str(path)}, file_format="jsonl", fields=("q", "a"), bad_rows="error")
    with pytest.raises(UserError, match=r"(?s)2 malformed row\(s\).*data.jsonl:2: invalid JSON"):
        _examples(strict, "train")


@pytest.mark.full_data  # SST-2 is not shipped with the tests (no license to redistribute it)
def test_real_sst2_tsv_reads_every_row(data_dir):
    dev = data_dir.path("sst2", "dev.tsv")
    src = sources.file_source({"validation": dev}, file_format="tsv", fields=("sentence", "label"), bad_rows="error")
    rows = _examples(src, "validation")
    assert len(rows) == 872 and collections.Counter(r["label"] for r in rows) == {"1": 444, "0": 428}


def test_tsv_row_with_wrong_column_count_is_reported(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nbroken row\n")
    src = sources.file_source({"train": str(path)}, file_format="tsv", fields=("sentence", "label"), bad_rows="error")
    with pytest.raises(UserError, match=r"d.tsv:3: 1 columns, expected 2"):
        _examples(src, "train")


def test_missing_file_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(UserError, match="nope.txt"):
        sources.file_source({"train": str(tmp_path / "nope.txt")}, file_format="text")
    with pytest.raises(UserError, match="file_format"):
        sources.file_source({"train": "x"}, file_format="csv")
    with pytest.raises(UserError, match="sum to 1"):
        sources.file_source(str(tmp_path), file_format="text", hash_splits={"train": 0.5})


def test_tfrecord_source_reads_tf_examples(tmp_path):
    path = str(tmp_path / "data.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for text in ("first document", "second document"):
            feature = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    src = sources.tfrecord_source({"train": path})
    assert sorted(ex["text"] for ex in _examples(src, "train")) == ["first document", "second document"]


class LocalLines(tfds.core.GeneratorBasedBuilder):
    """A real TFDS builder over local text files (stands in for C4 on a machine without network)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        root = self._manual_dir_root
        return {"train": self._generate_examples(os.path.join(root, "train.txt")),
                "validation": self._generate_examples(os.path.join(root, "valid.txt"))}

    def _generate_examples(self, path):
        with open(path) as f:
            for i, line in enumerate(f):
                yield i, {"text": line.strip()}


def test_tfds_source_reads_a_prepared_tfds_dataset(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.txt").write_text("alpha\nbeta\ngamma\n")
    (tmp_path / "raw" / "valid.txt").write_text("delta\n")
    LocalLines._manual_dir_root = str(tmp_path / "raw")
    LocalLines(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    src = sources.tfds_source("local_lines:1.0.0", data_dir=str(tmp_path / "tfds"))
    assert sorted(ex["text"] for ex in _examples(src, "train")) == ["alpha", "beta", "gamma"]
    assert isinstance(src, seqio.TfdsDataSource)


def _readme_blocks():
    readme = open(os.path.join(REPO, "docs", "data-and-tasks.md")).read()
    guide = readme[readme.index("## Adding a new task"):]
    python_block = re.search(r"```python\n(.*?)```", guide, re.DOTALL).group(1)
    gin_block = re.search(r"`my_task.gin`:\n\n```\n(.*?)```", guide, re.DOTALL).group(1)
    return python_block, gin_block


@pytest.mark.slow
def test_readme_new_task_guide_trains_and_evaluates_a_user_task(tmp_path):
    python_block, gin_block = _readme_blocks()
    (tmp_path / "my_tasks.py").write_text(python_block)
    (tmp_path / "my_task.gin").write_text(gin_block)
    (tmp_path / "my_data").mkdir()
    # tiny Shakespeare as shipped in the package (byte-identical to the public file; corpus/README.md there)
    with open(os.path.join(embedded_corpus.corpus_dir(), "tinyshakespeare", "input.txt")) as f:
        lines = [line.strip() for line in f if len(line.split()) >= 6][:600]
    with open(tmp_path / "my_data" / "qa.jsonl", "w") as f:
        for line in lines:  # real text: the first words of a line -> the rest of it
            words = line.split()
            f.write(json.dumps({"question": " ".join(words[:3]), "answer": " ".join(words[3:])}) + "\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    cmd = [sys.executable, "-m", "t5lite.train", "--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
           "--gin_file=my_task.gin", f"--gin.MODEL_DIR='{tmp_path}/run'", "--gin.TRAIN_STEPS=20",
           "--gin.BATCH_SIZE=8", "--gin.EvalConfig.every=20", "--gin.EvalConfig.batches=2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.load(open(tmp_path / "run" / "eval_results.json"))
    assert list(results["tasks"]) == ["my_qa"] and results["tasks"]["my_qa"]["num_tokens"] > 0


def test_instruction_task_puts_the_loss_on_the_response_only(tmp_path):
    from t5lite.data import pipeline, tasks

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say hello number {i}.", "response": f"Hello {i}!"}) + "\n"
                            for i in range(20)))
    tasks.add_instruction_task("test_instructions", {"train": str(path)})
    batch = next(pipeline.get_batches("test_instructions", split="train", task_feature_lengths={"inputs": 16,
                                      "targets": 8}, model_type="prefix_lm", batch_size=2, shuffle=False, seed=0,
                                      pack=False))
    weights, prefix = batch["decoder_loss_weights"][0], batch["decoder_causal_attention"][0]
    prompt_len = int(prefix.sum()) - 1  # the prefix mask also covers the first target position
    assert weights[:prompt_len].sum() == 0 and weights[prompt_len:].sum() > 0
    assert (weights[prompt_len:] > 0).sum() == len(batch["decoder_target_tokens"][0].nonzero()[0]) - prompt_len


def test_a_supervised_task_tokenizes_with_the_vocabulary_it_is_given(tmp_path):
    from t5lite.data import pipeline, tasks

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"hi {i}", "response": "ok"}) + "\n" for i in range(4)))
    task = tasks.add_instruction_task("test_bytes_task", {"train": str(path)},
                                      vocabulary=seqio.ByteVocabulary(extra_ids=100))
    assert all(isinstance(f.vocabulary, seqio.ByteVocabulary) for f in task.output_features.values())
    batch = next(pipeline.get_batches("test_bytes_task", split="train", task_feature_lengths={"inputs": 8,
                                      "targets": 4}, model_type="encoder_decoder", batch_size=1, shuffle=False,
                                      seed=0, pack=False))
    assert list(batch["encoder_input_tokens"][0][:5]) == [ord(c) + 3 for c in "hi 0"] + [1]  # bytes + 3, EOS
