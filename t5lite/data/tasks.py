"""seqio Tasks and Mixtures over the embedded corpus; registered on import.

Tasks, each "{corpus}_{objective}":
    corpora     tiny_shakespeare (train, validation), wikitext2 (train, validation, test)
    objectives  span_corruption  features inputs, targets (EOS appended)
                lm               feature targets (causal LM)
                prefix_lm        features inputs, targets
Mixtures, "t5lite_default_{objective}": both corpora, each sampled in proportion to its
train split's size in characters (WikiText-2 ~10x tiny Shakespeare).

Preprocessing: {"text"} -> rekey to "targets" -> tokenize -> objective (preprocessors.py).
Metrics (python -m t5lite.eval, EvalConfig.infer_every): lm and prefix_lm score targets (bits
per byte); span corruption and UL2 decode the targets (accuracy = exact match of all of them).
Documents are tiny Shakespeare speeches and WikiText-2 articles (embedded_corpus.py).
"""

import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from t5lite.data import embedded_corpus, metrics, preprocessors, vocab
from t5lite.data import multiple_choice as multiple_choice_lib
from t5lite.data import sources as sources_lib
from t5lite.errors import UserError

# tf.data only feeds JAX: keep TensorFlow off any GPU so it claims none of JAX's memory.
tf.config.set_visible_devices([], "GPU")

DocumentsFn = Callable[[str], tuple[str, ...]]

CORPORA: dict[str, tuple[DocumentsFn, tuple[str, ...]]] = {
    "tiny_shakespeare": (
        embedded_corpus.tiny_shakespeare_documents,
        embedded_corpus.TINY_SHAKESPEARE_SPLITS,
    ),
    "wikitext2": (embedded_corpus.wikitext2_documents, embedded_corpus.WIKITEXT2_SPLITS),
}
OBJECTIVES = ("span_corruption", "lm", "prefix_lm", *(f"ul2_{d}" for d in preprocessors.UL2_DENOISERS))


def _text_dataset(
    split: str, shuffle_files: bool, seed: int | None = None, *, documents_fn: DocumentsFn
) -> tf.data.Dataset:
    """{"text": string scalar} per document; shuffled per epoch when shuffle_files.

    seqio shards this dataset by example (ds.shard) when given a ShardInfo, so every host
    must shuffle with the same seed for the shards to stay disjoint.
    """
    documents = documents_fn(split)
    dataset = tf.data.Dataset.from_tensor_slices({"text": tf.constant(documents, tf.string)})
    if shuffle_files:
        buffer_size = max(len(documents), 1)  # an empty split must reach get_batches' clear error
        dataset = dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    return dataset


class EmbeddedCorpusSource(seqio.FunctionDataSource):
    """The FunctionDataSource of the embedded corpus's documents (_text_dataset), held in memory."""

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **unused) -> tf.data.Dataset:
        if shard_info and shard_info.num_shards > 1:  # as FunctionDataSource: seqio shards it with ds.shard
            raise ValueError("EmbeddedCorpusSource does not support low-level sharding.")
        # FunctionDataSource.get_dataset, less its "uncached FunctionDataset" warning (poor shuffling on
        # restarts), which does not apply: the split is shuffled whole, in one buffer, every epoch, and a
        # restart restores the tf.data iterator's state (pipeline.BatchIterator), buffer included.
        return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


def _train_characters(documents_fn: DocumentsFn, unused_task: seqio.Task) -> float:
    """Mixing rate: characters in the corpus's train split (read when the mixture is read)."""
    return float(sum(len(document) for document in documents_fn("train")))


def _output_features(objective: str, vocabulary: seqio.Vocabulary | None = None) -> dict[str, seqio.Feature]:
    vocabulary = vocabulary or vocab.get_default_vocabulary()
    if objective == "lm":
        # Documents inside a chunk are already separated by EOS; a chunk end is not a document end.
        return {"targets": seqio.Feature(vocabulary, add_eos=False)}
    add_eos = objective == "span_corruption" or objective.startswith("ul2_")
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=add_eos),
        "targets": seqio.Feature(vocabulary, add_eos=add_eos),
    }


def _objective_preprocessors(objective: str) -> list[Callable[..., tf.data.Dataset]]:
    if objective == "span_corruption":
        return [preprocessors.span_corruption, seqio.preprocessors.append_eos_after_trim]
    if objective == "lm":
        return [preprocessors.causal_lm]
    if objective.startswith("ul2_"):
        denoiser = objective[len("ul2_"):]
        return [functools.partial(preprocessors.ul2_denoiser, denoiser=denoiser),
                seqio.preprocessors.append_eos_after_trim]
    return [preprocessors.prefix_lm]


def _objective_metric_fns(objective: str) -> list[Callable[..., dict[str, float]]]:
    return [metrics.bits_per_byte] if objective in ("lm", "prefix_lm") else [metrics.accuracy]


def add_pretraining_task(
    name: str,
    source: seqio.DataSource,
    *,
    objective: str,
    text_field: str = "text",
    vocabulary: seqio.Vocabulary | None = None,
    extra_preprocessors: Sequence[Callable[..., tf.data.Dataset]] = (),
) -> seqio.Task:
    """Registers a pretraining Task: raw text -> tokens -> objective (span_corruption, lm, prefix_lm).

    vocabulary: default the shipped SentencePiece one; e.g. seqio.ByteVocabulary(extra_ids=100)
      for byte-level models (set TransformerConfig.vocab_size >= its vocab_size).
    extra_preprocessors run on the raw text before tokenization (e.g. a cleaning preprocessor).
    Registering a name twice returns the existing Task, so a module can be imported again.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"objective={objective!r}; choose one of {OBJECTIVES}.")
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features=_output_features(objective, vocabulary),
        preprocessors=[
            *extra_preprocessors,
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_field}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            *_objective_preprocessors(objective),
        ],
        metric_fns=_objective_metric_fns(objective),
    )


def add_supervised_task(
    name: str,
    source: seqio.DataSource,
    *,
    inputs_field: str,
    targets_field: str,
    metric_fns: Sequence[Callable] = (),
    extra_preprocessors: Sequence[Callable[..., tf.data.Dataset]] = (),
    keep_fields: Sequence[str] = (),
    postprocess_fn: Callable | None = None,
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Registers an (inputs -> targets) Task, e.g. prompt -> response or sentence -> label.

    Both features get EOS; seqio truncates to the task feature lengths. The pretokenized text
    is kept (inputs_pretokenized, targets_pretokenized) for metrics that compare strings.
    keep_fields: further source fields kept under their names (the rest are dropped), for a
      postprocess_fn that builds metric targets from them (e.g. every reference answer).
    vocabulary: default the shipped SentencePiece one; e.g. the spiece.model of a Hugging Face T5
      imported with t5lite.hf_t5 --from_hf, to fine-tune it.
    """
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    vocabulary = vocabulary or vocab.get_default_vocabulary()
    return seqio.TaskRegistry.add(
        name,
        source=source,
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                         "targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[
            *extra_preprocessors,
            functools.partial(seqio.preprocessors.rekey, key_map={"inputs": inputs_field, "targets": targets_field,
                                                                  **{f: f for f in keep_fields}}),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
    )


def add_instruction_task(
    name: str,
    files: str | Sequence[str] | dict[str, str | Sequence[str]],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    hash_splits: dict[str, float] | None = None,
    metric_fns: Sequence[Callable] = (),
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Instruction / dialogue data: JSONL of {prompt, response}; the loss is on the response only.

    Encoder-decoder models read the prompt in the encoder; decoder-only models train as a prefix
    LM (model_type "prefix_lm", DataConfig.prefix_lm=True): the prompt is the bidirectional prefix and
    seqio's PrefixLMFeatureConverter gives it zero loss weight.
    """
    source = sources_lib.file_source(files, file_format="jsonl", fields=(prompt_field, response_field),
                                     hash_splits=hash_splits)
    return add_supervised_task(name, source, inputs_field=prompt_field, targets_field=response_field,
                               metric_fns=metric_fns, vocabulary=vocabulary)


def add_multiple_choice_task(
    name: str,
    files: str | Mapping[str, str],
    *,
    prompt: str = "{question}",
    choices_field: str | Sequence[str] = "choices",
    label_field: str = "label",
    label_files: str | Mapping[str, str] | None = None,
    target_delimiter: str = multiple_choice_lib.TARGET_DELIMITER,
    metric_fns: Sequence[Callable] = (metrics.rank_classification,),
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """A multiple-choice task scored by likelihood as lm-evaluation-harness scores one: the prompt,
    then each choice as the continuation target_delimiter + choice (no EOS); accuracy, length-normalised
    accuracy (per character), chance and standard errors (metrics.rank_classification).

    files: a JSONL file (the split "validation") or {split: file}. prompt: a str.format template over a
      row's fields, e.g. "Question: {question}\nAnswer:". choices_field: a field holding the list of
      choices, or the names of one field per choice. label_field: the integer index of the right choice;
      or label_files (the same shape as files): one integer label a line, line-aligned with the rows.
    A label that is not an integer index into the row's choices is an error naming file and line.
    Registers `name` for encoder-decoder models and `name`_prefix_lm for decoder-only ones.
    """
    files = {"validation": files} if isinstance(files, str) else dict(files)
    if label_files is not None:
        label_files = {"validation": label_files} if isinstance(label_files, str) else dict(label_files)
        if set(label_files) != set(files):
            raise UserError(f"{name}: label_files has splits {sorted(label_files)} but files has {sorted(files)}.")

    def questions(split: str) -> list[multiple_choice_lib.Question]:
        path = files[split]
        rows = _jsonl_rows(path)
        labels = _label_lines(label_files[split], len(rows)) if label_files else None
        out = []
        for n, row in enumerate(rows, 1):
            where = f"{path}:{n}"
            choices = ([row.get(f) for f in choices_field] if not isinstance(choices_field, str)
                       else row.get(choices_field))
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise UserError(f"{where}: the choices ({choices_field!r}) must be at least two strings.")
            try:
                text = prompt.format(**row)
            except (KeyError, IndexError) as e:
                raise UserError(f"{where}: prompt {prompt!r} names a field the row lacks: {e}.") from e
            if labels is not None:
                label, where = labels[n - 1], f"{label_files[split]}:{n}"
            else:
                label = row.get(label_field)
            out.append(multiple_choice_lib.Question.single(
                text, choices, multiple_choice_lib.check_label(label, len(choices), where=where)))
        return out

    source = multiple_choice_lib.questions_source(questions, tuple(files), target_delimiter=target_delimiter)
    return multiple_choice_lib.add_task_pair(name, source, metric_fns=metric_fns, vocabulary=vocabulary)[0]


def _jsonl_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist.")
    return sources_lib.read_jsonl(path)


def _label_lines(path: str, num_rows: int) -> list[int | str]:
    """Labels of a label file, one a line: an int where the line is one, else the text (rejected later)."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist.")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if len(lines) != num_rows:
        raise UserError(f"{path}: {len(lines)} labels for {num_rows} rows; the files must be line-aligned.")
    return [int(x) if re.fullmatch(r"-?\d+", x) else x for x in lines]


def _register_task(corpus: str, objective: str) -> None:
    documents_fn, splits = CORPORA[corpus]
    add_pretraining_task(
        f"{corpus}_{objective}",
        EmbeddedCorpusSource(functools.partial(_text_dataset, documents_fn=documents_fn), splits=splits),
        objective=objective,
    )


def _register_mixture(objective: str) -> None:
    name = f"t5lite_default_{objective}"
    if name in seqio.MixtureRegistry.names():
        return
    seqio.MixtureRegistry.add(
        name,
        [
            (f"{corpus}_{objective}", functools.partial(_train_characters, documents_fn))
            for corpus, (documents_fn, _) in CORPORA.items()
        ],
    )


def _register_ul2_mixtures() -> None:
    """{corpus}_ul2: its denoisers at equal rates; t5lite_default_ul2: both corpora by size."""
    for corpus in CORPORA:
        if f"{corpus}_ul2" not in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.add(f"{corpus}_ul2", [f"{corpus}_ul2_{d}" for d in preprocessors.UL2_DENOISERS],
                                      default_rate=1.0)
    if "t5lite_default_ul2" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("t5lite_default_ul2", [
            (f"{corpus}_ul2", _train_characters(documents_fn, None)) for corpus, (documents_fn, _) in CORPORA.items()])


def _register_byte_level_and_tfds_tasks() -> None:
    """tiny Shakespeare at the byte level (as nanoGPT's character-level baselines), and C4.

    c4_span_corruption reads TFDS "c4/en:3.1.0"; it works where that dataset is prepared
    (TFDS_DATA_DIR), like T5's C4 task, and fails with TFDS's message elsewhere.
    """
    documents_fn, splits = CORPORA["tiny_shakespeare"]
    source = EmbeddedCorpusSource(functools.partial(_text_dataset, documents_fn=documents_fn), splits=splits)
    for objective in ("lm", "span_corruption"):
        add_pretraining_task(f"tiny_shakespeare_bytes_{objective}", source, objective=objective,
                             vocabulary=seqio.ByteVocabulary(extra_ids=vocab.DEFAULT_EXTRA_IDS))
    add_pretraining_task("c4_span_corruption", sources_lib.tfds_source("c4/en:3.1.0"), objective="span_corruption")


def _register_all() -> None:
    for objective in OBJECTIVES:
        for corpus in CORPORA:
            _register_task(corpus, objective)
        if not objective.startswith("ul2_"):
            _register_mixture(objective)
    _register_ul2_mixtures()
    _register_byte_level_and_tfds_tasks()


_register_all()
