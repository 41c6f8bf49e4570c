"""seqio Tasks and Mixtures over the embedded corpus; registered on import.

Tasks, each "{corpus}_{objective}":
    corpora     tiny_shakespeare (train, validation), wikitext2 (train, validation, test)
    objectives  span_corruption  features inputs, targets (EOS appended)
                lm               feature targets (causal LM)
                prefix_lm        features inputs, targets
Mixtures, "t5lite_default_{objective}": both corpora, each sampled in proportion to its
train split's size in characters (WikiText-2 ~10x tiny Shakespeare).

Preprocessing: {"text"} -> rekey to "targets" -> tokenize -> objective (preprocessors.py).
Chat: squad_chat (encoder-decoder) and squad_chat_lm (causal decoder-only), conversations made of
SQuAD rows (corpus/squad_chat/); add_chat_task registers your own chat JSONL the same way.
Preference pairs: tiny_shakespeare_preference (corpus/preference/; gin/runs/dpo.gin);
add_preference_task registers your own {prompt, chosen, rejected} JSONL.
Metrics (python -m t5lite.eval, EvalConfig.infer_every): lm and prefix_lm score targets (bits
per byte); span corruption and UL2 decode the targets (accuracy = exact match of all of them).
Documents are tiny Shakespeare speeches and WikiText-2 articles (embedded_corpus.py).
"""

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from t5lite.data import chat as chat_lib
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
    Every split also reads as k-fold cross-validation splits, e.g. 'train[fold=2/5,heldout]' (splits.py).
    vocabulary: default the shipped SentencePiece one; e.g. the spiece.model of a Hugging Face T5
      imported with t5lite.hf_t5 --from_hf, to fine-tune it.
    """
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    vocabulary = vocabulary or vocab.get_default_vocabulary()
    return seqio.TaskRegistry.add(
        name,
        source=sources_lib.FoldedSource(source, label_field=targets_field),
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


CAUSAL_CHAT_SUFFIX = "_lm"  # add_chat_task's task for causal decoder-only models


def add_chat_task(
    name: str,
    files: str | Mapping[str, str],
    *,
    template: chat_lib.ChatTemplate | None = None,
    hash_splits: Mapping[str, float] | None = None,
    every_turn: bool = False,
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Chat SFT data: JSONL conversations {"messages": [{"role", "content"}, ...]} (data/chat.py).
    Registers two Tasks over the same rows, and returns the first:
      name     inputs: the history before the last assistant turn, ending with the template's
               assistant marker; targets: that turn (every_turn: one example per assistant turn).
               Encoder-decoder models, or decoder-only ones with DataConfig.prefix_lm=True.
      name_lm  targets: the whole conversation, with loss weights 1 on every assistant turn and 0 on
               the rest (pipeline.LMFeatureConverter packs them). Causal decoder-only models.
    files: a JSONL file (split "train", or the splits of hash_splits, {split: fraction}, drawn from a
      hash of each conversation) or {split: file}. A bad row fails with file:line and the problem.
    template: default ChatTemplate() as gin binds it, read when the data is read (after gin parsing).
    Inputs longer than their feature length lose their oldest tokens, so the turn to answer stays.
    """
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    vocabulary = vocabulary or vocab.get_default_vocabulary()
    encode, eos = vocabulary.encode, vocabulary.eos_id

    def answers(messages: chat_lib.Messages) -> list[dict[str, list[int]]]:
        pairs = chat_lib.answer_examples(template or chat_lib.ChatTemplate(), messages, encode, eos,
                                         every_turn=every_turn)
        return [{"inputs": inputs, "targets": targets} for inputs, targets in pairs]

    def conversations(messages: chat_lib.Messages) -> list[dict[str, list[int]]]:
        ids, weights = chat_lib.training_tokens(template or chat_lib.ChatTemplate(), messages, encode, eos)
        return [{"targets": ids, "targets_loss_weights": weights}]

    # Inputs and conversations end with the EOS of the chat format already; answers get theirs after trimming.
    seqio.TaskRegistry.add(name + CAUSAL_CHAT_SUFFIX, source=_chat_source(files, hash_splits, conversations),
                           output_features={"targets": seqio.Feature(vocabulary, add_eos=False)}, preprocessors=[])
    return seqio.TaskRegistry.add(
        name, source=_chat_source(files, hash_splits, answers),
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=False),
                         "targets": seqio.Feature(vocabulary, add_eos=True)},
        preprocessors=[_keep_last_inputs, seqio.preprocessors.append_eos_after_trim])


def _keep_last_inputs(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
    """Cuts inputs longer than their feature length at the front: a chat history keeps its latest turns."""
    if not sequence_length or not sequence_length.get("inputs"):
        return dataset
    return dataset.map(lambda ex: {**ex, "inputs": ex["inputs"][-sequence_length["inputs"]:]})


def _chat_source(files: str | Mapping[str, str], hash_splits: Mapping[str, float] | None,
                 to_examples: Callable[[chat_lib.Messages], list[dict[str, list[int]]]]) -> seqio.FunctionDataSource:
    """A source of int32 token features, to_examples of each conversation of the split's rows."""
    if not isinstance(files, str) and hash_splits is not None:
        raise UserError("Give chat files as {split: file}, or one file and hash_splits; not both.")
    if hash_splits is not None and abs(sum(hash_splits.values()) - 1.0) > 1e-6:
        raise UserError(f"hash_splits fractions must sum to 1, got {dict(hash_splits)}.")
    splits = tuple(files) if not isinstance(files, str) else tuple(hash_splits or ("train",))

    def rows_of(split: str) -> list[dict]:
        if not isinstance(files, str):
            return _jsonl_rows(files[split], chat_lib.check_messages)
        rows = _jsonl_rows(files, chat_lib.check_messages)
        key = lambda row: json.dumps(row["messages"], sort_keys=True)  # noqa: E731
        return [r for r in rows if not hash_splits or sources_lib.hash_split(key(r), hash_splits) == split]

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        examples = [e for row in rows_of(split) for e in to_examples(row["messages"])]
        keys = examples[0].keys() if examples else ("targets",)
        dataset = tf.data.Dataset.from_tensor_slices({k: tf.RaggedTensor.from_row_lengths(
            tf.constant([t for e in examples for t in e[k]], tf.int32, shape=[sum(len(e[k]) for e in examples)]),
            tf.constant([len(e[k]) for e in examples], tf.int64, shape=[len(examples)])) for k in keys})
        if shuffle_files and examples:
            dataset = dataset.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)
        return dataset

    return seqio.FunctionDataSource(dataset_fn, splits=splits)


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


def add_preference_task(
    name: str,
    files: str | Mapping[str, str],
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
    """Preference pairs: JSONL rows {prompt, chosen, rejected}, two answers to the prompt, the better
    one `chosen`. files: one file (the split "train") or {split: file}. Features inputs (the prompt),
    chosen and rejected, each with EOS and cut to the run's "inputs" / "targets" lengths; trained with
    PreferenceConfig.objective (DPO, IPO, SimPO), batched by data/pairs.py. A row without the three
    fields as strings fails with its file and line when the split is read.
    """
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    files = {"train": files} if isinstance(files, str) else dict(files)
    fields = {"inputs": prompt_field, "chosen": chosen_field, "rejected": rejected_field}

    def check(row: dict) -> str | None:
        bad = [f for f in fields.values() if not isinstance(row.get(f), str)]
        return f"a preference pair needs the string fields {list(fields.values())}; {bad} missing or not strings" \
            if bad else None

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        rows = _jsonl_rows(files[split], check)
        dataset = tf.data.Dataset.from_tensor_slices(
            {k: tf.constant([r[f] for r in rows], tf.string, shape=[len(rows)]) for k, f in fields.items()})
        if shuffle_files and rows:
            dataset = dataset.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        return dataset

    vocabulary = vocabulary or vocab.get_default_vocabulary()
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=tuple(files)),
        output_features={k: seqio.Feature(vocabulary, add_eos=True) for k in fields},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        metric_fns=[],
    )


def _jsonl_rows(path: str, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist.")
    return sources_lib.read_jsonl(path, check)


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


SQUAD_CHAT_DIR = os.path.join(os.path.dirname(__file__), "corpus", "squad_chat")


PREFERENCE_DIR = os.path.join(os.path.dirname(__file__), "corpus", "preference")


def _register_all() -> None:
    # squad_chat, squad_chat_lm: the shipped chat SFT set (corpus/squad_chat/README.md)
    add_chat_task("squad_chat", {split: os.path.join(SQUAD_CHAT_DIR, f"{split}.jsonl")
                                 for split in ("train", "validation")})
    for objective in OBJECTIVES:
        for corpus in CORPORA:
            _register_task(corpus, objective)
        if not objective.startswith("ul2_"):
            _register_mixture(objective)
    _register_ul2_mixtures()
    _register_byte_level_and_tfds_tasks()
    # tiny_shakespeare_preference: the shipped pairs (gin/runs/dpo.gin; tests/data/make_preference_pairs.py)
    add_preference_task("tiny_shakespeare_preference", {
        split: os.path.join(PREFERENCE_DIR, f"tiny_shakespeare_{split}.jsonl") for split in ("train", "validation")})


_register_all()
