"""seqio data sources for your own data: text/gzip, TSV and JSONL files, TFRecords, TFDS.

    source = file_source({"train": "data/train.jsonl", "validation": "data/dev.jsonl"},
                         file_format="jsonl", fields=("question", "answer"))
    source = file_source("corpus/*.txt.gz", file_format="text",
                         hash_splits={"train": 0.98, "validation": 0.01, "test": 0.01})
    source = tfds_source("c4/en:3.0.1")          # on a machine that can reach TFDS data
    source = FoldedSource(source)                 # + k-fold splits: 'train[fold=2/5]' (splits.py)

File sources read their files once per process into memory, check every row and report bad
ones by file and line (or refuse them, with bad_rows="error"); use TFRecord or TFDS sources
for corpora larger than memory. Sources without splits get deterministic hash-based splits:
an example's split depends only on its text, so it never moves when files are added.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5lite.data import splits as splits_lib
from t5lite.errors import UserError

FILE_FORMATS = ("text", "tsv", "jsonl")
BAD_ROW_POLICIES = ("report", "error")
_MAX_REPORTED_BAD_ROWS = 10


def hash_split(key: str, fractions: Mapping[str, float]) -> str:
    """The split of an example, from a hash of `key`: uniform, deterministic, order-free."""
    point = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") / 2**64
    cumulative = 0.0
    for split, fraction in fractions.items():
        cumulative += fraction
        if point < cumulative:
            return split
    return next(reversed(fractions))  # float round-off at the top end


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped). A line that is not a JSON object,
    or that `check` rejects (it returns the problem, else None), fails with file:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg}).") from e
            problem = (check(row) if check else None) if isinstance(row, dict) else "not a JSON object"
            if problem:
                raise UserError(f"{path}:{n}: {problem}.")
            rows.append(row)
    return rows


def _parse_rows(path: str, file_format: str, fields: Sequence[str], tsv_columns: Sequence[str] | None):
    """Yields (line_number, record dict or None, problem or None) for every data row of a file."""
    with _open_text(path) as f:
        if file_format == "text":
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, {fields[0]: line.rstrip("\n")}, None
            return
        if file_format == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, None, f"invalid JSON ({e.msg})"
                    continue
                missing = [k for k in fields if not isinstance(obj, dict) or k not in obj]
                yield (n, None, f"missing field(s) {missing}") if missing else (n, {k: obj[k] for k in fields}, None)
            return
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(tsv_columns) if tsv_columns else next(reader, [])
        missing = [k for k in fields if k not in columns]
        if missing:
            raise UserError(f"{path}: TSV columns {columns} lack the field(s) {missing}.")
        first_line = 1 if tsv_columns else 2
        for n, row in enumerate(reader, first_line):
            if len(row) != len(columns):
                yield n, None, f"{len(row)} columns, expected {len(columns)}"
            else:
                record = dict(zip(columns, row, strict=True))
                yield n, {k: record[k] for k in fields}, None


@functools.lru_cache(maxsize=32)
def _load_records(paths: tuple[str, ...], file_format: str, fields: tuple[str, ...],
                  tsv_columns: tuple[str, ...] | None, bad_rows: str) -> tuple[dict[str, str], ...]:
    records, problems = [], []
    for path in paths:
        try:
            for n, record, problem in _parse_rows(path, file_format, fields, tsv_columns):
                if problem:
                    problems.append(f"{path}:{n}: {problem}")
                else:
                    records.append({k: str(v) for k, v in record.items()})
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e}).") from e
    if problems:
        shown = "\n  ".join(problems[:_MAX_REPORTED_BAD_ROWS])
        message = f"{len(problems)} malformed row(s) in {', '.join(paths)}:\n  {shown}"
        if bad_rows == "error":
            raise UserError(message + "\n(bad_rows='report' skips and reports them instead.)")
        logging.warning("Skipped %s", message)
    return tuple(records)


def _expand(patterns: str | Sequence[str]) -> tuple[str, ...]:
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    paths = []
    for pattern in patterns:
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise UserError(f"No file matches {pattern!r}.")
        paths.extend(matches)
    return tuple(paths)


def file_source(
    files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
    *,
    file_format: str,
    fields: Sequence[str] = ("text",),
    tsv_columns: Sequence[str] | None = None,
    hash_splits: Mapping[str, float] | None = None,
    hash_key: str | None = None,
    bad_rows: str = "report",
) -> seqio.FunctionDataSource:
    """A seqio source of {field: string} examples read from local or gfile paths (globs allowed).

    files: {split: pattern(s)}, or pattern(s) split by `hash_splits` ({split: fraction}, summing
      to 1) on the value of `hash_key` (default: the first field).
    file_format: "text" (one example per non-empty line, field fields[0]), "tsv" (header row
      unless tsv_columns is given; no quoting) or "jsonl" (one JSON object per line).
    bad_rows: "report" skips malformed rows and logs them with file and line; "error" refuses them.
    """
    if file_format not in FILE_FORMATS:
        raise UserError(f"file_format={file_format!r}; choose one of {FILE_FORMATS}.")
    if bad_rows not in BAD_ROW_POLICIES:
        raise UserError(f"bad_rows={bad_rows!r}; choose one of {BAD_ROW_POLICIES}.")
    if file_format == "text" and len(fields) != 1:
        raise UserError(f"A text file has one field per example; got fields={list(fields)}.")
    if isinstance(files, Mapping) == (hash_splits is not None):
        raise UserError("Give files as {split: pattern} or give hash_splits, exactly one of the two.")
    if hash_splits is not None and abs(sum(hash_splits.values()) - 1.0) > 1e-6:
        raise UserError(f"hash_splits fractions must sum to 1, got {dict(hash_splits)}.")
    split_paths = {s: _expand(p) for s, p in files.items()} if isinstance(files, Mapping) else None
    all_paths = None if split_paths else _expand(files)
    key = hash_key or fields[0]
    load = functools.partial(_load_records, file_format=file_format, fields=tuple(fields),
                             tsv_columns=tuple(tsv_columns) if tsv_columns else None, bad_rows=bad_rows)

    def records_of(split: str) -> tuple[dict[str, str], ...]:
        if split_paths:
            return load(split_paths[split])
        return tuple(r for r in load(all_paths) if hash_split(r[key], hash_splits) == split)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        records = records_of(split)
        columns = {k: tf.constant([r[k] for r in records], tf.string, shape=[len(records)]) for k in fields}
        dataset = tf.data.Dataset.from_tensor_slices(columns)
        if shuffle_files and records:
            dataset = dataset.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
        return dataset

    splits = tuple(split_paths) if split_paths else tuple(hash_splits)
    return seqio.FunctionDataSource(dataset_fn, splits=splits)


def tfrecord_source(split_to_pattern: Mapping[str, str | Sequence[str]], text_features: Sequence[str] = ("text",)):
    """tf.train.Example records with string features; for corpora larger than memory."""
    for pattern in split_to_pattern.values():
        _expand(pattern)  # a missing file is named now, not deep inside tf.data
    return seqio.TFExampleDataSource(
        dict(split_to_pattern), {name: tf.io.FixedLenFeature([], tf.string) for name in text_features})


def tfds_source(name: str, data_dir: str | None = None, splits: Mapping[str, str] | None = None):
    """A TFDS dataset by name ("c4/en:3.0.1"); splits may map task splits to TFDS split strings."""
    return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=data_dir, splits=splits)


class FoldedSource(seqio.DataSource):
    """`source` with k-fold cross-validation splits (splits.py), e.g. 'train[fold=2/5,heldout]': a fold
    split reads its base split in order and keeps its fold's rows; a stratified one reads the base split
    once more for the labels (`label_field`). For data that fits in memory, as fine-tuning sets do.
    Plain splits are `source`'s own."""

    def __init__(self, source: seqio.DataSource, label_field: str = "targets"):
        super().__init__(splits=source.splits, caching_permitted=source.caching_permitted)
        self._splits = splits_lib.FoldSplits(source.splits)
        self.source, self.label_field = source, label_field

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return self.source.supports_arbitrary_sharding

    def list_shards(self, split: str) -> Sequence[str]:
        return [split] if splits_lib.FoldSplit.parse(split) else self.source.list_shards(split)

    def num_input_examples(self, split: str) -> int | None:
        return None if splits_lib.FoldSplit.parse(split) else self.source.num_input_examples(split)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
        fold = splits_lib.FoldSplit.parse(split)
        if fold is None:
            return self.source.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)
        if fold.base not in self.source.splits:
            raise UserError(f"Split {split!r}: the data has no split {fold.base!r}; it has {list(self.source.splits)}.")
        whole = self.source.get_dataset(split=fold.base, shuffle=False)
        if fold.stratified:
            labels = [row[self.label_field] for row in whole.as_numpy_iterator()]
            n = len(labels)
        else:
            labels, n = None, int(whole.reduce(np.int64(0), lambda count, _: count + 1))
        keep = np.zeros(n, bool)
        keep[fold.rows(n, labels)] = True
        keep = tf.constant(keep)

        def in_split(index, row):
            return keep[index]

        def row_of(index, row):
            return row

        dataset = whole.enumerate().filter(in_split).map(row_of)
        if shard_info:
            dataset = dataset.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            dataset = dataset.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
        return dataset
