"""Word-list toxicity scoring: how many listed words and phrases a document holds, per word.

    scorer = BlocklistScorer(load_wordlist("ldnoobw_en"))
    scorer.score("A plain sentence.")  -> BlocklistScore(matches=0, words=3, terms=Counter())

The shipped lists live in wordlists/ (README.md there: provenance and license); "ldnoobw_en" is the
English list C4 used. An entry matches case-insensitively as whole words (not inside a longer word:
"ass" does not match "class"); a phrase matches with single spaces between its words, as C4 matched.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable

from t5lite.errors import UserError

WORDLIST_DIR = os.path.join(os.path.dirname(__file__), "wordlists")
SHIPPED_WORDLISTS = ("ldnoobw_en",)


def load_wordlist(name_or_path: str) -> tuple[str, ...]:
    """The entries of a shipped list (SHIPPED_WORDLISTS) or of a file with one entry a line."""
    path = os.path.join(WORDLIST_DIR, f"{name_or_path}.txt") if name_or_path in SHIPPED_WORDLISTS else name_or_path
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(line.strip() for line in f if line.strip())
    except FileNotFoundError as e:
        raise UserError(f"Word list {name_or_path!r} is neither a file nor a shipped list "
                        f"{list(SHIPPED_WORDLISTS)}.") from e


@dataclasses.dataclass(frozen=True)
class BlocklistScore:
    matches: int  # listed words / phrases found (each occurrence counts)
    words: int  # whitespace-separated words of the document
    terms: collections.Counter  # {entry: occurrences}

    @property
    def fraction(self) -> float:
        return self.matches / max(self.words, 1)


class BlocklistScorer:
    """Counts the entries of a word list in a text; one compiled regex over all entries."""

    def __init__(self, entries: Iterable[str]):
        entries = sorted({e.strip().lower() for e in entries if e.strip()}, key=len, reverse=True)  # longest first
        self.entries = tuple(entries)
        alternatives = "|".join(re.escape(e) for e in entries)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if entries else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def score(self, text: str) -> BlocklistScore:
        terms = collections.Counter(self._pattern.findall(text.lower())) if self._pattern else collections.Counter()
        return BlocklistScore(sum(terms.values()), len(text.split()), terms)
