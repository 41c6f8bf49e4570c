"""Text cleaning for pretraining corpora: each step reports what it removed.

    python -m t5lite.data.cleaning --input=raw.txt[.gz] --output=clean.txt --c4_lines --report=report.json

TextCleaner applies, in order: markup stripping, unicode normalisation, whitespace repair,
C4-style line heuristics (Raffel et al. 2020, section 2.2), a word blocklist and document length
filters. It counts, per step, the documents it dropped, the documents it changed and the lines
it removed. `cleaning_preprocessor` runs the same cleaner inside a seqio Task.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import html
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence

from t5lite.data.documents import read_documents
from t5lite.errors import UserError

_SCRIPT_OR_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]{0,1000}>")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_TERMINAL_PUNCTUATION = (".", "!", "?", '"', "\u201d", "'")
# C4 drops lines mentioning these (cookie banners, legal boilerplate) and lines about JavaScript.
C4_BOILERPLATE = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies")


def strip_markup(text: str) -> str:
    """Removes HTML/XML tags and script/style blocks, then unescapes entities (&amp; -> &)."""
    return html.unescape(_TAG.sub(" ", _SCRIPT_OR_STYLE.sub(" ", text)))


def normalize_unicode(text: str, form: str = "NFKC") -> str:
    return unicodedata.normalize(form, text)


def repair_whitespace(text: str) -> str:
    """Unix newlines, single spaces, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def c4_keep_line(line: str, min_words: int = 5) -> bool:
    """C4's line rule: ends in terminal punctuation, has >= min_words words, no boilerplate."""
    stripped = line.strip()
    lower = stripped.lower()
    return (
        stripped.endswith(_TERMINAL_PUNCTUATION)
        and len(stripped.split()) >= min_words
        and not any(phrase in lower for phrase in C4_BOILERPLATE)
    )


@dataclasses.dataclass
class CleaningReport:
    documents_in: int = 0
    documents_out: int = 0
    documents_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    documents_changed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lines_removed: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {"documents_in": self.documents_in, "documents_out": self.documents_out,
                "documents_dropped": dict(self.documents_dropped),
                "documents_changed": dict(self.documents_changed), "lines_removed": dict(self.lines_removed)}


class TextCleaner:
    """A configurable chain of cleaning steps with a running CleaningReport."""

    def __init__(
        self,
        *,
        markup: bool = True,
        unicode_form: str | None = "NFKC",
        whitespace: bool = True,
        c4_lines: bool = False,
        c4_min_words: int = 5,
        blocklist: Iterable[str] = (),
        min_words: int = 1,
        max_chars: int | None = None,
    ):
        if unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise UserError(f"unicode_form={unicode_form!r}; choose NFC, NFKC, NFD, NFKD or None.")
        self.steps: list[tuple[str, Callable[[str], str]]] = []
        if markup:
            self.steps.append(("markup", strip_markup))
        if unicode_form:
            self.steps.append(("unicode", lambda t: normalize_unicode(t, unicode_form)))
        if whitespace:
            self.steps.append(("whitespace", repair_whitespace))
        self.c4_lines, self.c4_min_words = c4_lines, c4_min_words
        self.blocklist = frozenset(w.lower() for w in blocklist)
        self.min_words, self.max_chars = min_words, max_chars
        self.report = CleaningReport()

    def clean(self, text: str) -> str | None:
        """The cleaned document, or None if a filter dropped it (the reason goes to the report)."""
        self.report.documents_in += 1
        for name, step in self.steps:
            cleaned = step(text)
            if cleaned != text:
                self.report.documents_changed[name] += 1
            text = cleaned
        if self.c4_lines:
            lines = text.split("\n")
            kept = [line for line in lines if c4_keep_line(line, self.c4_min_words)]
            self.report.lines_removed["c4_lines"] += len([line for line in lines if line.strip()]) - len(kept)
            text = "\n".join(kept)
        reason = self._drop_reason(text)
        if reason:
            self.report.documents_dropped[reason] += 1
            return None
        self.report.documents_out += 1
        return text

    def _drop_reason(self, text: str) -> str | None:
        words = text.split()
        if len(words) < self.min_words:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        if self.blocklist and any(re.sub(r"\W+", "", w.lower()) in self.blocklist for w in words):
            return "blocklist"
        return None


def cleaning_preprocessor(cleaner: TextCleaner, feature: str = "text"):
    """A seqio preprocessor: cleans `feature` with `cleaner` and drops documents it rejects.

    Runs in Python (tf.numpy_function), sequentially so the cleaner's report stays exact.
    """
    import tensorflow as tf  # noqa: PLC0415  (the CLI and the cleaner itself do not need TF)

    def clean_bytes(text: bytes) -> bytes:
        result = cleaner.clean(text.decode("utf-8"))
        return b"\x00" if result is None else result.encode("utf-8")  # NUL marks "dropped"

    def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
        def clean(example):
            cleaned = tf.numpy_function(clean_bytes, [example[feature]], tf.string, stateful=False)
            return {**example, feature: tf.reshape(cleaned, [])}

        return dataset.map(clean, num_parallel_calls=None).filter(lambda ex: tf.not_equal(ex[feature], "\x00"))

    return preprocess


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--report")
    parser.add_argument("--separator", default="line", choices=["line", "blank_line"])
    parser.add_argument("--no_markup", action="store_true")
    parser.add_argument("--unicode_form", default="NFKC")
    parser.add_argument("--c4_lines", action="store_true")
    parser.add_argument("--c4_min_words", type=int, default=5)
    parser.add_argument("--blocklist", help="file with one blocked word per line")
    parser.add_argument("--min_words", type=int, default=1)
    parser.add_argument("--max_chars", type=int)
    args = parser.parse_args(argv)
    try:
        blocklist = ()
        if args.blocklist:
            with open(args.blocklist, encoding="utf-8") as f:
                blocklist = [line.strip() for line in f if line.strip()]
        cleaner = TextCleaner(markup=not args.no_markup, unicode_form=args.unicode_form or None,
                              c4_lines=args.c4_lines, c4_min_words=args.c4_min_words, blocklist=blocklist,
                              min_words=args.min_words, max_chars=args.max_chars)
        kept = [c for path in args.input for d in read_documents(path, separator=args.separator)
                if (c := cleaner.clean(d)) is not None]
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not kept:
        print(f"error: cleaning removed every document: {cleaner.report.as_dict()}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(("\n\n" if args.separator == "blank_line" else "\n").join(kept) + "\n")
    report = json.dumps({"inputs": args.input, "output": args.output, **cleaner.report.as_dict()}, indent=2)
    print(report)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
