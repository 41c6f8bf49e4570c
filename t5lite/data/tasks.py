"""seqio Tasks and Mixtures over the embedded corpus; registered on import.

Tasks, each "{corpus}_{objective}":
    corpora     tiny_shakespeare (train, validation), wikitext2 (train, validation, test)
    objectives  span_corruption  features inputs, targets (EOS appended)
                lm               feature targets (causal LM)
                prefix_lm        features inputs, targets
Mixtures, "t5lite_default_{objective}": both corpora, each sampled in proportion to its
train split's size in characters (WikiText-2 ~10x tiny Shakespeare).

Preprocessing: {"text"} -> rekey to "targets" -> tokenize -> objective (preprocessors.py).
Metrics (python -m t5lite.eval, train.infer_eval_every): span_corruption decodes the masked
spans (accuracy = exact match of all spans); lm and prefix_lm score targets (bits per byte).
Documents are tiny Shakespeare speeches and WikiText-2 articles (embedded_corpus.py).
"""

import functools
from collections.abc import Callable

import seqio
import tensorflow as tf

from t5lite.data import embedded_corpus, metrics, preprocessors, vocab

DocumentsFn = Callable[[str], tuple[str, ...]]

CORPORA: dict[str, tuple[DocumentsFn, tuple[str, ...]]] = {
    "tiny_shakespeare": (
        embedded_corpus.tiny_shakespeare_documents,
        embedded_corpus.TINY_SHAKESPEARE_SPLITS,
    ),
    "wikitext2": (embedded_corpus.wikitext2_documents, embedded_corpus.WIKITEXT2_SPLITS),
}
OBJECTIVES = ("span_corruption", "lm", "prefix_lm")


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


def _train_characters(documents_fn: DocumentsFn, unused_task: seqio.Task) -> float:
    """Mixing rate: characters in the corpus's train split (read when the mixture is read)."""
    return float(sum(len(document) for document in documents_fn("train")))


def _output_features(objective: str) -> dict[str, seqio.Feature]:
    vocabulary = vocab.get_default_vocabulary()
    if objective == "lm":
        # Documents inside a chunk are already separated by EOS; a chunk end is not a document end.
        return {"targets": seqio.Feature(vocabulary, add_eos=False)}
    add_eos = objective == "span_corruption"
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=add_eos),
        "targets": seqio.Feature(vocabulary, add_eos=add_eos),
    }


def _objective_preprocessors(objective: str) -> list[Callable[..., tf.data.Dataset]]:
    if objective == "span_corruption":
        return [preprocessors.span_corruption, seqio.preprocessors.append_eos_after_trim]
    if objective == "lm":
        return [preprocessors.causal_lm]
    return [preprocessors.prefix_lm]


METRIC_FNS: dict[str, list[Callable[..., dict[str, float]]]] = {
    "span_corruption": [metrics.accuracy],
    "lm": [metrics.bits_per_byte],
    "prefix_lm": [metrics.bits_per_byte],
}


def _register_task(corpus: str, objective: str) -> None:
    name = f"{corpus}_{objective}"
    if name in seqio.TaskRegistry.names():  # importing twice (e.g. reload) must not fail
        return
    documents_fn, splits = CORPORA[corpus]
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_text_dataset, documents_fn=documents_fn), splits=splits),
        output_features=_output_features(objective),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            *_objective_preprocessors(objective),
        ],
        metric_fns=METRIC_FNS[objective],
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


def _register_all() -> None:
    for objective in OBJECTIVES:
        for corpus in CORPORA:
            _register_task(corpus, objective)
        _register_mixture(objective)


_register_all()
