"""Word n-grams and a process-independent hash of them, shared by deduplication and contamination checks."""

from __future__ import annotations

import hashlib
import re

MERSENNE_31 = (1 << 31) - 1  # hash values and MinHash coefficients stay below it: a*h+b fits in uint64
_WORD = re.compile(r"\w+", re.UNICODE)


def stable_hash64(data: str) -> int:
    """A process-independent 64-bit hash (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "little")


def stable_hash31(data: str) -> int:
    """stable_hash64 reduced below MERSENNE_31, for MinHash's arithmetic. Too small for set membership
    over a corpus: among 1.9M training n-grams a random one collides with probability ~1e-3."""
    return stable_hash64(data) % MERSENNE_31


def word_ngrams(text: str, n: int) -> list[str]:
    """Lower-cased word n-grams; a text shorter than n words gives one n-gram of all its words."""
    words = _WORD.findall(text.lower())
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
