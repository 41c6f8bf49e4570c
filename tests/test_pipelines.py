"""The Beam pipelines (t5lite.data.pipelines) on the DirectRunner with two workers: what they keep and report
equals the in-process tools' (cleaning, dedup), and a seqio cache reads back as the task does uncached."""

import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="apache-beam is not installed (requirements.txt pins it)")

from t5lite.data import cleaning, dedup, pipelines  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over the lazy dog while seven bright stars rise above a quiet "
         "harbour where old sailors mend their nets and sing of distant islands lost beneath the waves").split()
TWO_THREADS = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]


def _text(seed: int, n: int = 80) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, n)) + "."


def _changed(text: str, positions) -> str:
    words = text.split()
    for p in positions:
        words[p] = f"changed{p}"
    return " ".join(words)


def _corpus(tmp_path) -> list[str]:
    """Two files with planted exact duplicates, near duplicates (one word of 80 changed: 5-word shingle
    Jaccard ~0.88) and a chain c ~ b ~ a (Jaccard ~0.87) whose ends are not near duplicates (~0.75)."""
    base = [_text(i) for i in range(60)]
    chain_a = _text(1000, 200)
    chain_b = _changed(chain_a, range(100, 110))
    chain_c = _changed(chain_b, range(20, 30))
    first = base[:30] + [base[3].upper(), _changed(base[5], [40]), chain_c, "", "!!! ???", base[7]]
    second = base[30:] + [chain_b, "  " + base[3] + "  ", _changed(base[40], [10]), chain_a, "!!! ???"]
    paths = []
    for name, docs in (("first.txt", first), ("second.txt", second)):
        (tmp_path / name).write_text("\n".join(docs) + "\n")
        paths.append(str(tmp_path / name))
    return paths


def _shards(prefix) -> list[str]:
    return sorted(line for path in glob.glob(f"{prefix}-*-of-*") for line in open(path).read().splitlines() if line)


@pytest.mark.slow
def test_dedup_on_two_processes_keeps_what_the_in_process_tool_keeps(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    paths = _corpus(tmp_path)
    inputs = [f"--input={p}" for p in paths]
    assert dedup.main([*inputs, f"--output={tmp_path}/ref.txt", "--mode=near", f"--report={tmp_path}/ref.json"]) == 0
    assert pipelines.main(["dedup", *inputs, f"--output={tmp_path}/beam", "--mode=near", "--num_shards=2",
                           "--direct_num_workers=2", "--direct_running_mode=multi_processing"]) == 0
    expected = sorted(open(tmp_path / "ref.txt").read().splitlines())
    assert _shards(tmp_path / "beam") == expected
    report, reference = (json.load(open(p)) for p in (tmp_path / "beam.report.json", tmp_path / "ref.json"))
    assert {**report, "output": None} == {**reference, "output": None}
    # What was planted (the empty line is no document): 4 exact duplicates, 4 near ones (b and a of the chain).
    assert (report["documents"], report["exact_duplicates"], report["near_duplicates"]) == (70, 4, 4)
    hasher = dedup.MinHasher()
    chain_a, chain_c = (hasher.signature(open(paths[f]).read().splitlines()[i]) for f, i in ((1, 33), (0, 32)))
    assert not dedup.is_near_duplicate(chain_a, chain_c, 0.8)  # a is dropped through b


def test_clean_on_two_workers_merges_the_reports_into_the_in_process_report(tmp_path):
    src = tmp_path / "raw.txt"
    docs = [f"<p>{_text(i)}</p> Mail jo{i}@example.com 👍" for i in range(40)]
    docs += ["short", "Ceci est un texte écrit en français pour le filtre de langue, sans aucun doute.",
             "Bad words: sex sex sex here, in a sentence that is long enough."]
    src.write_text("\n".join(docs) + "\n")
    flags = ["--keep_languages=en", "--blocklist=ldnoobw_en", "--scrub_pii", "--emoji_to_text", "--min_words=3"]
    assert cleaning.main([f"--input={src}", f"--output={tmp_path}/ref.txt", f"--report={tmp_path}/ref.json",
                          *flags]) == 0
    assert pipelines.main(["clean", f"--input={src}", f"--output={tmp_path}/beam", *flags, *TWO_THREADS]) == 0
    assert _shards(tmp_path / "beam") == sorted(open(tmp_path / "ref.txt").read().splitlines())
    report, reference = (json.load(open(p)) for p in (tmp_path / "beam.report.json", tmp_path / "ref.json"))
    assert {**report, "output": None} == {**reference, "output": None}
    assert report["documents_dropped"] == {"too_short": 1, "language": 1, "blocklist": 1}
    assert report["pii_replaced"]["email"] == 40


def test_flags_that_neither_the_tool_nor_beam_knows_are_refused(capsys):
    with pytest.raises(SystemExit):
        pipelines.main(["dedup", "--input=x", "--output=y", "--treshold=0.9"])
    assert "--treshold" in capsys.readouterr().err
    args, beam_argv = pipelines.parse_args(["dedup", "--input=x", "--runner", "DirectRunner", "--output=y",
                                            "--direct_num_workers=2", "--mode=near"])
    assert (args.input, args.output, args.mode) == (["x"], "y", "near")
    assert beam_argv == ["--runner", "DirectRunner", "--direct_num_workers=2"]


@pytest.mark.slow
def test_a_seqio_cache_written_by_beam_reads_back_as_the_uncached_task(tmp_path):
    import seqio
    import tensorflow as tf

    from t5lite.data import pipeline, sources, tasks
    from t5lite.errors import UserError

    texts = [_text(i, 30) for i in range(50)]
    (tmp_path / "train.txt").write_text("\n".join(texts) + "\n")
    name = "test_pipelines_cached_lm"
    tasks.add_pretraining_task(name, sources.file_source({"train": str(tmp_path / "train.txt")}, file_format="text"),
                               objective="lm", extra_preprocessors=[seqio.CacheDatasetPlaceholder()])
    cache_dir = str(tmp_path / "cache")
    assert pipelines.main(["cache", f"--task={name}", f"--output_cache_dir={cache_dir}", "--min_shards=2",
                           *TWO_THREADS]) == 0
    files = sorted(glob.glob(f"{cache_dir}/{name}/train.tfrecord-*"))
    assert len(files) == 2
    records = tf.data.TFRecordDataset(files).map(
        lambda r: tf.io.parse_single_example(r, {"text": tf.io.FixedLenFeature([], tf.string)})["text"])
    assert sorted(t.decode() for t in records.as_numpy_iterator()) == sorted(texts)

    def token_counts(cache):  # one epoch through t5lite's input pipeline: the same tokens, in another order
        batches = pipeline.get_batches(name, split="train", task_feature_lengths={"targets": 32}, batch_size=1,
                                       model_type="decoder_only", shuffle=False, seed=0, num_epochs=1, pack=False,
                                       cache_dir=cache)
        tokens = np.concatenate([b["decoder_target_tokens"].ravel() for b in batches])
        return np.bincount(tokens[tokens > 0])

    np.testing.assert_array_equal(token_counts(cache_dir), token_counts(None))
    with pytest.raises(UserError, match="no seqio.CacheDatasetPlaceholder"):
        pipeline.get_batches("tiny_shakespeare_lm", split="train", task_feature_lengths={"targets": 32}, batch_size=1,
                             model_type="decoder_only", shuffle=False, seed=0, cache_dir=cache_dir)
    with pytest.raises(UserError, match="python -m t5lite.data.pipelines cache"):
        pipeline.get_batches(name, split="train", task_feature_lengths={"targets": 32}, batch_size=1,
                             model_type="decoder_only", shuffle=False, seed=0, cache_dir=str(tmp_path / "none"))
