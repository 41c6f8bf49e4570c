"""The small text corpus shipped in the repo: tiny Shakespeare and WikiText-2.

Each function returns the documents of one split as a tuple of strings; the
seqio tasks (tasks.py) and the vocabulary trainer (vocab.py) both read them
from here. Formats, licenses and checksums: corpus/README.md.
"""

import functools
import gzip
import os
import re

from t5lite.errors import UserError

CORPUS_DIR_ENV = "T5LITE_CORPUS_DIR"
TINY_SHAKESPEARE_SPLITS = ("train", "validation")
WIKITEXT2_SPLITS = ("train", "validation", "test")
# nanoGPT convention: the first 90% of the characters are train, the rest validation.
TINY_SHAKESPEARE_TRAIN_FRACTION = 0.9

_WIKITEXT2_FILES = {"train": "train.txt.gz", "validation": "valid.txt", "test": "test.txt"}
# An article starts at a level-1 heading line such as " = Valkyria Chronicles III = ".
_WIKITEXT2_ARTICLE_TITLE = re.compile(r" = [^=].* = ")


def corpus_dir() -> str:
    """Returns $T5LITE_CORPUS_DIR if set, else the corpus directory inside the package."""
    return os.environ.get(CORPUS_DIR_ENV) or os.path.join(os.path.dirname(__file__), "corpus")


def tiny_shakespeare_documents(split: str) -> tuple[str, ...]:
    """Speeches (blank-line separated blocks) of the train or validation characters.

    The character range is split first, so the speech that straddles the 90% mark
    ends train and starts validation, and the two splits share no text.
    """
    _check_split("tiny Shakespeare", split, TINY_SHAKESPEARE_SPLITS)
    train_text, validation_text = tiny_shakespeare_split_texts()
    text = train_text if split == "train" else validation_text
    return tuple(block.strip("\n") for block in text.split("\n\n") if block.strip())


def tiny_shakespeare_split_texts() -> tuple[str, str]:
    """(train, validation) character ranges of input.txt, 90% / 10%."""
    text = _read_text(os.path.join(corpus_dir(), "tinyshakespeare", "input.txt"))
    train_chars = int(len(text) * TINY_SHAKESPEARE_TRAIN_FRACTION)
    return text[:train_chars], text[train_chars:]


def wikitext2_documents(split: str) -> tuple[str, ...]:
    """Articles of a WikiText-2 split, one string each, non-blank lines joined by "\\n".

    The text is kept as distributed (`<unk>`, ` @-@ ` escapes, ` = Heading = `
    lines); only the space that the file format puts around every line is dropped.
    """
    _check_split("WikiText-2", split, WIKITEXT2_SPLITS)
    return _wikitext2_articles(os.path.join(corpus_dir(), "wikitext-2", _WIKITEXT2_FILES[split]))


@functools.cache
def _wikitext2_articles(path: str) -> tuple[str, ...]:
    text = _read_text(path)
    articles: list[list[str]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        if _WIKITEXT2_ARTICLE_TITLE.fullmatch(line) or not articles:
            articles.append([])
        articles[-1].append(line.strip(" "))
    return tuple("\n".join(lines) for lines in articles)


def _check_split(corpus_name: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise UserError(f"{corpus_name} has no split {split!r}; choose one of {list(splits)}.")


@functools.cache
def _read_text(path: str) -> str:
    """Reads a UTF-8 text file, gunzipping *.gz; cached because tasks re-read per epoch."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Corpus file {path} is missing. Point ${CORPUS_DIR_ENV} at a directory laid out "
            "like t5lite/data/corpus/ (see its README.md), or unset it to use the shipped corpus."
        )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()
