"""seqio preprocessors for t5lite's pretraining objectives.

Every objective reads tokenized documents {"targets": int32 [doc_length]}, concatenates
them into one token stream with EOS after each document, and cuts the stream into
chunks, so no token is wasted on padding and document boundaries stay visible:

    span_corruption  {"inputs", "targets"}  T5's objective (noise spans -> sentinels)
    causal_lm        {"targets"}            next-token prediction
    prefix_lm        {"inputs", "targets"}  a chunk split at a random point

Randomness comes from seqio.map_over_dataset seeds, so a Task's output is a function of
the seed passed to get_dataset.

Cleaning filters on the raw text, one each, for a Task's preprocessors before tokenization
(cleaning.py does the work; for one chain of several filters and its report, use
cleaning.cleaning_preprocessor with a TextCleaner):

    scrub_pii           emails, IPs, card and phone numbers -> <EMAIL>, <IP>, <CARD>, <PHONE>
    filter_languages    keeps documents identified as one of the given languages
    filter_blocklist    drops documents holding listed words (C4's list by default)
    emoji_to_text       "👍" -> ":thumbs_up:"
"""

import dataclasses
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from t5lite.data import cleaning, pii, toxicity
from t5lite.errors import UserError

OutputFeatures = Mapping[str, seqio.Feature]
SequenceLengths = Mapping[str, int]


def concat_and_split_tokens(
    dataset: tf.data.Dataset, chunk_length: int, eos_id: int, feature_key: str = "targets"
) -> tf.data.Dataset:
    """Concatenates documents, each followed by EOS, and splits the stream into chunks.

    Args:
      dataset: examples {feature_key: int32 [doc_length]}; other features are dropped.
      chunk_length: tokens per chunk.
      eos_id: token appended after every document.
      feature_key: the feature holding the tokens.

    Returns:
      {feature_key: int32 [chunk_length]}; only the last chunk of a finite dataset is shorter.
    """
    if chunk_length < 1:
        raise UserError(f"chunk_length must be at least 1, got {chunk_length}.")

    def document_with_eos(features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        tokens = features[feature_key]
        return tf.concat([tokens, tf.constant([eos_id], dtype=tokens.dtype)], axis=0)

    token_stream = dataset.map(document_with_eos, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return token_stream.batch(chunk_length).map(lambda chunk: {feature_key: chunk})


# ------------------------------------------------------------------ cleaning filters

# Each filter alone: none of TextCleaner's other steps, no minimum length.
_FILTER_ONLY = {"markup": False, "unicode_form": None, "whitespace": False, "min_words": 0}


def scrub_pii(
    dataset: tf.data.Dataset,
    *,
    kinds: Sequence[str] = pii.PII_KINDS,
    placeholders: Mapping[str, str] | None = None,
    feature: str = "text",
) -> tf.data.Dataset:
    """Replaces PII in `feature` (string scalar) by placeholders (pii.scrub_pii); drops nothing."""
    cleaner = cleaning.TextCleaner(**_FILTER_ONLY, scrub_pii=True, pii_kinds=kinds, pii_placeholders=placeholders)
    return cleaning.cleaning_preprocessor(cleaner, feature)(dataset)


def filter_languages(
    dataset: tf.data.Dataset,
    *,
    keep_languages: Sequence[str] = ("en",),
    min_confidence: float = 0.5,
    feature: str = "text",
) -> tf.data.Dataset:
    """Keeps examples whose `feature` is identified (language_id.py) as one of keep_languages with at
    least min_confidence; "und" in keep_languages keeps the low-confidence ones too."""
    cleaner = cleaning.TextCleaner(**_FILTER_ONLY, keep_languages=keep_languages,
                                   min_language_confidence=min_confidence)
    return cleaning.cleaning_preprocessor(cleaner, feature)(dataset)


def filter_blocklist(
    dataset: tf.data.Dataset,
    *,
    wordlist: str | Sequence[str] = "ldnoobw_en",
    min_count: int = 1,
    min_fraction: float = 0.0,
    feature: str = "text",
) -> tf.data.Dataset:
    """Drops examples whose `feature` holds at least min_count entries of the word list and at least
    min_fraction entries per word. wordlist: a shipped list's name, a file, or the entries themselves."""
    entries = toxicity.load_wordlist(wordlist) if isinstance(wordlist, str) else wordlist
    cleaner = cleaning.TextCleaner(**_FILTER_ONLY, blocklist=entries, blocklist_min_count=min_count,
                                   blocklist_min_fraction=min_fraction)
    return cleaning.cleaning_preprocessor(cleaner, feature)(dataset)


def emoji_to_text(
    dataset: tf.data.Dataset, *, delimiters: tuple[str, str] = (":", ":"), feature: str = "text"
) -> tf.data.Dataset:
    """Writes each emoji of `feature` as its name between the delimiters ("👍" -> ":thumbs_up:")."""
    cleaner = cleaning.TextCleaner(**_FILTER_ONLY, emoji_to_text=True, emoji_delimiters=delimiters)
    return cleaning.cleaning_preprocessor(cleaner, feature)(dataset)


# ------------------------------------------------------------------ span corruption


@dataclasses.dataclass(frozen=True)
class SpanCorruptionLengths:
    """Lengths for span corruption of full chunks; inputs and targets count their EOS."""

    tokens_length: int  # raw tokens per chunk before corruption
    inputs_length: int  # non-noise tokens + one sentinel per span + EOS
    targets_length: int  # noise tokens + one sentinel per span + EOS
    num_noise_spans: int


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a chunk of `length` tokens (T5's random_spans_noise_mask).

    Clamped as in T5 so that a chunk has at least one noise and one non-noise token and at
    least one span; random_spans_noise_mask computes the same numbers in TensorFlow.
    """
    length = max(length, 2)
    num_noise_tokens = min(max(round(length * noise_density), 1), length - 1)
    num_noise_spans = round(num_noise_tokens / mean_noise_span_length)
    return num_noise_tokens, min(max(num_noise_spans, 1), length - num_noise_tokens)


def span_corruption_lengths(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> SpanCorruptionLengths:
    """T5's random_spans_helper: the longest chunk whose corrupted inputs fit inputs_length.

    Args:
      inputs_length: model inputs length, counting the EOS that seqio appends.
      noise_density: fraction of the chunk's tokens that are noise, in (0, 1).
      mean_noise_span_length: average noise span length, >= 1.

    Returns:
      The raw chunk length and the resulting inputs/targets lengths (e.g. inputs 512 at
      density 0.15 and mean span 3: a 568-token chunk, 512 inputs, 114 targets).
    """
    _check_noise_args(noise_density, mean_noise_span_length)
    minimum = _minimum_inputs_length(noise_density, mean_noise_span_length)
    if inputs_length < minimum:
        raise UserError(
            f"Inputs length {inputs_length} is too short for span corruption with "
            f"noise_density={noise_density} and mean_noise_span_length={mean_noise_span_length}: "
            f"one noise span needs inputs length >= {minimum}. "
            "Raise task_feature_lengths['inputs']."
        )
    # Inputs grow by at most one token per raw token, so inputs_length - 1 raw tokens fit.
    tokens_length = inputs_length - 1
    while _chunk_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = _chunk_lengths(tokens_length, noise_density, mean_noise_span_length)
    _, num_noise_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
    return SpanCorruptionLengths(tokens_length, inputs, targets, num_noise_spans)


def _chunk_lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs, targets) lengths, with EOS, after corrupting a chunk of tokens_length tokens."""
    num_noise_tokens, num_noise_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
    num_nonnoise_tokens = max(tokens_length, 2) - num_noise_tokens
    return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


def _minimum_inputs_length(noise_density: float, mean_noise_span_length: float) -> int:
    """Smallest inputs length whose chunk has a noise span without T5's degenerate-case clamping."""
    tokens_length = 2
    while round(round(tokens_length * noise_density) / mean_noise_span_length) < 1:
        tokens_length += 1
    return _chunk_lengths(tokens_length, noise_density, mean_noise_span_length)[0]


def _check_noise_args(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise UserError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_noise_span_length < 1.0:
        raise UserError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")


def random_spans_noise_mask(
    length: tf.Tensor, noise_density: float, mean_noise_span_length: float, seeds: tf.Tensor
) -> tf.Tensor:
    """T5's span mask: non-noise and noise spans alternate, starting with non-noise.

    Args:
      length: int32 scalar, tokens in the chunk.
      noise_density: fraction of noise tokens.
      mean_noise_span_length: average noise span length.
      seeds: int [2, 2], stateless seeds for the noise and the non-noise span lengths.

    Returns:
      bool [length], True at noise tokens; the span counts are noise_span_counts(length).
    """
    padded_length = tf.maximum(length, 2)  # as in T5: a 1-token chunk is masked as if it had 2
    num_noise_tokens = tf.clip_by_value(
        _round_to_int(tf.cast(padded_length, tf.float64) * noise_density), 1, padded_length - 1
    )
    num_noise_spans = tf.clip_by_value(
        _round_to_int(tf.cast(num_noise_tokens, tf.float64) / mean_noise_span_length),
        1,
        padded_length - num_noise_tokens,
    )
    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, seeds[0])
    nonnoise_span_lengths = _random_segmentation(padded_length - num_noise_tokens, num_noise_spans, seeds[1])
    span_lengths = tf.reshape(tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1), [-1])
    span_is_noise = tf.tile([False, True], [num_noise_spans])
    return tf.repeat(span_is_noise, span_lengths)[:length]


def _round_to_int(x: tf.Tensor) -> tf.Tensor:
    """Half-to-even rounding, like Python's round()."""
    return tf.cast(tf.round(x), tf.int32)


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Lengths int32 [num_segments] of a uniformly random split of num_items into non-empty parts."""
    is_segment_start = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    first_in_segment = tf.pad(seqio.utils.stateless_shuffle(is_segment_start, seed), [[1, 0]])
    segment_ids = tf.cumsum(first_in_segment)
    return tf.math.segment_sum(tf.ones_like(segment_ids), segment_ids)


def replace_spans_with_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor, first_sentinel_id: int) -> tf.Tensor:
    """Replaces the i-th run of True in span_mask by the single token first_sentinel_id - i.

    Args:
      tokens: int32 [length].
      span_mask: bool [length].
      first_sentinel_id: id of <extra_id_0>, i.e. vocabulary.vocab_size - 1.

    Returns:
      int32 [length - masked tokens + runs].
    """
    previous_is_masked = tf.pad(span_mask[:-1], [[1, 0]])
    is_run_start = span_mask & ~previous_is_masked
    sentinels = first_sentinel_id + 1 - tf.cumsum(tf.cast(is_run_start, tokens.dtype))
    tokens = tf.where(is_run_start, sentinels, tokens)
    return tf.boolean_mask(tokens, ~(span_mask & previous_is_masked))


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_spans(
    features: Mapping[str, tf.Tensor],
    seeds: tf.Tensor,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    first_sentinel_id: int,
) -> dict[str, tf.Tensor]:
    tokens = features["targets"]
    is_noise = random_spans_noise_mask(tf.size(tokens), noise_density, mean_noise_span_length, seeds)
    return {
        "inputs": replace_spans_with_sentinels(tokens, is_noise, first_sentinel_id),
        "targets": replace_spans_with_sentinels(tokens, ~is_noise, first_sentinel_id),
    }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: SequenceLengths,
    output_features: OutputFeatures,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tf.data.Dataset:
    """T5 span corruption over the document stream.

    Chunks of span_corruption_lengths(...).tokens_length tokens; in each, random noise spans
    are replaced in the inputs by sentinels <extra_id_i> (id vocab_size - 1 - i for span i),
    and the targets are, for each span i, <extra_id_i> followed by its tokens. With the EOS
    that seqio.preprocessors.append_eos_after_trim adds next, full chunks give inputs of
    (at most, usually exactly) sequence_length["inputs"] tokens.

    Args:
      dataset: tokenized documents {"targets": int32 [doc_length]}.
      sequence_length: needs "inputs" and "targets".
      output_features: "targets" (and "inputs") with the vocabulary holding the sentinels.
      noise_density: fraction of tokens masked.
      mean_noise_span_length: average tokens per masked span.

    Returns:
      {"inputs": int32 [<= inputs - 1], "targets": int32 [<= targets - 1]} (EOS added later).

    Raises:
      ValueError: if the lengths are too short for the objective, or the vocabulary has
        fewer sentinels than a chunk has spans.
    """
    inputs_length = _required_length(sequence_length, "inputs", "span_corruption")
    targets_length = _required_length(sequence_length, "targets", "span_corruption")
    lengths = span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
    if lengths.targets_length > targets_length:
        raise UserError(
            f"Span corruption with inputs length {inputs_length} (noise_density={noise_density}, "
            f"mean_noise_span_length={mean_noise_span_length}) makes targets of {lengths.targets_length} "
            f"tokens, but the targets length is {targets_length}. Set task_feature_lengths['targets'] "
            f">= {lengths.targets_length} or lower the inputs length."
        )
    vocabulary = output_features["targets"].vocabulary
    if lengths.num_noise_spans > vocabulary.extra_ids:
        raise UserError(
            f"Span corruption with inputs length {inputs_length} needs {lengths.num_noise_spans} "
            f"sentinels but the vocabulary has {vocabulary.extra_ids} extra_ids. Lower the inputs "
            "length or raise mean_noise_span_length."
        )
    chunks = concat_and_split_tokens(dataset, lengths.tokens_length, vocabulary.eos_id)
    return _corrupt_spans(
        chunks,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        first_sentinel_id=vocabulary.vocab_size - 1,
    )


# ------------------------------------------------------------------ language modelling


def causal_lm(
    dataset: tf.data.Dataset, sequence_length: SequenceLengths, output_features: OutputFeatures
) -> tf.data.Dataset:
    """Chunks {"targets": int32 [sequence_length["targets"]]} of the document stream."""
    targets_length = _required_length(sequence_length, "targets", "causal_lm")
    return concat_and_split_tokens(dataset, targets_length, output_features["targets"].vocabulary.eos_id)


@seqio.map_over_dataset(num_seeds=1)
def _split_at_random_point(
    features: Mapping[str, tf.Tensor], seed: tf.Tensor, *, max_targets_length: int
) -> dict[str, tf.Tensor]:
    tokens = features["targets"]
    length = tf.size(tokens)
    split_point = tf.random.stateless_uniform(
        [], seed=seed, minval=tf.maximum(1, length - max_targets_length), maxval=length, dtype=tf.int32
    )
    return {"inputs": tokens[:split_point], "targets": tokens[split_point:]}


def prefix_lm(
    dataset: tf.data.Dataset, sequence_length: SequenceLengths, output_features: OutputFeatures
) -> tf.data.Dataset:
    """Each chunk of sequence_length["inputs"] tokens split at a uniformly random point p.

    As in T5's prefix LM: inputs = chunk[:p], targets = chunk[p:], with 1 <= p <= L - 1 and
    L - p <= sequence_length["targets"] (L = chunk length). Chunks of one token are dropped.

    Returns:
      {"inputs": int32 [p], "targets": int32 [L - p]}.
    """
    inputs_length = _required_length(sequence_length, "inputs", "prefix_lm")
    targets_length = _required_length(sequence_length, "targets", "prefix_lm")
    if inputs_length < 2:
        raise UserError(f"prefix_lm needs task_feature_lengths['inputs'] >= 2, got {inputs_length}.")
    eos_id = output_features["targets"].vocabulary.eos_id
    chunks = concat_and_split_tokens(dataset, inputs_length, eos_id)
    chunks = chunks.filter(lambda features: tf.size(features["targets"]) >= 2)
    return _split_at_random_point(chunks, max_targets_length=targets_length)


# ------------------------------------------------------------------ UL2 mixture of denoisers

# UL2 (Tay et al. 2022): regular (R) and extreme (X) span corruption and sequential (S, prefix
# LM) denoising, each announced to the model by a mode token at the start of the inputs.
UL2_DENOISERS: dict[str, tuple[str, dict[str, float] | None]] = {
    "r3": ("[NLU]", {"noise_density": 0.15, "mean_noise_span_length": 3.0}),
    "r8": ("[NLU]", {"noise_density": 0.15, "mean_noise_span_length": 8.0}),
    "x3": ("[NLG]", {"noise_density": 0.5, "mean_noise_span_length": 3.0}),
    "x8": ("[NLG]", {"noise_density": 0.5, "mean_noise_span_length": 8.0}),
    "x64": ("[NLG]", {"noise_density": 0.15, "mean_noise_span_length": 64.0}),
    "s": ("[S2S]", None),  # prefix LM
}


def ul2_denoiser(
    dataset: tf.data.Dataset, sequence_length: SequenceLengths, output_features: OutputFeatures, *, denoiser: str
) -> tf.data.Dataset:
    """One UL2 denoiser: its objective on inputs shortened by the mode token, then the token.

    Returns {"inputs": [mode tokens, ...corrupted or prefix...], "targets": [...]} (EOS later).
    """
    if denoiser not in UL2_DENOISERS:
        raise UserError(f"Unknown UL2 denoiser {denoiser!r}; choose one of {sorted(UL2_DENOISERS)}.")
    mode, span_kwargs = UL2_DENOISERS[denoiser]
    mode_tokens = output_features["inputs"].vocabulary.encode(mode)
    inputs_length = _required_length(sequence_length, "inputs", f"ul2 {denoiser}")
    shorter = {**sequence_length, "inputs": inputs_length - len(mode_tokens)}
    if span_kwargs is None:
        # One less for the EOS that the task appends to the targets too.
        shorter["targets"] = _required_length(sequence_length, "targets", f"ul2 {denoiser}") - 1
        dataset = prefix_lm(dataset, shorter, output_features)
    else:
        dataset = span_corruption(dataset, shorter, output_features, **span_kwargs)
    prefix = tf.constant(mode_tokens, tf.int32)
    return dataset.map(lambda ex: {**ex, "inputs": tf.concat([prefix, tf.cast(ex["inputs"], tf.int32)], 0)},
                       num_parallel_calls=tf.data.AUTOTUNE)


def _required_length(sequence_length: SequenceLengths | None, key: str, objective: str) -> int:
    if not sequence_length or key not in sequence_length:
        raise UserError(
            f"{objective} needs a {key!r} length, got sequence_length={sequence_length}. "
            f"Pass task_feature_lengths with a {key!r} entry."
        )
    return sequence_length[key]
