"""MODEL_DIR in a bucket: t5lite's own files go through tf.io.gfile (tested on TF's in-memory ram:// filesystem)."""

import json
import os

import pytest
import tensorflow as tf

from t5lite import fileio
from t5lite.errors import UserError
from t5lite.summaries import MetricsWriter
from t5lite.train import ensure_writable_dir


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fileio.absolute("gs://bucket/runs/t5") == "gs://bucket/runs/t5"
    assert fileio.absolute("runs/t5") == str(tmp_path / "runs" / "t5")


def test_model_dir_in_a_bucket_is_created_probed_and_not_made_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ensure_writable_dir("ram://bucket/run1") == "ram://bucket/run1"
    assert tf.io.gfile.isdir("ram://bucket/run1")
    assert tf.io.gfile.listdir("ram://bucket/run1") == []  # the write probe is gone
    assert os.listdir(tmp_path) == []  # nothing written locally (no ./ram: or ./gs: directory)


def test_metrics_reach_the_bucket_as_jsonl_and_tensorboard_events():
    writer = MetricsWriter("ram://bucket/run2")
    writer.write("train", 10, {"loss": 2.5})
    writer.write("train", 20, {"loss": 2.0})
    writer.close()
    with tf.io.gfile.GFile("ram://bucket/run2/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in records] == [(10, 2.5), (20, 2.0)]
    assert tf.io.gfile.glob("ram://bucket/run2/tensorboard/train/events.out.tfevents.*")


def test_an_unwritable_local_model_dir_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")  # fails for root too, unlike a chmod
    with pytest.raises(UserError, match="is not writable"):
        ensure_writable_dir(str(tmp_path / "a_file" / "run"))


def test_checking_a_model_dir_before_training_creates_nothing(tmp_path):
    run = tmp_path / "new" / "run"
    assert ensure_writable_dir(str(run), create=False) == str(run)
    assert not (tmp_path / "new").exists()  # created only once every check of train() has passed
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="a_file.*is not writable.*Not a directory"):
        ensure_writable_dir(str(tmp_path / "a_file" / "run"), create=False)
