"""Reading documents from text files: the input of the corpus tools (cleaning, dedup)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

from t5lite.errors import UserError


def read_documents(path: str, *, separator: str = "line") -> Iterator[str]:
    """Documents of a text file (.gz too): one per line, or blocks separated by blank lines."""
    if separator not in ("line", "blank_line"):
        raise UserError(f"separator={separator!r}; choose 'line' or 'blank_line'.")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if separator == "line":
                yield from (line.rstrip("\n") for line in f if line.strip())
                return
            block: list[str] = []
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield "\n".join(block)
                    block = []
            if block:
                yield "\n".join(block)
    except FileNotFoundError as e:
        raise UserError(f"Input file {path!r} does not exist.") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path!r} is not UTF-8 text ({e}).") from e
