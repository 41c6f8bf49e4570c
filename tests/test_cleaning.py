"""Cleaning steps, their report, the seqio preprocessor and the CLI."""

import json

import tensorflow as tf

from t5lite.data import cleaning


def test_strip_markup_removes_tags_scripts_and_unescapes():
    raw = "<html><script>var x = 1;</script><p>Fish &amp; chips</p><style>p{}</style></html>"
    assert cleaning.repair_whitespace(cleaning.strip_markup(raw)) == "Fish & chips"


def test_unicode_and_whitespace_repair():
    assert cleaning.normalize_unicode("ﬁne ＡＢＣ") == "fine ABC"  # NFKC folds ligatures, full-width
    assert cleaning.repair_whitespace("a\u00a0 b  \r\nc\t\n\n\n\nd  ") == "a b\nc\n\nd"


def test_c4_line_rule():
    assert cleaning.c4_keep_line("This sentence has enough words to stay.")
    assert not cleaning.c4_keep_line("Too short.")
    assert not cleaning.c4_keep_line("This line has many words but no terminal punctuation")
    assert not cleaning.c4_keep_line("Please enable JavaScript to view this page properly.")
    assert not cleaning.c4_keep_line("By using this site you agree to our privacy policy and terms.")


def test_cleaner_reports_what_each_step_removed():
    cleaner = cleaning.TextCleaner(c4_lines=True, blocklist=["badword"], min_words=3)
    docs = [
        "<b>A proper sentence with several words.</b>\nmenu home about\nAnother fine sentence is here!",
        "Short.",
        "This document mentions a badword inside a complete sentence.",
    ]
    out = [cleaner.clean(d) for d in docs]
    assert out[0] == "A proper sentence with several words.\nAnother fine sentence is here!"
    assert out[1] is None and out[2] is None
    report = cleaner.report.as_dict()
    assert report["documents_in"] == 3 and report["documents_out"] == 1
    assert report["documents_dropped"] == {"too_short": 1, "blocklist": 1}
    assert report["lines_removed"] == {"c4_lines": 2}  # "menu home about" and "Short."
    assert report["documents_changed"]["markup"] == 1


def test_cleaning_preprocessor_in_a_tf_data_pipeline():
    cleaner = cleaning.TextCleaner(min_words=2)
    ds = tf.data.Dataset.from_tensor_slices({"text": ["<i>kept  text</i>", "x", "also kept"]})
    out = [ex["text"].decode() for ex in cleaning.cleaning_preprocessor(cleaner)(ds).as_numpy_iterator()]
    assert out == ["kept text", "also kept"]
    assert cleaner.report.documents_dropped == {"too_short": 1}


def test_cli_cleans_a_file_and_refuses_to_write_an_empty_corpus(tmp_path, capsys):
    src = tmp_path / "raw.txt"
    src.write_text("<p>Hello there, this is kept.</p>\nno\n")
    out, report = tmp_path / "clean.txt", tmp_path / "report.json"
    assert cleaning.main([f"--input={src}", f"--output={out}", f"--report={report}", "--min_words=2"]) == 0
    assert out.read_text() == "Hello there, this is kept.\n"
    assert json.loads(report.read_text())["documents_dropped"] == {"too_short": 1}
    assert cleaning.main([f"--input={src}", f"--output={tmp_path}/none.txt", "--min_words=50"]) == 2
    assert "removed every document" in capsys.readouterr().err
