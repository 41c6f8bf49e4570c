"""Cleaning steps and filters (PII, language, blocklist, emoji), their report, the seqio preprocessors and the CLI."""

import functools
import json
import os
import subprocess
import sys

import pytest
import seqio
import tensorflow as tf

from t5lite.data import cleaning, documents, embedded_corpus, language_id, pii, toxicity
from t5lite.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# --- PII scrubbing -------------------------------------------------------------------------------------------

PII_FOUND = [  # (text, scrubbed)
    ("Mail jo.smith+news@example.co.uk today.", "Mail <EMAIL> today."),
    ("Write to support@zinc.com.", "Write to <EMAIL>."),
    ("call +44 20 7946 0958 now", "call <PHONE> now"),
    ("E.164: +14155552671", "E.164: <PHONE>"),
    ("+44 (0)20 7946 0958, +49 30 12345678", "<PHONE>, <PHONE>"),
    ("Call (415) 555-2671 or 1-888-595-5485 or 415.555.2671.", "Call <PHONE> or <PHONE> or <PHONE>."),
    ("London 020 7946 0958, Paris 01 23 45 67 89", "London <PHONE>, Paris <PHONE>"),
    ("server 192.168.1.10. and 10.0.0.1", "server <IP>. and <IP>"),
    ("v6 2001:db8::1, ::1, fe80::1ff:fe23:4567:890a, ::ffff:192.0.2.128",
     "v6 <IP>, <IP>, <IP>, <IP>"),
    ("cards 4111 1111 1111 1111, 4111-1111-1111-1111, 5500000000000004", "cards <CARD>, <CARD>, <CARD>"),
    ("Amex 3782 822463 10005", "Amex <CARD>"),
]
PII_NOT_FOUND = [
    "On 2024-01-15 or 15/01/2024 or 15.01.2024 at 12:30:45 (10:30, John 3:16).",
    "version 1.2.3.4, v1.2.3.4, section 1.2.3.4, 1.2.3.4.5, 1.2.3, 256.1.1.1, 192.168.01.1",
    "It costs $1,234.56 or 1,234,567,890 in 1999, up 45.5% from 3.14159.",
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2, pages 100-200, 1990-2000, score 3-2.",
    "Order 1234567890123456, card-like 4111 1111 1111 1112, years 2019 2020 2021 2022.",
    "std::vector and Cafe::Add, MAC 00:1A:2B:3C:4D:5E, @username, x@y, +5, +1.5%.",
    "Local 555-1234 and a bare 4155552671 (no separators) stay.",
]


def test_pii_scrubber_replaces_each_kind():
    for text, scrubbed in PII_FOUND:
        assert pii.scrub_pii(text)[0] == scrubbed, text
    assert pii.scrub_pii("jo@example.com, 10.0.0.1, 4111111111111111, +1 415 555 2671 and bob@example.org")[1] == \
        {"email": 2, "ip": 1, "card": 1, "phone": 1}


def test_pii_scrubber_leaves_dates_prices_versions_and_digit_runs_alone():
    for text in PII_NOT_FOUND:
        assert pii.scrub_pii(text) == (text, {}), text


def test_pii_kinds_placeholders_and_luhn():
    text = "jo@example.com 10.0.0.1"
    assert pii.scrub_pii(text, kinds=["ip"]) == ("jo@example.com <IP>", {"ip": 1})
    assert pii.scrub_pii(text, placeholders={"email": "[email]"})[0] == "[email] <IP>"
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    with pytest.raises(UserError, match="ssn"):
        pii.scrub_pii(text, kinds=["ssn"])
    with pytest.raises(UserError, match="ssn"):
        cleaning.TextCleaner(scrub_pii=True, pii_placeholders={"ssn": "x"})


# --- language, blocklist, emoji ------------------------------------------------------------------------------

def test_language_filter_keeps_the_chosen_languages_and_counts_every_one():
    cleaner = cleaning.TextCleaner(keep_languages=["en", "de"], min_language_confidence=0.5)
    docs = ["This is an ordinary English sentence about the weather today.",
            "Das ist ein ganz gewöhnlicher deutscher Satz über das Wetter.",
            "Ceci est une phrase française tout à fait ordinaire sur la météo.",
            "= Played , W = Wins , L"]  # a WikiText table legend: no language to speak of
    out = [cleaner.clean(d) for d in docs]
    assert out[:2] == docs[:2] and out[2:] == [None, None]
    assert cleaner.report.languages == {"en": 1, "de": 1, "fr": 1, "und": 1}
    assert cleaner.report.documents_dropped == {"language": 2}
    assert language_id.identify_language(docs[3], min_confidence=0.0)[0] != "und"
    with pytest.raises(UserError, match="english"):
        cleaning.TextCleaner(keep_languages=["english"])


def test_blocklist_scores_words_and_phrases_against_a_threshold():
    words = toxicity.load_wordlist("ldnoobw_en")
    assert len(words) == 377 and "2 girls 1 cup" in words  # C4's list (wordlists/README.md)
    scorer = toxicity.BlocklistScorer(words)
    assert scorer.score("A class assignment on Sussex and Scunthorpe.").matches == 0  # whole words only
    score = scorer.score("He shouted 'ASS!' then mentioned 2 girls 1 cup.")
    assert score.terms == {"ass": 1, "2 girls 1 cup": 1} and score.words == 9
    # Dropped at 2 or more matches AND at least 1 match per 10 words.
    cleaner = cleaning.TextCleaner(blocklist=["darn", "heck"], blocklist_min_count=2, blocklist_min_fraction=0.1)
    one = "Well darn it, the train was late again today."  # 1 match in 9 words: kept (count)
    two = "Darn, heck, the train was late again today."  # 2 in 8: dropped
    long = "Darn, heck, the train was late again today." + " Nobody on the platform ever said why." * 5  # 2 in 38
    plain = "Nothing to see in this sentence at all."
    assert [cleaner.clean(d) for d in (one, two, long, plain)] == [one, None, long, plain]
    scores = cleaner.report.as_dict()["blocklist_scores"]
    assert scores["matches_per_document"] == {"0": 1, "1": 1, "2-4": 2, "5-9": 0, "10+": 0}
    assert scores["matches_per_word"] == {"0": 1, "(0, 0.001)": 0, "[0.001, 0.01)": 0, "[0.01, 0.1)": 1, ">= 0.1": 2}
    assert scores["top_terms"] == {"darn": 3, "heck": 2}
    with pytest.raises(UserError, match="no_such_list"):
        toxicity.load_wordlist("no_such_list")


def test_emoji_to_text_names_emoji_and_leaves_text_symbols():
    assert cleaning.emoji_to_text("Nice 👍🏽 and 🇫🇷!") == "Nice :thumbs_up_medium_skin_tone: and :France:!"
    assert cleaning.emoji_to_text("I ❤️ it", delimiters=("<", ">")) == "I <red_heart> it"
    assert cleaning.emoji_to_text("© 2024 ACME™, ♥ and café") == "© 2024 ACME™, ♥ and café"


def test_cleaner_runs_every_filter_and_reports_each():
    cleaner = cleaning.TextCleaner(blocklist=toxicity.load_wordlist("ldnoobw_en"), keep_languages=["en"],
                                   emoji_to_text=True, scrub_pii=True)
    docs = ["Please write to jo@example.com or call +44 20 7946 0958 👍 today.",
            "Ceci est une phrase française tout à fait ordinaire sur la météo.",
            "This long sentence is about sex education in the schools of the county.",
            "A completely ordinary English sentence about a cat."]
    out = [cleaner.clean(d) for d in docs]
    assert out == ["Please write to <EMAIL> or call <PHONE> :thumbs_up: today.", None, None, docs[3]]
    report = cleaner.report.as_dict()
    assert report["documents_dropped"] == {"language": 1, "blocklist": 1}
    assert report["documents_changed"] == {"emoji": 1, "pii": 1}
    assert report["pii_replaced"] == {"email": 1, "ip": 0, "card": 0, "phone": 1}
    assert report["languages"] == {"en": 3, "fr": 1}


def test_filter_preprocessors_in_a_seqio_task():
    from t5lite.data import preprocessors, tasks  # noqa: PLC0415  (registers the embedded tasks: 2 s)

    texts = ["Mail jo@example.com about the 👍 party at the office tomorrow.",
             "Ceci est une phrase française tout à fait ordinaire sur la météo.",
             "An English sentence with a darn word that the blocklist drops.",
             "A plain English sentence about the weather, kept as it is."]
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices({"text": texts}), splits=["train"])
    name = "t5lite_test_cleaning_filters"
    vocabulary = seqio.ByteVocabulary(extra_ids=0)
    tasks.add_pretraining_task(name, source, objective="lm", vocabulary=vocabulary, extra_preprocessors=[
        preprocessors.filter_languages,  # keep_languages=("en",)
        functools.partial(preprocessors.filter_blocklist, wordlist=["darn"]),
        preprocessors.scrub_pii, preprocessors.emoji_to_text])
    try:
        chunk = next(seqio.get_mixture_or_task(name).get_dataset(
            {"targets": 1024}, split="train", shuffle=False).as_numpy_iterator())["targets"].tolist()
    finally:
        seqio.TaskRegistry.remove(name)
    eos = vocabulary.eos_id
    documents, start = [], 0
    for i, token in enumerate(chunk):
        if token == eos:
            documents.append(vocabulary.decode(chunk[start:i]))
            start = i + 1
    assert documents == ["Mail <EMAIL> about the :thumbs_up: party at the office tomorrow.", texts[3]]


# --- the CLI and the documents it reads ----------------------------------------------------------------------

def test_cli_runs_every_filter(tmp_path, capsys):
    src = tmp_path / "raw.txt"
    src.write_text("Call me at 415-555-2671 for the details of the meeting 👍.\n"
                   "Ceci est une phrase française tout à fait ordinaire sur la météo.\n"
                   "This long sentence is about sex education in the schools of the county.\n")
    out, report = tmp_path / "clean.txt", tmp_path / "report.json"
    assert cleaning.main([f"--input={src}", f"--output={out}", f"--report={report}", "--blocklist=ldnoobw_en",
                          "--keep_languages=en", "--emoji_to_text", "--emoji_delimiters", "[", "]", "--scrub_pii",
                          "--pii_kinds=phone", "--pii_placeholder=phone=[phone]"]) == 0
    assert out.read_text() == "Call me at [phone] for the details of the meeting [thumbs_up].\n"
    got = json.loads(report.read_text())
    assert got["documents_dropped"] == {"language": 1, "blocklist": 1} and got["pii_replaced"] == {"phone": 1}
    assert cleaning.main([f"--input={src}", f"--output={out}", "--keep_languages=english"]) == 2
    assert cleaning.main([f"--input={src}", f"--output={out}", "--pii_placeholder=phone"]) == 2
    assert "english" in capsys.readouterr().err


def test_wikitext_articles_are_read_as_the_embedded_corpus_reads_them():
    path = os.path.join(embedded_corpus.corpus_dir(), "wikitext-2", "valid.txt")
    articles = tuple(documents.read_documents(path, separator="wikitext_article"))
    assert articles == embedded_corpus.wikitext2_documents("validation") and len(articles) == 60


@pytest.mark.full_data
def test_pii_bench_on_enterprise_pii(data_dir):
    """bench/pii_filter.py runs on the full EnterprisePII set and gives rates in [0, 1]; the scrubber
    touches few passages (its patterns are contact details, the labels mostly names and revenue)."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "pii_filter.py"), f"--data_dir={data_dir}"],
                          capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(done.stdout)
    assert result["passages"] == result["gold_0"] + result["gold_1"] == 3395
    assert result["touched"] == result["touched_gold_0"] + result["touched_gold_1"] > 0
    assert all(0.0 <= result[k] <= 1.0 for k in ("precision", "recall", "touch_rate_0"))
    assert result["touch_rate_0"] < 0.05 and result["recall"] < 0.5
