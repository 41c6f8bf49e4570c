"""Which vocabulary a model was trained with: MODEL_DIR/vocabulary.json, and the check against it.

A checkpoint's parameters only fit data tokenized by the vocabulary it was trained with. A
vocabulary of another size is caught when the parameters are restored (other shapes), but two
vocabularies with the same number of ids (or a smaller one than the embedding table) restore
fine and give garbage. So training writes, per feature of its mixture, what identifies the
vocabulary (class, size, sentinels, and for SentencePiece the sha256 of the model), and eval,
infer, a resumed run and fine-tuning from a checkpoint compare their data's vocabulary with it.
A MODEL_DIR without the record (from before it existed, or a converted checkpoint) is not checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import seqio

from t5lite import fileio, run_dir
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError

RECORD = run_dir.VOCABULARY
# Kept in the record to tell the reader where the vocabulary came from; not compared (a model file
# may be moved).
NOT_COMPARED = ("file",)


def describe(vocabulary: seqio.Vocabulary) -> dict[str, Any]:
    """What identifies `vocabulary`: its class, size, sentinels, and for SentencePiece the sha256 of
    the model file (two SentencePiece models of the same size tokenize differently)."""
    description: dict[str, Any] = {"type": type(vocabulary).__name__, "vocab_size": vocabulary.vocab_size,
                                   "extra_ids": vocabulary.extra_ids}
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        # The file's bytes: seqio's sp_model is a re-serialised proto with the sentinels added.
        with fileio.open_file(vocabulary.sentencepiece_model_file, "rb") as f:
            description["sha256"] = hashlib.sha256(f.read()).hexdigest()
        description["file"] = vocabulary.sentencepiece_model_file
    return description


def write(model_dir: str, features: Mapping[str, seqio.Feature]) -> None:
    """MODEL_DIR/vocabulary.json: the vocabulary of each feature of the data a run trains on."""
    _write_record(model_dir, {name: describe(feature.vocabulary) for name, feature in features.items()})


def copy(model_dir: str, new_model_dir: str) -> None:
    """Gives `new_model_dir` (e.g. an export of the model) the record of `model_dir`, if it has one."""
    record = read(model_dir)
    if record is not None:
        _write_record(new_model_dir, record)


def _write_record(model_dir: str, record: Mapping[str, Mapping[str, Any]]) -> None:
    with fileio.open_file(fileio.join(model_dir, RECORD), "w") as f:
        json.dump(record, f, indent=2)


def read(model_dir: str) -> dict[str, dict[str, Any]] | None:
    """The record of MODEL_DIR, or None if it has none."""
    path = fileio.join(model_dir, RECORD)
    if not fileio.exists(path):
        return None
    with fileio.open_file(path) as f:
        return json.load(f)


def trained_vocabulary(model_dir: str) -> seqio.Vocabulary | None:
    """The vocabulary of the training data's "targets", rebuilt from the record (SentencePiece: t5lite's
    default vocabulary if it has the recorded bytes, wherever this copy of t5lite is, else the recorded
    file, which must still have them; bytes); None without a record or for a vocabulary class it
    cannot rebuild."""
    record = read(model_dir)
    description = (record or {}).get("targets")
    if description is None:
        return None
    if description["type"] == "ByteVocabulary":
        return seqio.ByteVocabulary(extra_ids=description["extra_ids"])
    if description["type"] != "SentencePieceVocabulary":
        return None
    default = get_default_vocabulary()
    if _compared(describe(default)) == _compared(description):  # a run moved to another machine or clone
        return default
    path = description["file"]
    if not fileio.exists(path):
        raise UserError(f"The model in {model_dir} was trained with the SentencePiece model {path} "
                        f"({RECORD}), which does not exist here. Copy it there, or give the data as a task "
                        "with that vocabulary.")
    vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=description["extra_ids"])
    if _compared(describe(vocabulary)) != _compared(description):
        raise UserError(f"{path} has changed since the model in {model_dir} was trained with it: it was "
                        f"{_summary(description)}, it is {_summary(describe(vocabulary))}.")
    return vocabulary


def check(model_dir: str, data: str, features: Mapping[str, seqio.Feature]) -> None:
    """UserError if `data` (e.g. "task 'squad'") has a feature tokenized with another vocabulary than
    the model of `model_dir` was trained with. A feature the training data did not have (a prefix-LM
    task's "inputs" on a model trained on "targets" alone) is compared with the trained "targets"."""
    check_against(read(model_dir), f"the model in {model_dir} was trained with", data, features)


def check_against(trained: Mapping[str, Mapping[str, Any]] | None, whose: str, data: str,
                  features: Mapping[str, seqio.Feature]) -> None:
    """check() against descriptions (None: nothing to compare); `whose` says whose they are, e.g.
    "the training data 'c4' uses"."""
    if not trained:
        return
    for name, feature in features.items():
        expected = trained.get(name, trained.get("targets"))
        if expected is None:
            continue
        found = describe(feature.vocabulary)
        if _compared(found) != _compared(expected):
            raise UserError(
                f"{data} tokenizes {name!r} with {_summary(found)}, but {whose} {_summary(expected)}. A "
                "model's parameters only mean something for the vocabulary it was trained with (MODEL_DIR/"
                f"{RECORD}): use data tokenized with it (the task definitions and gin files of its training).")


def _compared(description: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in description.items() if k not in NOT_COMPARED}


def _summary(description: Mapping[str, Any]) -> str:
    text = f"{description['type']} of {description['vocab_size']} ids ({description['extra_ids']} sentinels"
    if "sha256" in description:
        text += f", model sha256 {description['sha256'][:12]}, {description.get('file')}"
    return text + ")"
