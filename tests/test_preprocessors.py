"""Objectives in t5lite.data.preprocessors, on known token sequences with real tf.data."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5lite.data import preprocessors, vocab

VOCAB = vocab.get_default_vocabulary()
EOS = VOCAB.eos_id
FIRST_SENTINEL = VOCAB.vocab_size - 1  # <extra_id_0> = 8099
LAST_SENTINEL = VOCAB.vocab_size - vocab.DEFAULT_EXTRA_IDS  # <extra_id_99> = 8000
SPAN_FEATURES = {
    "inputs": seqio.Feature(VOCAB, add_eos=True),
    "targets": seqio.Feature(VOCAB, add_eos=True),
}
LM_FEATURES = {
    "inputs": seqio.Feature(VOCAB, add_eos=False),
    "targets": seqio.Feature(VOCAB, add_eos=False),
}


def distinct_documents(lengths: list[int]) -> list[list[int]]:
    """Documents of consecutive ids from 3 up, so every token of the stream is unique."""
    starts = np.cumsum([3] + lengths[:-1])
    return [list(range(start, start + length)) for start, length in zip(starts, lengths, strict=True)]


def token_stream(documents: list[list[int]]) -> list[int]:
    return [token for document in documents for token in document + [EOS]]


def documents_dataset(documents: list[list[int]]) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_generator(lambda: iter(documents), output_signature=tf.TensorSpec([None], tf.int32))
    return dataset.map(lambda tokens: {"targets": tokens})


def corrupt(documents, sequence_length, seed, **kwargs) -> list[dict[str, np.ndarray]]:
    """span_corruption then seqio's EOS step, as in the registered tasks."""
    with seqio.utils.map_seed_manager(seed):
        dataset = preprocessors.span_corruption(documents_dataset(documents), sequence_length, SPAN_FEATURES, **kwargs)
    dataset = seqio.preprocessors.append_eos_after_trim(dataset, SPAN_FEATURES, sequence_length)
    return list(dataset.as_numpy_iterator())


def sentinels_in(tokens: np.ndarray) -> list[int]:
    return [int(token) for token in tokens if token >= LAST_SENTINEL]


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Fills each sentinel of the inputs with the tokens that follow it in the targets."""
    span_tokens: dict[int, list[int]] = {}
    for token in targets[:-1]:
        if token >= LAST_SENTINEL:
            sentinel = int(token)
            span_tokens[sentinel] = []
        else:
            span_tokens[sentinel].append(int(token))
    chunk = []
    for token in inputs[:-1]:
        chunk.extend(span_tokens.pop(int(token)) if token >= LAST_SENTINEL else [int(token)])
    assert not span_tokens, "every target span has a sentinel in the inputs"
    return chunk


def test_concat_and_split_tokens_puts_eos_after_each_document():
    dataset = documents_dataset([[5, 6, 7], [8], [9, 10]])
    chunks = preprocessors.concat_and_split_tokens(dataset, chunk_length=3, eos_id=EOS)
    assert [c["targets"].tolist() for c in chunks.as_numpy_iterator()] == [
        [5, 6, 7],
        [1, 8, 1],
        [9, 10, 1],
    ]


def test_replace_spans_with_sentinels_numbers_spans_down_from_extra_id_0():
    tokens = tf.range(10, 20)
    mask = tf.constant([0, 0, 1, 1, 0, 1, 0, 0, 0, 1]) > 0
    inputs = preprocessors.replace_spans_with_sentinels(tokens, mask, 8099)
    targets = preprocessors.replace_spans_with_sentinels(tokens, ~mask, 8099)
    assert inputs.numpy().tolist() == [10, 11, 8099, 14, 8098, 16, 17, 18, 8097]
    assert targets.numpy().tolist() == [8099, 12, 13, 8098, 15, 8097, 19]


def test_span_corruption_lengths_match_t5_for_512_inputs():
    lengths = preprocessors.span_corruption_lengths(512, 0.15, 3.0)
    assert lengths == preprocessors.SpanCorruptionLengths(
        tokens_length=568, inputs_length=512, targets_length=114, num_noise_spans=28
    )


@pytest.mark.parametrize("inputs_length", [10, 11, 64, 100, 257, 1000])
def test_span_corruption_chunk_is_the_longest_that_fits(inputs_length):
    def corrupted_inputs_length(tokens_length):  # non-noise + one sentinel per span + EOS
        num_noise, num_spans = preprocessors.noise_span_counts(tokens_length, 0.15, 3.0)
        return tokens_length - num_noise + num_spans + 1

    lengths = preprocessors.span_corruption_lengths(inputs_length, 0.15, 3.0)
    assert lengths.inputs_length == corrupted_inputs_length(lengths.tokens_length) <= inputs_length
    assert corrupted_inputs_length(lengths.tokens_length + 1) > inputs_length


def test_noise_mask_matches_the_python_counts_and_alternates_from_non_noise():
    for length in range(1, 160):
        seeds = tf.constant([[length, 1], [length, 2]], tf.int64)
        mask = preprocessors.random_spans_noise_mask(tf.constant(length), 0.15, 3.0, seeds).numpy()
        num_noise, num_spans = preprocessors.noise_span_counts(length, 0.15, 3.0)
        assert mask.shape == (length,)
        if length == 1:
            assert not mask.any()  # T5 masks a 1-token chunk as if it had 2 and keeps the first
            continue
        span_starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert (mask.sum(), len(span_starts)) == (num_noise, num_spans)
        assert not mask[0] and mask[-1]


def test_span_corruption_reconstructs_the_stream_with_ordered_sentinels():
    documents = distinct_documents([50, 300, 7, 1, 900, 120, 400])
    sequence_length = {"inputs": 128, "targets": 40}
    lengths = preprocessors.span_corruption_lengths(128, 0.15, 3.0)
    examples = corrupt(documents, sequence_length, seed=0)

    recovered = []
    for example in examples:
        inputs, targets = example["inputs"], example["targets"]
        assert inputs[-1] == EOS and targets[-1] == EOS
        sentinels = sentinels_in(inputs)
        assert sentinels == list(range(FIRST_SENTINEL, FIRST_SENTINEL - len(sentinels), -1))
        assert sentinels_in(targets) == sentinels and targets[0] == FIRST_SENTINEL
        recovered += reconstruct(inputs, targets)
    assert recovered == token_stream(documents)

    full_chunks = examples[:-1]  # the stream's last chunk is shorter
    num_noise, num_spans = preprocessors.noise_span_counts(lengths.tokens_length, 0.15, 3.0)
    for example in full_chunks:
        assert len(example["inputs"]) == lengths.inputs_length <= 128
        assert len(example["targets"]) == lengths.targets_length <= 40
        assert len(sentinels_in(example["inputs"])) == num_spans
        assert len(example["targets"]) - num_spans - 1 == num_noise
    assert abs(num_noise / lengths.tokens_length - 0.15) < 0.5 / lengths.tokens_length


def test_span_corruption_is_a_function_of_the_seed():
    documents = distinct_documents([400, 300])
    sequence_length = {"inputs": 64, "targets": 20}

    def flat(examples):
        return [example[key].tolist() for example in examples for key in ("inputs", "targets")]

    first = flat(corrupt(documents, sequence_length, seed=1))
    assert flat(corrupt(documents, sequence_length, seed=1)) == first
    assert flat(corrupt(documents, sequence_length, seed=2)) != first


def test_span_corruption_rejects_targets_too_short_for_the_inputs():
    with pytest.raises(ValueError, match=r"targets of 114 tokens.*targets length is 100"):
        corrupt([[5, 6]], {"inputs": 512, "targets": 100}, seed=0)


def test_span_corruption_rejects_inputs_too_short_for_one_noise_span():
    with pytest.raises(ValueError, match=r"Inputs length 9 is too short.*>= 10"):
        corrupt([[5, 6]], {"inputs": 9, "targets": 9}, seed=0)


def test_span_corruption_rejects_more_spans_than_sentinels():
    with pytest.raises(ValueError, match=r"needs 227 sentinels.*100 extra_ids"):
        corrupt([[5, 6]], {"inputs": 4096, "targets": 4096}, seed=0)


def test_causal_lm_chunks_the_stream_to_the_targets_length():
    documents = distinct_documents([10, 3, 30])
    dataset = preprocessors.causal_lm(documents_dataset(documents), {"targets": 16}, LM_FEATURES)
    chunks = [chunk["targets"].tolist() for chunk in dataset.as_numpy_iterator()]
    assert [len(chunk) for chunk in chunks] == [16, 16, 14]
    assert sum(chunks, []) == token_stream(documents)


def test_prefix_lm_splits_each_chunk_at_a_random_point_that_fits():
    documents = distinct_documents([200, 75])
    sequence_length = {"inputs": 16, "targets": 6}
    with seqio.utils.map_seed_manager(3):
        dataset = preprocessors.prefix_lm(documents_dataset(documents), sequence_length, LM_FEATURES)
    examples = list(dataset.as_numpy_iterator())
    stream = token_stream(documents)  # 277 tokens: 17 chunks of 16, then a 5-token chunk
    assert sum((e["inputs"].tolist() + e["targets"].tolist() for e in examples), []) == stream
    for example in examples:
        chunk_length = len(example["inputs"]) + len(example["targets"])
        assert 1 <= len(example["targets"]) <= 6 and 1 <= len(example["inputs"]) < chunk_length
    assert len({len(example["inputs"]) for example in examples}) > 1


def test_ul2_denoisers_prefix_their_mode_token_and_fit_the_lengths():
    from t5lite.data import pipeline, vocab

    v = vocab.get_default_vocabulary()
    lengths = {"inputs": 256, "targets": 256}
    assert set(pipeline.list_tasks_of("wikitext2_ul2")) == {f"wikitext2_ul2_{d}" for d in preprocessors.UL2_DENOISERS}
    for denoiser, (mode, span_kwargs) in preprocessors.UL2_DENOISERS.items():
        task = seqio.TaskRegistry.get(f"wikitext2_ul2_{denoiser}")
        examples = list(task.get_dataset(lengths, split="validation", shuffle=False, seed=0).take(5)
                        .as_numpy_iterator())
        mode_ids = v.encode(mode)
        for ex in examples:
            assert list(ex["inputs"][: len(mode_ids)]) == mode_ids
            assert len(ex["inputs"]) <= 256 and len(ex["targets"]) <= 256
            assert ex["inputs"][-1] == v.eos_id and ex["targets"][-1] == v.eos_id
        if span_kwargs:  # the corrupted tokens are about noise_density of the chunk
            sentinels = sum(int((ex["targets"] >= v.vocab_size - 100).sum()) for ex in examples)
            noise = sum(len(ex["targets"]) - 1 for ex in examples) - sentinels
            total = noise + sum(len(ex["inputs"]) - len(mode_ids) - 1 for ex in examples) - sentinels
            assert abs(noise / total - span_kwargs["noise_density"]) < 0.03


def test_ul2_lengths_too_short_for_extreme_spans_are_named():
    task = seqio.TaskRegistry.get("wikitext2_ul2_x64")
    with pytest.raises(ValueError, match="mean_noise_span_length=64.0"):
        task.get_dataset({"inputs": 128, "targets": 128}, split="validation", shuffle=False, seed=0)
