"""Text cleaning for pretraining corpora: each step reports what it removed.

    python -m t5lite.data.cleaning --input=raw.txt[.gz] --output=clean.txt --c4_lines --report=report.json

TextCleaner applies, in order: markup stripping, unicode normalisation, whitespace repair,
C4-style line heuristics (Raffel et al. 2020, section 2.2), document filters (length, language
(language_id.py), a word blocklist scored against a threshold (toxicity.py)), then, on the documents
kept, emoji to text and PII scrubbing (pii.py). It counts, per step, the documents it dropped, the
documents it changed and the lines it removed, and per filter what it saw: PII replaced per kind,
languages identified, blocklist scores. `cleaning_preprocessor` runs the same cleaner inside a seqio
Task; preprocessors.py has one seqio preprocessor per filter.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import html
import json
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence

from t5lite.data import language_id, pii, toxicity
from t5lite.data.documents import SEPARATORS, read_documents
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


@functools.cache
def _emoji_start() -> re.Pattern:
    """Matches a character that can start an emoji: most text has none, and the emoji package's
    tokenizer is slow (about 1 s per MB), so it runs only on text that may hold one. Exact for the
    Basic Multilingual Plane (a class of ranges there compiles to a bitmap); the astral emoji all lie
    in U+1F000-1FAFF."""
    import emoji  # noqa: PLC0415  (only when used)

    ranges: list[list[int]] = []
    for code in sorted({ord(e[0]) for e in emoji.EMOJI_DATA if not e[0].isascii()} | {0x20E3}):  # 20E3: "1️⃣"
        if code >= 0x10000:
            break
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    bmp = "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)
    return re.compile(f"[{bmp}\U0001F000-\U0001FAFF]")


def emoji_to_text(text: str, delimiters: tuple[str, str] = (":", ":")) -> str:
    """Each emoji as its CLDR short name between the delimiters: "👍" -> ":thumbs_up:" (emoji package).

    Symbols that are emoji only with the emoji variation selector U+FE0F (©, ®, ™, ♥, ☺, ↔ alone) are
    text and stay as they are ("© 2024" is not ":copyright: 2024").
    """
    if not _emoji_start().search(text):
        return text
    import emoji  # noqa: PLC0415

    def name(chars: str, data: dict) -> str:
        if data["status"] == emoji.STATUS["unqualified"]:
            return chars
        return delimiters[0] + data["en"][1:-1] + delimiters[1]

    return emoji.replace_emoji(text, replace=name)


def c4_keep_line(line: str, min_words: int = 5) -> bool:
    """C4's line rule: ends in terminal punctuation, has >= min_words words, no boilerplate."""
    stripped = line.strip()
    lower = stripped.lower()
    return (
        stripped.endswith(_TERMINAL_PUNCTUATION)
        and len(stripped.split()) >= min_words
        and not any(phrase in lower for phrase in C4_BOILERPLATE)
    )


# Buckets of the blocklist score distribution: matches per document, and matches per word.
_MATCH_BUCKETS = ((0, "0"), (1, "1"), (2, "2-4"), (5, "5-9"), (10, "10+"))
_FRACTION_BUCKETS = ((0.0, "0"), (1e-9, "(0, 0.001)"), (0.001, "[0.001, 0.01)"), (0.01, "[0.01, 0.1)"), (0.1, ">= 0.1"))


def _bucket(value: float, buckets: tuple[tuple[float, str], ...]) -> str:
    return [label for low, label in buckets if value >= low][-1]


def _most_common(counts: collections.Counter) -> list[tuple[str, int]]:
    """Most common first, ties by key: the same report whatever order the counts were merged in (Beam)."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


@dataclasses.dataclass
class CleaningReport:
    documents_in: int = 0
    documents_out: int = 0
    documents_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    documents_changed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    lines_removed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    pii_replaced: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {kind: matches}
    languages: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {code: documents}
    blocklist_matches: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {bucket: docs}
    blocklist_fraction: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {bucket: docs}
    blocklist_terms: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {entry: matches}

    def as_dict(self) -> dict:
        out = {"documents_in": self.documents_in, "documents_out": self.documents_out,
               "documents_dropped": dict(self.documents_dropped),
               "documents_changed": dict(self.documents_changed), "lines_removed": dict(self.lines_removed)}
        if self.pii_replaced:
            out["pii_replaced"] = dict(self.pii_replaced)
        if self.languages:
            out["languages"] = dict(_most_common(self.languages))
        if self.blocklist_matches:
            out["blocklist_scores"] = {
                "matches_per_document": {label: self.blocklist_matches[label] for _, label in _MATCH_BUCKETS},
                "matches_per_word": {label: self.blocklist_fraction[label] for _, label in _FRACTION_BUCKETS},
                "top_terms": dict(_most_common(self.blocklist_terms)[:20])}
        return out


class TextCleaner:
    """A configurable chain of cleaning steps with a running CleaningReport.

    Steps that change text: markup, unicode_form, whitespace; c4_lines (drops lines).
    Filters that drop documents, as reported under documents_dropped:
      too_short / too_long  fewer than min_words words / more than max_chars characters.
      language    keep_languages: codes of the languages to keep (e.g. ("en",); None: no language
                  filter); a document is identified as its best language when that language's
                  confidence is at least min_language_confidence, else as "und" (undetermined).
      blocklist   blocklist: words and phrases (toxicity.load_wordlist("ldnoobw_en") is C4's list); a
                  document is dropped when it holds at least blocklist_min_count matches AND at least
                  blocklist_min_fraction matches per word (1 and 0.0: any match drops it, C4's rule).
    Steps on the documents kept, after the filters:
      emoji_to_text  each emoji as its name between emoji_delimiters ("👍" -> ":thumbs_up:").
      scrub_pii      pii_kinds (email, ip, card, phone) replaced by pii_placeholders (pii.py).
    """

    def __init__(
        self,
        *,
        markup: bool = True,
        unicode_form: str | None = "NFKC",
        whitespace: bool = True,
        c4_lines: bool = False,
        c4_min_words: int = 5,
        blocklist: Iterable[str] = (),
        blocklist_min_count: int = 1,
        blocklist_min_fraction: float = 0.0,
        keep_languages: Sequence[str] | None = None,
        min_language_confidence: float = 0.5,
        emoji_to_text: bool = False,
        emoji_delimiters: tuple[str, str] = (":", ":"),
        scrub_pii: bool = False,
        pii_kinds: Sequence[str] = pii.PII_KINDS,
        pii_placeholders: Mapping[str, str] | None = None,
        min_words: int = 1,
        max_chars: int | None = None,
    ):
        if unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
            raise UserError(f"unicode_form={unicode_form!r}; choose NFC, NFKC, NFD, NFKD or None.")
        if blocklist_min_count < 1 or not 0.0 <= blocklist_min_fraction <= 1.0:
            raise UserError(f"blocklist_min_count={blocklist_min_count} must be >= 1 and blocklist_min_fraction="
                            f"{blocklist_min_fraction} in [0, 1].")
        if not 0.0 <= min_language_confidence <= 1.0:
            raise UserError(f"min_language_confidence={min_language_confidence} must be in [0, 1].")
        if len(emoji_delimiters) != 2:
            raise UserError(f"emoji_delimiters={emoji_delimiters!r}; give (opening, closing), e.g. (':', ':').")
        self.steps: list[tuple[str, Callable[[str], str]]] = []
        if markup:
            self.steps.append(("markup", strip_markup))
        if unicode_form:
            self.steps.append(("unicode", lambda t: normalize_unicode(t, unicode_form)))
        if whitespace:
            self.steps.append(("whitespace", repair_whitespace))
        self.c4_lines, self.c4_min_words = c4_lines, c4_min_words
        self.blocklist = toxicity.BlocklistScorer(blocklist)
        self.blocklist_min_count, self.blocklist_min_fraction = blocklist_min_count, blocklist_min_fraction
        self.keep_languages = None if keep_languages is None else tuple(keep_languages)
        if self.keep_languages is not None:
            language_id.check_languages(self.keep_languages)
        self.min_language_confidence = min_language_confidence
        self.emoji_delimiters = tuple(emoji_delimiters) if emoji_to_text else None
        self.pii_kinds = pii.check_pii_kinds(pii_kinds) if scrub_pii else ()
        self.pii_placeholders = dict(pii_placeholders or {})
        unknown = sorted(set(self.pii_placeholders) - set(pii.PII_KINDS))
        if unknown:
            raise UserError(f"pii_placeholders for unknown kinds {unknown}; the kinds are {list(pii.PII_KINDS)}.")
        self.min_words, self.max_chars = min_words, max_chars
        self.report = CleaningReport()
        self.report.pii_replaced.update(dict.fromkeys(self.pii_kinds, 0))  # a kind never found reports 0

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
        if self.emoji_delimiters:
            text = self._changed("emoji", text, emoji_to_text(text, self.emoji_delimiters))
        if self.pii_kinds:
            scrubbed, counts = pii.scrub_pii(text, kinds=self.pii_kinds, placeholders=self.pii_placeholders)
            self.report.pii_replaced.update(counts)
            text = self._changed("pii", text, scrubbed)
        self.report.documents_out += 1
        return text

    def _changed(self, step: str, before: str, after: str) -> str:
        if after != before:
            self.report.documents_changed[step] += 1
        return after

    def _drop_reason(self, text: str) -> str | None:
        words = len(text.split())
        if words < self.min_words:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        if self.keep_languages is not None:
            language, _ = language_id.identify_language(text, self.min_language_confidence)
            self.report.languages[language] += 1
            if language not in self.keep_languages:
                return "language"
        if self.blocklist:
            score = self.blocklist.score(text)
            self.report.blocklist_matches[_bucket(score.matches, _MATCH_BUCKETS)] += 1
            self.report.blocklist_fraction[_bucket(score.fraction, _FRACTION_BUCKETS)] += 1
            self.report.blocklist_terms.update(score.terms)
            if score.matches >= self.blocklist_min_count and score.fraction >= self.blocklist_min_fraction:
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


def add_cleaner_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of TextCleaner's options and of how documents are read (shared with t5lite.data.pipelines)."""
    parser.add_argument("--separator", default="line", choices=SEPARATORS,
                        help="documents are lines, blank-line separated blocks or WikiText articles; the output "
                        "separates them by a newline (line) or a blank line (the others)")
    parser.add_argument("--no_markup", action="store_true")
    parser.add_argument("--unicode_form", default="NFKC")
    parser.add_argument("--c4_lines", action="store_true")
    parser.add_argument("--c4_min_words", type=int, default=5)
    parser.add_argument("--blocklist", help=f"word list: one of {list(toxicity.SHIPPED_WORDLISTS)} (shipped) or a "
                        "file with one word or phrase per line")
    parser.add_argument("--blocklist_min_count", type=int, default=1, help="drop at this many matches (default 1)")
    parser.add_argument("--blocklist_min_fraction", type=float, default=0.0,
                        help="... and at least this many matches per word (default 0)")
    parser.add_argument("--keep_languages", help="comma-separated language codes to keep, e.g. en or en,de")
    parser.add_argument("--min_language_confidence", type=float, default=0.5)
    parser.add_argument("--emoji_to_text", action="store_true", help='"👍" -> ":thumbs_up:"')
    parser.add_argument("--emoji_delimiters", nargs=2, default=[":", ":"], metavar=("OPEN", "CLOSE"))
    parser.add_argument("--scrub_pii", action="store_true", help="replace emails, IPs, card and phone numbers")
    parser.add_argument("--pii_kinds", default=",".join(pii.PII_KINDS), help="comma-separated subset")
    parser.add_argument("--pii_placeholder", action="append", default=[], metavar="KIND=TEXT",
                        help="e.g. email=[email]; default " + " ".join(f"{k}={v}" for k, v in
                                                                       pii.DEFAULT_PLACEHOLDERS.items()))
    parser.add_argument("--min_words", type=int, default=1)
    parser.add_argument("--max_chars", type=int)


def cleaner_options(args: argparse.Namespace) -> dict:
    """TextCleaner's keyword arguments from the flags of add_cleaner_arguments (UserError if malformed)."""
    placeholders = dict(p.split("=", 1) for p in args.pii_placeholder if "=" in p)
    if len(placeholders) != len(args.pii_placeholder):
        raise UserError(f"--pii_placeholder takes KIND=TEXT, got {args.pii_placeholder}.")
    return dict(
        markup=not args.no_markup, unicode_form=args.unicode_form or None, c4_lines=args.c4_lines,
        c4_min_words=args.c4_min_words,
        blocklist=toxicity.load_wordlist(args.blocklist) if args.blocklist else (),
        blocklist_min_count=args.blocklist_min_count, blocklist_min_fraction=args.blocklist_min_fraction,
        keep_languages=args.keep_languages.split(",") if args.keep_languages else None,
        min_language_confidence=args.min_language_confidence, emoji_to_text=args.emoji_to_text,
        emoji_delimiters=tuple(args.emoji_delimiters), scrub_pii=args.scrub_pii,
        pii_kinds=[k for k in args.pii_kinds.split(",") if k], pii_placeholders=placeholders,
        min_words=args.min_words, max_chars=args.max_chars)


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", default=[], required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--report")
    add_cleaner_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cleaner = TextCleaner(**cleaner_options(args))
        kept = [c for path in args.input for d in read_documents(path, separator=args.separator)
                if (c := cleaner.clean(d)) is not None]
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not kept:
        print(f"error: cleaning removed every document: {cleaner.report.as_dict()}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(("\n" if args.separator == "line" else "\n\n").join(kept) + "\n")
    report = json.dumps({"inputs": args.input, "output": args.output, **cleaner.report.as_dict()}, indent=2)
    print(report)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
