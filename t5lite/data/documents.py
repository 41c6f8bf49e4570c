"""Reading documents from text files: the input of the corpus tools (cleaning, dedup)."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Iterator

from t5lite.errors import UserError

# line: one document per non-blank line; blank_line: blocks separated by blank lines; wikitext_article:
# WikiText's articles, each from its level-1 heading line (" = Title = ") to the next one.
SEPARATORS = ("line", "blank_line", "wikitext_article")
_WIKITEXT_ARTICLE_TITLE = re.compile(r" = [^=].* = ")


def read_documents(path: str, *, separator: str = "line") -> Iterator[str]:
    """Documents of a text file (.gz too), cut as `separator` (SEPARATORS) says.

    wikitext_article documents are as embedded_corpus.wikitext2_documents reads them: non-blank lines
    joined by "\\n", without the space WikiText puts around every line.
    """
    if separator not in SEPARATORS:
        raise UserError(f"separator={separator!r}; choose one of {list(SEPARATORS)}.")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from split_documents(f, separator=separator)
    except FileNotFoundError as e:
        raise UserError(f"Input file {path!r} does not exist.") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path!r} is not UTF-8 text ({e}).") from e


def split_documents(lines: Iterable[str], *, separator: str = "line") -> Iterator[str]:
    """The documents of a text's lines (with or without their newlines), as read_documents cuts them."""
    if separator == "line":
        yield from (line.rstrip("\n") for line in lines if line.strip())
        return
    block: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        if separator == "wikitext_article":
            if block and _WIKITEXT_ARTICLE_TITLE.fullmatch(line):
                yield "\n".join(block)
                block = []
            if line.strip():
                block.append(line.strip(" "))
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)
