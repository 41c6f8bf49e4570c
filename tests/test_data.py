"""The data package end to end: embedded corpus, vocabulary, seqio tasks, get_batches."""

import hashlib
import importlib
import os
import re

import numpy as np
import pytest
import seqio

from t5lite.data import embedded_corpus, pipeline, tasks, vocab

SPAN_LENGTHS = {"inputs": 64, "targets": 16}
OBJECTIVES = {  # objective -> (the model_type that trains on it, task_feature_lengths)
    "span_corruption": ("encoder_decoder", SPAN_LENGTHS),
    "lm": ("decoder_only", {"targets": 64}),
    "prefix_lm": ("prefix_lm", {"inputs": 32, "targets": 32}),
}


def batches(name, model_type, lengths, *, split="validation", batch_size=2, **kwargs):
    kwargs = {"shuffle": False, "seed": 0, **kwargs}
    return pipeline.get_batches(
        name,
        split=split,
        task_feature_lengths=lengths,
        model_type=model_type,
        batch_size=batch_size,
        **kwargs,
    )


# ---------------------------------------------------------------- corpus


def test_corpus_files_match_the_checksums_in_the_corpus_readme():
    corpus = embedded_corpus.corpus_dir()
    readme = open(os.path.join(corpus, "README.md"), encoding="utf-8").read()
    listed = re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE)
    assert len(listed) == 4
    for sha256, path in listed:
        with open(os.path.join(corpus, path), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha256, path


def test_tiny_shakespeare_splits_are_the_first_90_and_last_10_percent_of_characters():
    train_text, validation_text = embedded_corpus.tiny_shakespeare_split_texts()
    assert (len(train_text), len(validation_text)) == (1_003_854, 111_540)
    train = embedded_corpus.tiny_shakespeare_documents("train")
    validation = embedded_corpus.tiny_shakespeare_documents("validation")
    assert train[0].startswith("First Citizen:\nBefore we proceed")
    assert all(document in train_text for document in train)
    # Validation text is unseen in train (short speeches like "All:\nAy." recur in the plays).
    assert not any(d in train_text for d in validation if len(d) > 200)
    assert sum(len(d) > 200 for d in validation) > 100


def test_wikitext2_documents_are_articles_kept_as_is():
    counts = {split: len(embedded_corpus.wikitext2_documents(split)) for split in embedded_corpus.WIKITEXT2_SPLITS}
    assert counts == {"train": 629, "validation": 60, "test": 62}
    first = embedded_corpus.wikitext2_documents("train")[0]
    assert first.startswith("= Valkyria Chronicles III =\nSenjō no Valkyria 3 : <unk> Chronicles")
    assert " @-@ " in first


def test_unknown_corpus_split_is_a_clear_error():
    with pytest.raises(ValueError, match=r"tiny Shakespeare has no split 'test'"):
        embedded_corpus.tiny_shakespeare_documents("test")


# ---------------------------------------------------------------- vocabulary


def test_default_vocabulary_has_t5_ids_and_sentinels_at_the_top():
    vocabulary = vocab.get_default_vocabulary()
    assert vocabulary.vocab_size == 8100 <= vocab.DEFAULT_MODEL_VOCAB_SIZE
    assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
    assert vocabulary.tokenizer.bos_id() == -1
    pieces = [vocabulary.tokenizer.id_to_piece(8099 - i) for i in range(100)]
    assert pieces == [f"▁<extra_id_{i}>" for i in range(100)]
    assert vocabulary.tokenizer.id_to_piece(7999) != "▁<extra_id_100>"
    assert vocabulary.encode("<extra_id_0>") == [8099]


@pytest.mark.parametrize(
    "text",
    [
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
        "= Robert <unk> =\nRobert <unk> is an English film , television and theatre actor .",
        "Senjō no Valkyria 3 ( 戦場のヴァルキュリア3 ) costs 3 @,@ 000 yen",
    ],
)
def test_default_vocabulary_round_trips_text(text):
    vocabulary = vocab.get_default_vocabulary()
    assert vocabulary.decode(vocabulary.encode(text)) == text


def test_literal_unk_text_is_an_ordinary_piece_not_sentencepiece_unk():
    vocabulary = vocab.get_default_vocabulary()
    ids = vocabulary.encode("<unk>")
    assert vocabulary.unk_id not in ids and vocabulary.decode(ids) == "<unk>"
    assert vocabulary.tokenizer.id_to_piece(vocabulary.unk_id) == vocab.UNK_PIECE


def test_train_sentencepiece_is_deterministic_with_t5_ids(tmp_path, monkeypatch):
    texts = embedded_corpus.tiny_shakespeare_documents("validation")
    models = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)  # the model records its output prefix
        path = vocab.train_sentencepiece(texts, "small", vocab_size=400, max_sentences=500)
        models.append(open(path, "rb").read())
    assert models[0] == models[1]
    trained = seqio.SentencePieceVocabulary(str(tmp_path / "a" / "small.model"))
    assert trained.vocab_size == 400
    assert (trained.pad_id, trained.eos_id, trained.unk_id, trained.tokenizer.bos_id()) == (0, 1, 2, -1)


# ---------------------------------------------------------------- tasks


def test_tasks_and_mixtures_are_registered_once_even_on_reimport():
    importlib.reload(tasks)
    ul2 = {f"{corpus}_{o}" for corpus in tasks.CORPORA for o in tasks.OBJECTIVES if o.startswith("ul2_")}
    assert set(pipeline.list_tasks_of("t5lite_default_ul2")) == ul2 and len(ul2) == 12
    for objective in ("span_corruption", "lm", "prefix_lm"):
        assert pipeline.list_tasks_of(f"t5lite_default_{objective}") == [
            f"tiny_shakespeare_{objective}",
            f"wikitext2_{objective}",
        ]
    assert pipeline.list_tasks_of("wikitext2_lm") == ["wikitext2_lm"]


def test_mixture_rates_are_train_characters():
    mixture = seqio.get_mixture_or_task("t5lite_default_lm")
    rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
    assert rates["tiny_shakespeare_lm"] == sum(map(len, embedded_corpus.tiny_shakespeare_documents("train")))
    assert 10 < rates["wikitext2_lm"] / rates["tiny_shakespeare_lm"] < 11


@pytest.mark.parametrize("corpus", sorted(tasks.CORPORA))
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_task_has_a_nonempty_validation_split(corpus, objective):
    model_type, lengths = OBJECTIVES[objective]
    batch = next(batches(f"{corpus}_{objective}", model_type, lengths, num_epochs=1))
    assert batch["decoder_loss_weights"].sum() > 0


# ---------------------------------------------------------------- get_batches


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_get_batches_gives_int32_features_with_segment_ids(objective):
    model_type, lengths = OBJECTIVES[objective]
    batch = next(batches(f"tiny_shakespeare_{objective}", model_type, lengths, batch_size=3))
    decoder_length = sum(lengths.values()) if model_type == "prefix_lm" else lengths["targets"]
    expected = {
        "decoder_target_tokens",
        "decoder_input_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    }
    if model_type == "encoder_decoder":
        expected |= {"encoder_input_tokens", "encoder_segment_ids", "encoder_positions"}
        assert batch["encoder_input_tokens"].shape == (3, lengths["inputs"])
    if model_type == "prefix_lm":
        expected |= {"decoder_causal_attention"}
        # Each chunk is inputs-length long, so two fit in a row of inputs + targets.
        assert np.all(batch["decoder_segment_ids"].max(axis=1) == 2)
    assert set(batch) == expected
    assert all(array.dtype == np.int32 for array in batch.values())
    assert batch["decoder_target_tokens"].shape == (3, decoder_length)
    for segment_ids, positions, targets, inputs in zip(
        batch["decoder_segment_ids"],
        batch["decoder_positions"],
        batch["decoder_target_tokens"],
        batch["decoder_input_tokens"],
        strict=True,
    ):
        starts = np.flatnonzero(np.diff(segment_ids, prepend=0) > 0)
        assert segment_ids[0] == 1 and np.all(positions[starts] == 0) and np.all(inputs[starts] == 0)
        within = np.flatnonzero((np.diff(segment_ids, prepend=0) == 0) & (segment_ids > 0))
        assert np.array_equal(inputs[within], targets[within - 1])  # targets shifted right
        assert np.all(targets[segment_ids == 0] == 0)


def test_same_seed_gives_the_same_batches_and_another_seed_different_ones():
    def first_batches(seed):
        stream = batches(
            "t5lite_default_span_corruption",
            "encoder_decoder",
            SPAN_LENGTHS,
            split="train",
            batch_size=4,
            shuffle=True,
            seed=seed,
        )
        return [next(stream) for _ in range(2)]

    def same(a, b):
        return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)

    reference = first_batches(seed=7)
    assert same(first_batches(seed=7), reference)
    assert not same(first_batches(seed=8), reference)


@pytest.mark.parametrize("objective", ["span_corruption", "prefix_lm"])
def test_a_restored_stream_continues_with_the_batches_the_saved_one_would_have_given(tmp_path, objective):
    # Through the mixture sampler, document and example shuffling, seeded objectives and packing.
    model_type, lengths = OBJECTIVES[objective]

    def stream():
        return batches(f"t5lite_default_{objective}", model_type, lengths, split="train", batch_size=4,
                       shuffle=True, seed=3)

    saved = stream()
    for _ in range(3):
        next(saved)
    saved.save(str(tmp_path / "position"))
    expected = [next(saved) for _ in range(3)]

    restored = stream()
    restored.restore(str(tmp_path / "position"))
    got = [next(restored) for _ in range(3)]
    for want, have in zip(expected, got, strict=True):
        assert want.keys() == have.keys() and all(np.array_equal(want[k], have[k]) for k in want)


def test_a_stream_cannot_be_saved_before_its_first_batch_is_taken(tmp_path):
    stream = batches("tiny_shakespeare_lm", "decoder_only", {"targets": 64})
    with pytest.raises(RuntimeError, match="next"):
        stream.save(str(tmp_path / "position"))


def lm_rows(**kwargs) -> list[list[int]]:
    """Every (unpacked) validation row of tiny_shakespeare_lm, without padding."""
    rows = batches(
        "tiny_shakespeare_lm", "decoder_only", {"targets": 64}, batch_size=1, num_epochs=1, pack=False, **kwargs
    )
    return [row[row > 0].tolist() for batch in rows for row in batch["decoder_target_tokens"]]


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_shards_read_disjoint_documents_that_cover_the_split(shuffle):
    whole = lm_rows(shuffle=shuffle, seed=5)
    shards = [lm_rows(shuffle=shuffle, seed=5, shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
    documents = len(embedded_corpus.tiny_shakespeare_documents("validation"))
    eos_counts = [sum(row.count(1) for row in rows) for rows in shards]
    assert sum(eos_counts) == documents and min(eos_counts) > 0.4 * documents
    assert sum(map(len, sum(shards, []))) == sum(map(len, whole))
    assert not {tuple(row) for row in shards[0]} & {tuple(row) for row in shards[1]}


def test_sharded_shuffling_without_a_seed_is_refused():
    with pytest.raises(ValueError, match="Sharded shuffling needs a seed"):
        lm_rows(shuffle=True, seed=None, shard_info=seqio.ShardInfo(0, 2))


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown seqio Task or Mixture 'wikitext_lm'.*wikitext2_lm"):
        batches("wikitext_lm", "decoder_only", {"targets": 64})


def test_missing_split_names_the_tasks_that_lack_it():
    with pytest.raises(ValueError, match=r"split 'test' is missing from tiny_shakespeare_lm"):
        batches("t5lite_default_lm", "decoder_only", {"targets": 64}, split="test")


def test_lengths_too_short_for_span_corruption_say_what_is_needed():
    with pytest.raises(ValueError, match=r"targets of 114 tokens.*>= 114"):
        batches("t5lite_default_span_corruption", "encoder_decoder", {"inputs": 512, "targets": 64})


def test_feature_lengths_that_do_not_fit_the_model_type_are_refused():
    with pytest.raises(ValueError, match=r"takes task_feature_lengths with keys \['targets'\]"):
        batches("tiny_shakespeare_span_corruption", "decoder_only", SPAN_LENGTHS)
    with pytest.raises(ValueError, match=r"'tiny_shakespeare_lm' has features \['targets'\]"):
        batches("tiny_shakespeare_lm", "encoder_decoder", SPAN_LENGTHS)


def test_empty_split_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("\n\n\n")
    monkeypatch.setenv(embedded_corpus.CORPUS_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"'tiny_shakespeare_lm' split 'validation' produced no batch"):
        batches("tiny_shakespeare_lm", "decoder_only", {"targets": 64}, num_epochs=1)


def test_vocab_cli_trains_from_a_task_and_reports_tokens_per_character(tmp_path, capsys):
    from t5lite.data import train_vocab

    code = train_vocab.main([f"--output={tmp_path}/v", "--task=tiny_shakespeare_lm", "--vocab_size=400",
                             "--model_type=bpe"])
    assert code == 0
    out = capsys.readouterr().out
    assert "500 ids with 100 sentinels" in out
    ratio = float(out.split("; ")[1].split()[0])
    assert 0.2 < ratio < 1.0  # a 400-piece BPE spends fewer than one token per character
    assert os.path.exists(f"{tmp_path}/v.model")


def test_byte_level_task_uses_byte_ids():
    batch = next(pipeline.get_batches("tiny_shakespeare_bytes_lm", split="validation",
                                      task_feature_lengths={"targets": 64}, model_type="decoder_only",
                                      batch_size=2, shuffle=False, seed=0))
    tokens = batch["decoder_target_tokens"]
    assert tokens.max() < 259 and (tokens > 0).all()  # 3 special ids + 256 bytes, no padding when chunked
    assert "c4_span_corruption" in seqio.TaskRegistry.names()
