"""Downstream (fine-tuning and evaluation) tasks over public datasets in a local data directory.

    export T5LITE_DATA_DIR=/path/to/data      # or --gin.downstream_data_dir.path=\"/path\"

Expected layout (that of the project's shared data staging; formats and licenses there):
    sst2/{train,dev}.tsv                           GLUE SST-2
    multi30k/{train,val,test_2016_flickr}.{en,de}.gz
    squad_v1.1/dev-v1.1.json

Tasks (registered on import; files are read only when a split is used):
    sst2                 "sst2 sentence: ..." -> "positive" | "negative"    train, validation
    multi30k_en_de       "translate English to German: ..." -> German       train, validation, test
    squad_v1_1           "question: ... context: ..." -> first answer     train, validation
                         (the public dev set split 80/20 by article, so no context is shared);
                         metric: EM / F1, each the max over all reference answers of a question

The zero-shot benchmarks over the same directory (ARC, LAMBADA) are in zero_shot.py.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
from collections.abc import Mapping
from typing import Any

import gin
import seqio
import tensorflow as tf

from t5lite.data import metrics, sources, tasks
from t5lite.errors import UserError

DATA_DIR_ENV = "T5LITE_DATA_DIR"
SQUAD_SPLITS = {"train": 0.8, "validation": 0.2}


@gin.configurable
def downstream_data_dir(path: str | None = None) -> str:
    """The data directory: the gin binding, else $T5LITE_DATA_DIR."""
    directory = path or os.environ.get(DATA_DIR_ENV)
    if not directory:
        raise UserError(f"Downstream tasks need their data: set {DATA_DIR_ENV}=/path/to/data or "
                        "--gin.downstream_data_dir.path=\\\"/path/to/data\\\".")
    return directory


def data_file(*parts: str) -> str:
    path = os.path.join(downstream_data_dir(), *parts)
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: check {DATA_DIR_ENV} (the layout is in t5lite/data/downstream.py).")
    return path


def _sst2_records(split: str) -> list[dict[str, str]]:
    path = data_file("sst2", {"train": "train.tsv", "validation": "dev.tsv"}[split])
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"inputs": f"sst2 sentence: {r['sentence'].strip()}",
             "targets": "positive" if r["label"] == "1" else "negative"} for r in rows]


def _multi30k_records(split: str) -> list[dict[str, str]]:
    stem = {"train": "train", "validation": "val", "test": "test_2016_flickr"}[split]
    with gzip.open(data_file("multi30k", f"{stem}.en.gz"), "rt", encoding="utf-8") as f:
        english = [line.strip() for line in f]
    with gzip.open(data_file("multi30k", f"{stem}.de.gz"), "rt", encoding="utf-8") as f:
        german = [line.strip() for line in f]
    if len(english) != len(german):
        raise UserError(f"multi30k {stem}: {len(english)} English but {len(german)} German lines.")
    return [{"inputs": f"translate English to German: {en}", "targets": de} for en, de in zip(english, german,
                                                                                                strict=True)]


def _squad_records(split: str) -> list[dict[str, str]]:
    with open(data_file("squad_v1.1", "dev-v1.1.json"), encoding="utf-8") as f:
        articles = json.load(f)["data"]
    records = []
    for article in articles:
        if sources.hash_split(article["title"], SQUAD_SPLITS) != split:
            continue
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [a["text"] for a in qa["answers"]]
                records.append({"inputs": f"question: {qa['question']} context: {paragraph['context']}",
                                "targets": answers[0], "answers": json.dumps(answers), "id": qa["id"]})
    return records


def _tensor(values: list) -> tf.Tensor:
    """A column of records: int64 if its values are ints (e.g. ids, labels), else strings."""
    dtype = tf.int64 if values and isinstance(values[0], int) else tf.string
    return tf.constant(values, dtype, shape=[len(values)])


def records_source(records_fn, splits: tuple[str, ...]) -> seqio.FunctionDataSource:
    """A seqio source over records_fn(split) -> list of {feature: str | int}, read once per data dir."""

    @functools.cache
    def cached(data_dir: str, split: str):  # keyed by the directory: a new one is read afresh
        del data_dir  # records_fn reads the current downstream_data_dir()
        return records_fn(split)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        records = cached(downstream_data_dir(), split)
        keys = list(records[0]) if records else ["inputs", "targets"]
        dataset = tf.data.Dataset.from_tensor_slices(
            {k: _tensor([r[k] for r in records]) for k in keys})
        return dataset.shuffle(len(records), seed=seed) if shuffle_files and records else dataset

    return seqio.FunctionDataSource(dataset_fn, splits=splits)


def squad_references(target: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """seqio postprocess_fn of squad_v1_1: a target -> every reference answer of its question (the
    `answers` feature, a JSON list), so metrics.squad takes the max over them as the official script
    does; a prediction is left as decoded."""
    if not is_target:
        return target
    answers = example["answers"]
    return json.loads(answers.decode("utf-8") if isinstance(answers, bytes) else answers)


def register_downstream_tasks(vocabulary: seqio.Vocabulary | None = None, suffix: str = "") -> None:
    """Registers sst2, multi30k_en_de and squad_v1_1, each name + `suffix`, tokenized with
    `vocabulary` (default t5lite's). E.g. for a T5 imported with `t5lite.hf_t5 --from_hf`:
    register_downstream_tasks(seqio.SentencePieceVocabulary("runs/t5_small/spiece.model", extra_ids=100),
    suffix="_t5") gives sst2_t5, ... in that model's vocabulary."""
    for name, records_fn, splits, metric_fns in (
        ("sst2", _sst2_records, ("train", "validation"), [metrics.accuracy]),
        ("multi30k_en_de", _multi30k_records, ("train", "validation", "test"), [metrics.bleu]),
    ):
        tasks.add_supervised_task(name + suffix, records_source(records_fn, splits), inputs_field="inputs",
                                  targets_field="targets", metric_fns=metric_fns, vocabulary=vocabulary)
    tasks.add_supervised_task("squad_v1_1" + suffix, records_source(_squad_records, tuple(SQUAD_SPLITS)),
                              inputs_field="inputs", targets_field="targets", keep_fields=("answers", "id"),
                              metric_fns=[metrics.squad], postprocess_fn=squad_references, vocabulary=vocabulary)


register_downstream_tasks()
