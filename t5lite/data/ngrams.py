"""Word n-grams and a process-independent hash of them, shared by deduplication and contamination checks."""

from __future__ import annotations

import hashlib
import re

MERSENNE_31 = (1 << 31) - 1  # hash values and MinHash coefficients stay below it: a*h+b fits in uint64
_WORD = re.compile(r"\w+", re.UNICODE)


def stable_hash31(data: str) -> int:
    """A process-independent 31-bit hash (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "little") % MERSENNE_31


def word_ngrams(text: str, n: int) -> list[str]:
    """Lower-cased word n-grams; a text shorter than n words gives one n-gram of all its words."""
    words = _WORD.findall(text.lower())
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
