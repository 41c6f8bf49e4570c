"""From a seqio Task or Mixture to numpy batches: what the trainer calls.

Usage:
    batches = get_batches("t5lite_default_span_corruption", split="train",
                          task_feature_lengths={"inputs": 512, "targets": 114},
                          model_type="encoder_decoder", batch_size=8, shuffle=True, seed=0)
    batch = next(batches)  # {"encoder_input_tokens": int32 [8, 512], ...}
    batches.save("/ckpt/data/process_0")     # the stream's position (see BatchIterator)
"""

import difflib
import functools
import hashlib
import itertools
import os
from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from t5lite.data import downstream, pairs, tasks, zero_shot  # noqa: F401  (register their seqio tasks)
from t5lite.errors import UserError


class LMFeatureConverter(seqio.LMFeatureConverter):
    """seqio's causal LM converter, and per-token loss weights where a task gives them: an int32 feature
    LOSS_WEIGHTS aligned with "targets" (chat SFT: 1 on assistant tokens, tasks.add_chat_task) is
    trimmed, padded and packed with the targets and multiplies decoder_loss_weights. Packed examples
    keep their own segment ids and positions, so neither attention nor loss crosses them."""

    LOSS_WEIGHTS = "targets_loss_weights"

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        if self.LOSS_WEIGHTS not in ds.element_spec:
            return super()._convert_features(ds, task_feature_lengths)
        # seqio's packer drops zeros as padding, which would shift the weights: it packs weights + 1.
        ds = ds.map(lambda ex: {**ex, self.LOSS_WEIGHTS: ex[self.LOSS_WEIGHTS] + 1})
        lengths = {**task_feature_lengths, self.LOSS_WEIGHTS: task_feature_lengths["targets"]}
        return self._pack_or_pad(ds, lengths).map(self._convert_weighted_example,
                                                  num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_weighted_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        converted = dict(self._convert_example(features))
        converted["decoder_loss_weights"] *= tf.maximum(features[self.LOSS_WEIGHTS] - 1, 0)  # padding: 0
        return converted


# model_type -> seqio feature converter. Output features, all int32 [batch, length]:
#   encoder_decoder: encoder_input_tokens, encoder_segment_ids, encoder_positions (inputs
#                    length); decoder_{target_tokens,input_tokens,loss_weights,segment_ids,
#                    positions} (targets length)
#   decoder_only:    decoder_* as above (targets length)
#   prefix_lm:       decoder_* and decoder_causal_attention (inputs + targets length)
# (*_segment_ids and *_positions only when packing.)
FEATURE_CONVERTERS: dict[str, type[seqio.FeatureConverter]] = {
    "encoder_decoder": seqio.EncDecFeatureConverter,
    "decoder_only": LMFeatureConverter,  # seqio's, with the per-token loss weights of a task that has them
    "prefix_lm": seqio.PrefixLMFeatureConverter,
}
# Preference pairs (PreferenceConfig.objective): one row per pair, never packed; see data/pairs.py.
PREFERENCE = "preference_"
FEATURE_CONVERTERS.update({PREFERENCE + m: functools.partial(pairs.PairFeatureConverter, m)
                           for m in pairs.ANSWER_CONVERTERS})


def model_type(is_encoder_decoder: bool, prefix_lm: bool, preference: bool = False) -> str:
    """The FEATURE_CONVERTERS key of a model: encoder-decoder, else a prefix LM or a causal LM; with
    preference, the same for batches of preference pairs."""
    if is_encoder_decoder:
        base = "encoder_decoder"
    else:
        base = "prefix_lm" if prefix_lm else "decoder_only"
    return PREFERENCE + base if preference else base


def _task_feature_lengths(model_type: str, lengths: Mapping[str, int]) -> dict[str, int]:
    """A run's lengths as the converter takes them: pairs give "targets" to each answer."""
    if not model_type.startswith(PREFERENCE):
        return dict(lengths)
    if sorted(lengths) != ["inputs", "targets"]:
        raise UserError(f"Preference pairs take task_feature_lengths {{'inputs': prompt length, 'targets': answer "
                        f"length}}, got {dict(lengths)}.")
    return pairs.task_feature_lengths(lengths)


def get_batches(
    mixture_or_task_name: str,
    *,
    split: str,
    task_feature_lengths: Mapping[str, int],
    model_type: str,
    batch_size: int,
    shuffle: bool,
    seed: int | None,
    num_epochs: int | None = None,
    pack: bool = True,
    shard_info: seqio.ShardInfo | None = None,
    cache_dir: str | None = None,
) -> "BatchIterator":
    """Batches of model features for this host.

    Args:
      mixture_or_task_name: a registered seqio Task or Mixture.
      split: e.g. "train", "validation".
      task_feature_lengths: task feature -> length, e.g. {"inputs": 512, "targets": 114};
        keys "inputs"+"targets" (encoder_decoder, prefix_lm) or "targets" (decoder_only).
      model_type: "encoder_decoder", "decoder_only" or "prefix_lm" (see FEATURE_CONVERTERS).
      batch_size: examples per batch on this host; a last partial batch is dropped.
      shuffle: shuffle documents and examples (training).
      seed: makes shuffling, mixing and the objectives' randomness reproducible; None draws
        fresh randomness on every call.
      num_epochs: passes over the data; None repeats forever.
      pack: pack several examples per row (segment ids and positions mark them).
      shard_info: this host's shard; hosts get disjoint examples.
      cache_dir: read the tasks' seqio caches there (python -m t5lite.data.pipelines cache), not the
        sources: the steps before each task's seqio.CacheDatasetPlaceholder are not run again.

    Returns:
      A BatchIterator of {feature: int32 [batch_size, length]}. The first batch is built
      eagerly, so a bad name, split or length fails here, not at the first next().
    """
    provider = _get_provider(mixture_or_task_name)
    _check_split(provider, split)
    feature_converter = _feature_converter(model_type, pack)
    task_feature_lengths = _task_feature_lengths(model_type, task_feature_lengths)
    _check_feature_lengths(provider, model_type, feature_converter, task_feature_lengths)
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}.")
    if shard_info and shard_info.num_shards > 1 and shuffle and seed is None:
        raise UserError(
            "Sharded shuffling needs a seed: every host must shuffle the same way for the "
            "shards to be disjoint. Pass seed=<int>."
        )
    if cache_dir:
        _check_cached(provider, split, cache_dir)
    dataset = seqio.get_dataset(
        provider,
        task_feature_lengths=dict(task_feature_lengths),
        feature_converter=feature_converter,
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_info=shard_info,
        seed=seed,
        batch_size=batch_size,  # seqio batches with drop_remainder=True
        use_cached=bool(cache_dir),
        verbose=False,
    )
    batches = BatchIterator(dataset.prefetch(tf.data.AUTOTUNE))
    if batches.is_empty:
        raise SplitSmallerThanABatch(
            f"{mixture_or_task_name!r} split {split!r} produced no batch of {batch_size} "
            f"examples (lengths {dict(task_feature_lengths)}, shard {shard_info}): the split "
            "is empty or smaller than one batch. Lower batch_size or check the data."
        )
    return batches


class SplitSmallerThanABatch(UserError):
    """get_batches read no whole batch: the split is empty or has fewer (packed) rows than batch_size."""


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Numpy batches of a tf.data pipeline whose position can be saved to files and restored.

    save/restore use tf.data iterator checkpointing: the state of every shuffle buffer, seed
    generator, mixture sampler and packing buffer goes to `prefix.index` and `prefix.data-*`, so a
    restored iterator yields exactly the batches the saved one would have yielded next.
    """

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = iter(dataset)
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
        self._first_batch = self._next_or_none()  # read eagerly, so pipeline errors surface at once

    @property
    def is_empty(self) -> bool:
        """True if the pipeline produced no batch at all (only meaningful before the first next())."""
        return self._first_batch is None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._first_batch is not None:
            batch, self._first_batch = self._first_batch, None
            return batch
        batch = self._next_or_none()
        if batch is None:
            raise StopIteration
        return batch

    def save(self, prefix: str) -> None:
        """Writes the position after the last batch returned by next()."""
        if self._first_batch is not None:
            # The tf.data iterator is already past the eagerly read first batch.
            raise RuntimeError("BatchIterator.save() needs at least one next() first.")
        self._checkpoint.write(prefix)

    def restore(self, prefix: str) -> None:
        """Continues from a position written by save() (of the same pipeline and arguments)."""
        self._checkpoint.read(prefix).assert_consumed()
        self._first_batch = None

    def _next_or_none(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {k: v.numpy() for k, v in batch.items()}


def batch_feature_shapes(
    task_feature_lengths: Mapping[str, int], *, model_type: str, batch_size: int, pack: bool = True,
) -> dict[str, tuple[int, int]]:
    """{feature: (batch_size, length)} of the int32 batches get_batches yields, without reading data."""
    lengths = _feature_converter(model_type, pack).get_model_feature_lengths(
        _task_feature_lengths(model_type, task_feature_lengths))
    return {name: (batch_size, length) for name, length in lengths.items()}


def row_fingerprints(batch: Mapping[str, np.ndarray]) -> list[str]:
    """A short hash of each row [batch] of a batch (all its features): compares what hosts read."""
    size = len(next(iter(batch.values())))
    return [hashlib.sha1(b"".join(batch[k][i].tobytes() for k in sorted(batch))).hexdigest()[:16]
            for i in range(size)]


def list_tasks_of(mixture_or_task_name: str) -> list[str]:
    """Names of the Tasks in a Mixture (sorted), or [name] for a Task."""
    provider = _get_provider(mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
        return [task.name for task in provider.tasks]
    return [provider.name]


# Source fields joined into an example's raw text, in this order, when present.
RAW_TEXT_FIELDS = ("text", "inputs", "targets", "question", "answer", "sentence", "context", "continuation")


def raw_texts(task_name: str, split: str, limit: int | None = None) -> list[str]:
    """The source text of a Task's split, before any preprocessing (dedup, vocab, inspect).

    Joins the string fields in RAW_TEXT_FIELDS (and any other string field) of each example.
    """
    task = _get_provider(task_name)
    if isinstance(task, seqio.Mixture):
        raise UserError(f"{task_name!r} is a Mixture; pass one of its Tasks: {list_tasks_of(task_name)}.")
    _check_split(task, split)
    texts = []
    for example in itertools.islice(task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator(), limit):
        keys = [k for k in RAW_TEXT_FIELDS if k in example] + sorted(set(example) - set(RAW_TEXT_FIELDS))
        texts.append(" ".join(example[k].decode("utf-8") for k in keys if isinstance(example[k], bytes)))
    return texts


def _get_provider(name: str) -> seqio.Task | seqio.Mixture:
    """The registered Mixture or Task called name; a mixture wins a name clash, as in seqio."""
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    known = sorted({*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()})
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"Did you mean: {', '.join(close)}?" if close else f"Registered: {', '.join(known)}."
    raise UserError(
        f"Unknown seqio Task or Mixture {name!r}. {hint} "
        "(A task defined in your own module must be imported first, e.g. from the gin file.)"
    )


def _check_split(provider: seqio.Task | seqio.Mixture, split: str) -> None:
    """A Task must have the split; so must every Task of a Mixture (seqio would skip it)."""
    tasks_of = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    lacking = [task.name for task in tasks_of if split not in task.splits]
    if lacking:
        available = sorted(set.intersection(*(set(task.splits) for task in tasks_of)))
        raise UserError(
            f"{provider.name!r}: split {split!r} is missing from {', '.join(lacking)}. "
            f"Available splits: {', '.join(available)}."
        )


def _check_cached(provider: seqio.Task | seqio.Mixture, split: str, cache_dir: str) -> None:
    """Every Task of provider has its split cached in cache_dir (seqio would fall back, or fail, later)."""
    seqio.add_global_cache_dirs([cache_dir])
    for task in provider.tasks if isinstance(provider, seqio.Mixture) else [provider]:
        task_dir = os.path.join(cache_dir, seqio.get_task_dir_from_name(task.name))
        if not task.supports_caching:
            raise UserError(f"{task.name!r} cannot be read from a cache: it has no seqio.CacheDatasetPlaceholder "
                            "(docs/data-and-tasks.md#pipelines-at-scale-apache-beam). Unset DataConfig.cache_dir.")
        cached = [os.path.join(task_dir, "COMPLETED"), seqio.get_cached_info_path(task_dir, split)]
        if not all(tf.io.gfile.exists(path) for path in cached):
            raise UserError(f"{task.name!r} split {split!r} is not cached in {cache_dir!r}: run python -m "
                            f"t5lite.data.pipelines cache --task={task.name} --output_cache_dir={cache_dir}")


def _feature_converter(model_type: str, pack: bool) -> seqio.FeatureConverter:
    if model_type not in FEATURE_CONVERTERS:
        raise UserError(f"Unknown model_type {model_type!r}; choose one of {sorted(FEATURE_CONVERTERS)}.")
    return FEATURE_CONVERTERS[model_type](pack=pack)


def _check_feature_lengths(
    provider: seqio.Task | seqio.Mixture,
    model_type: str,
    feature_converter: seqio.FeatureConverter,
    task_feature_lengths: Mapping[str, int],
) -> None:
    """task_feature_lengths must name exactly the converter's features, which the task has."""
    needed = sorted(feature_converter.TASK_FEATURES)
    if sorted(task_feature_lengths) != needed:
        raise UserError(
            f"model_type {model_type!r} takes task_feature_lengths with keys {needed}, got "
            f"{sorted(task_feature_lengths)}."
        )
    missing = sorted(set(needed) - set(provider.output_features))
    if missing and set(pairs.SIDES) <= set(provider.output_features):
        raise UserError(f"{provider.name!r} holds preference pairs ({sorted(provider.output_features)}): train it "
                        "with PreferenceConfig.objective = 'dpo' (or 'ipo', 'simpo'); see gin/runs/dpo.gin.")
    if missing and model_type.startswith(PREFERENCE):
        raise UserError(f"{provider.name!r} has features {sorted(provider.output_features)}, not preference pairs "
                        f"{list(pairs.TASK_FEATURES)}: register it with tasks.add_preference_task, or set "
                        "PreferenceConfig.objective = None to train the LM loss.")
    if missing:
        raise UserError(
            f"{provider.name!r} has features {sorted(provider.output_features)}, but model_type "
            f"{model_type!r} needs {needed}. Use a task with {missing} or another model_type "
            "(decoder_only for targets-only tasks)."
        )
    too_short = {key: length for key, length in task_feature_lengths.items() if length < 1}
    if too_short:
        raise UserError(f"task_feature_lengths must be positive, got {too_short}.")
