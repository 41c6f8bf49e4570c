"""Downstream tasks read the real public datasets (../shared/data) in the documented formats."""

import os

import pytest
import seqio

from t5lite.data import downstream, pipeline
from t5lite.errors import UserError

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.fixture(autouse=True)
def data_dir(monkeypatch):
    monkeypatch.setenv(downstream.DATA_DIR_ENV, SHARED_DATA)


def _raw(task, split):
    ds = seqio.TaskRegistry.get(task).source.get_dataset(split=split, shuffle=False)
    return [{k: v.decode() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_sst2_validation_is_the_glue_dev_set():
    rows = _raw("sst2", "validation")
    assert len(rows) == 872
    assert sum(r["targets"] == "positive" for r in rows) == 444
    assert rows[0]["inputs"].startswith("sst2 sentence: ")


def test_multi30k_splits_are_line_aligned_pairs():
    assert [len(_raw("multi30k_en_de", s)) for s in ("validation", "test")] == [1014, 1000]
    first = _raw("multi30k_en_de", "validation")[0]
    assert first == {"inputs": "translate English to German: A group of men are loading cotton onto a truck",
                     "targets": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"}


def test_squad_dev_is_split_by_article_without_shared_contexts():
    train, val = _raw("squad_v1_1", "train"), _raw("squad_v1_1", "validation")
    assert len(train) + len(val) == 10570 and 0.1 < len(val) / 10570 < 0.35
    context = lambda r: r["inputs"].split(" context: ", 1)[1]  # noqa: E731
    assert not {context(r) for r in train} & {context(r) for r in val}
    assert all(r["targets"] in r["inputs"] for r in val[:50])  # extractive answers


def test_tokenized_batches_for_fine_tuning():
    batch = next(pipeline.get_batches("sst2", split="validation", task_feature_lengths={"inputs": 64, "targets": 4},
                                      model_type="encoder_decoder", batch_size=4, shuffle=False, seed=0))
    assert batch["encoder_input_tokens"].shape == (4, 64) and batch["decoder_target_tokens"].shape == (4, 4)


def test_missing_data_dir_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv(downstream.DATA_DIR_ENV)
    with pytest.raises(UserError, match="T5LITE_DATA_DIR"):
        _raw("sst2", "validation")
    monkeypatch.setenv(downstream.DATA_DIR_ENV, "/nonexistent")
    with pytest.raises(UserError, match="/nonexistent/sst2/dev.tsv does not exist"):
        _raw("sst2", "validation")
