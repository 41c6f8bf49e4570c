"""Deduplication and contamination: exact, near-duplicate (MinHash LSH), n-gram overlap, CLI."""

import json

import numpy as np
import pytest

from t5lite.data import contamination, dedup, documents
from t5lite.data.ngrams import MERSENNE_31, stable_hash31, word_ngrams

WORDS = ("the quick brown fox jumps over the lazy dog while seven bright stars rise above a quiet "
         "harbour where old sailors mend their nets and sing of distant islands lost beneath the waves").split()


def _text(seed: int, n: int = 120) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


def test_exact_duplicates_ignore_case_and_whitespace_and_keep_the_first():
    docs = ["Hello  World.", "something else", "hello world.", "HELLO\tWORLD."]
    np.testing.assert_array_equal(dedup.exact_duplicate_mask(docs), [False, False, True, True])


def test_minhash_estimates_jaccard_similarity():
    a_words = [f"w{i}" for i in range(300)]
    b_words = [f"w{i}" for i in range(60, 360)]  # 1-word shingles: Jaccard 240 / 360 = 2/3
    hasher = dedup.MinHasher(num_permutations=256, shingle_words=1)
    estimate = np.mean(hasher.signature(" ".join(a_words)) == hasher.signature(" ".join(b_words)))
    assert abs(estimate - 2 / 3) < 0.08


def test_near_duplicates_are_found_and_distinct_texts_are_kept():
    base = _text(0)
    words = base.split()
    words[50] = "CHANGED"  # one word of 120: 5-word shingle Jaccard ~ 0.92
    docs = [base, _text(1), " ".join(words), _text(2)]
    np.testing.assert_array_equal(dedup.near_duplicate_mask(docs, threshold=0.8), [False, False, True, False])


def test_minhash_signature_is_the_min_over_shingles_of_the_permuted_stable_hash():
    hasher = dedup.MinHasher(num_permutations=16)
    text = _text(5, 40)
    hashes = np.array([stable_hash31(s) for s in set(word_ngrams(text, 5))], np.uint64)
    expected = ((hashes[:, None] * hasher._a + hasher._b) % MERSENNE_31).min(axis=0)
    np.testing.assert_array_equal(hasher.signature(text), expected)
    assert not dedup.has_words(hasher.signature("!!! ???"))


def test_a_chain_of_near_duplicates_keeps_only_its_first_document():
    a = _text(6, 200)
    words = a.split()
    b = " ".join(words[:100] + [f"x{i}" for i in range(10)] + words[110:])  # Jaccard ~0.87 to a
    c = " ".join(b.split()[:20] + [f"y{i}" for i in range(10)] + b.split()[30:])  # ~0.87 to b, ~0.75 to a
    hasher = dedup.MinHasher()
    assert not dedup.is_near_duplicate(hasher.signature(a), hasher.signature(c), 0.8)
    np.testing.assert_array_equal(dedup.near_duplicate_mask([c, _text(7), a, b]), [False, False, True, True])


def test_deduplicate_report_counts_what_it_removed():
    base = _text(3)
    docs = [base, base.upper(), _text(4), base.replace("fox", "cat", 1)]
    kept, report = dedup.deduplicate(docs, mode="near", threshold=0.8)
    assert kept == [base, _text(4)]
    assert report["exact_duplicates"] == 1 and report["near_duplicates"] == 1
    assert report["documents"] == 4 and report["kept"] == 2 and report["percent_removed"] == 50.0


def test_contamination_counts_examples_and_ngrams():
    train = [_text(10, 200)]
    train_ngrams = contamination.training_ngram_set(train, n=13)
    copied = " ".join(train[0].split()[20:60])  # 40 words copied: all 28 of its 13-grams overlap
    unrelated = " ".join(f"x{i}" for i in range(40))
    report = contamination.contamination("eval", [copied, unrelated], train_ngrams, n=13)
    assert (report.examples, report.contaminated_examples) == (2, 1)
    assert (report.ngrams, report.overlapping_ngrams) == (56, 28)
    assert report.percent_examples == 50.0 and report.percent_ngrams == 50.0


def test_shipped_tiny_shakespeare_validation_is_mostly_not_in_train():
    from t5lite.data import pipeline

    train_ngrams = contamination.training_ngram_set(pipeline.raw_texts("tiny_shakespeare_lm", "train"))
    report = contamination.contamination("val", pipeline.raw_texts("tiny_shakespeare_lm", "validation"), train_ngrams)
    assert report.examples > 100
    assert report.percent_ngrams < 5.0  # distinct plays; a few repeated stock lines at most


def test_cli_writes_deduplicated_corpus_and_report(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("a first line here\nA  first line HERE\nsomething different\n")
    out, report = tmp_path / "out.txt", tmp_path / "report.json"
    assert dedup.main([f"--input={src}", f"--output={out}", f"--report={report}"]) == 0
    assert out.read_text() == "a first line here\nsomething different\n"
    assert json.loads(report.read_text())["exact_duplicates"] == 1


def test_cli_names_a_missing_input_file(tmp_path, capsys):
    assert dedup.main([f"--input={tmp_path}/nope.txt", f"--output={tmp_path}/out.txt"]) == 2
    assert "nope.txt" in capsys.readouterr().err


@pytest.mark.parametrize("separator", ["line", "blank_line"])
def test_read_documents_handles_gzip_and_blocks(tmp_path, separator):
    import gzip

    path = tmp_path / "docs.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("one\ntwo\n\nthree\n")
    docs = list(documents.read_documents(str(path), separator=separator))
    assert docs == (["one", "two", "three"] if separator == "line" else ["one\ntwo", "three"])


def test_contamination_has_no_hash_collisions_at_corpus_scale():
    # 200k training 13-grams against 80k eval 13-grams with no word in common: with the 31-bit MinHash
    # hash about 7 eval n-grams would collide and flag their rows; 64-bit hashes give none.
    train = [" ".join(f"t{i}" for i in range(200_012))]
    eval_rows = [" ".join(f"e{r}_{i}" for i in range(52)) for r in range(2000)]
    report = contamination.contamination("eval", eval_rows, contamination.training_ngram_set(train, n=13), n=13)
    assert (report.examples, report.ngrams) == (2000, 80_000)
    assert report.contaminated_examples == 0 and report.overlapping_ngrams == 0
