"""Data augmentation for supervised examples: new inputs for the same label, written as a file a task reads.

    python -m t5lite.data.augment --input=train.jsonl --output=train_noised.jsonl --field=sentence \\
        --copies=2 --word_dropout=0.1 --word_swap=0.1 --typo=0.05 --seed=0

Noise (cheap, label-preserving for most classification tasks; EDA, Wei & Zou 2019, and word dropout,
Iyyer et al. 2015), applied in this order to each copy:
  word_dropout p   each word is deleted with probability p (a text keeps at least one word)
  word_swap p      round(p * words) swaps of two words chosen at random (at least one when p > 0)
  typo p           each word of 3 or more letters gets one edit with probability p: a letter replaced by
                   a neighbour on a QWERTY keyboard, deleted, doubled, or swapped with the letter next to it
A word is a run of non-space characters, so punctuation travels with its word.

Every variant then goes through t5lite.data.cleaning's TextCleaner with the same flags as
`python -m t5lite.data.cleaning` (default: markup, NFKC, whitespace), so augmented text is as clean as
the rest of the data. A variant the cleaner drops, or one equal to its original or to an earlier
variant of it, is not written (counted in the report). Randomness comes from --seed and the example's
position: the same command writes the same file.

Input and output: JSONL (a record a line; --field is augmented, every other field, e.g. the label, is
copied) or text (.txt or .txt.gz: a line is an example). Each original is written first, then its
variants, each with "augmented": 0 (the original) or 1..copies in JSONL (--no_originals: variants only).
The report (stdout, --report FILE) counts examples read, variants written, dropped and duplicates.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import random
import sys
from collections.abc import Iterator, Sequence

from t5lite.data import cleaning
from t5lite.errors import UserError

# Neighbours of each letter on a QWERTY keyboard (same row and the rows above and below).
_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    position = {c: (r, i) for r, row in enumerate(_KEYBOARD_ROWS) for i, c in enumerate(row)}
    return {c: "".join(d for d, (r2, i2) in position.items() if d != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1)
            for c, (r, i) in position.items()}


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Probabilities of the noise operations (module docstring); 0 turns one off."""

    word_dropout: float = 0.0
    word_swap: float = 0.0
    typo: float = 0.0

    def __post_init__(self):
        for name in ("word_dropout", "word_swap", "typo"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"--{name}={value} must be in [0, 1).")
        if not (self.word_dropout or self.word_swap or self.typo):
            raise UserError("No noise chosen: give --word_dropout, --word_swap or --typo above 0.")


def drop_words(words: list[str], p: float, rng: random.Random) -> list[str]:
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def swap_words(words: list[str], p: float, rng: random.Random) -> list[str]:
    words = list(words)
    if len(words) < 2 or p == 0.0:
        return words
    for _ in range(max(1, round(p * len(words)))):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def typo(word: str, rng: random.Random) -> str:
    """One keyboard-style edit of a letter of `word` (replace by a neighbour, delete, double, transpose)."""
    letters = [i for i, c in enumerate(word) if c.lower() in KEYBOARD_NEIGHBOURS]
    if not letters:
        return word
    i = rng.choice(letters)
    edit = rng.choice(("replace", "delete", "double", "transpose"))
    if edit == "replace":
        neighbour = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
        return word[:i] + (neighbour.upper() if word[i].isupper() else neighbour) + word[i + 1:]
    if edit == "delete":
        return word[:i] + word[i + 1:]
    if edit == "double":
        return word[:i + 1] + word[i:]
    neighbours = [j for j in (i + 1, i - 1) if j in letters]  # letters only: punctuation stays in place
    if not neighbours:
        return word[:i] + word[i + 1:]
    a, b = sorted((i, neighbours[0]))
    return word[:a] + word[b] + word[a] + word[b + 1:]


def add_typos(words: list[str], p: float, rng: random.Random) -> list[str]:
    return [typo(w, rng) if sum(c.isalpha() for c in w) >= 3 and rng.random() < p else w for w in words]


def noised(text: str, config: NoiseConfig, rng: random.Random) -> str:
    """`text` with config's word dropout, then word swaps, then typos."""
    words = text.split()
    if not words:
        return text
    if config.word_dropout:
        words = drop_words(words, config.word_dropout, rng)
    if config.word_swap:
        words = swap_words(words, config.word_swap, rng)
    if config.typo:
        words = add_typos(words, config.typo, rng)
    return " ".join(words)


@dataclasses.dataclass
class AugmentReport:
    examples: int = 0
    variants_written: int = 0
    dropped_by_cleaning: int = 0
    duplicates: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def variants(text: str, config: NoiseConfig, copies: int, rng: random.Random, cleaner: cleaning.TextCleaner,
             report: AugmentReport) -> list[str]:
    """Up to `copies` cleaned noised versions of `text`, none equal to it or to each other."""
    seen, out = {text}, []
    for _ in range(copies):
        candidate = cleaner.clean(noised(text, config, rng))
        if candidate is None:
            report.dropped_by_cleaning += 1
        elif candidate in seen:
            report.duplicates += 1
        else:
            seen.add(candidate)
            out.append(candidate)
    return out


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def _open(path: str, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.endswith(".gz") else open(path, mode, encoding="utf-8")


def read_examples(path: str, field: str) -> Iterator[dict]:
    """Records of a JSONL file (each must hold `field`, a string), or {field: line} of a text file."""
    jsonl = _is_jsonl(path)
    with _open(path, "r") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not jsonl:
                yield {field: line}
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not a JSON record ({e.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UserError(f"{path}:{number}: no string field {field!r} to augment (fields: "
                                f"{sorted(record) if isinstance(record, dict) else type(record).__name__}).")
            yield record


def augment_file(input_path: str, output_path: str, *, field: str, config: NoiseConfig, copies: int, seed: int,
                 cleaner: cleaning.TextCleaner, keep_originals: bool = True) -> AugmentReport:
    """Writes output_path (module docstring); -> the report."""
    if copies < 1:
        raise UserError(f"--copies={copies} must be at least 1.")
    if _is_jsonl(input_path) != _is_jsonl(output_path):
        raise UserError(f"--input {input_path!r} and --output {output_path!r} must both be JSONL or both text.")
    report = AugmentReport()
    jsonl = _is_jsonl(output_path)
    with _open(output_path, "w") as out:
        for index, record in enumerate(read_examples(input_path, field)):
            report.examples += 1
            rng = random.Random(f"{seed}:{index}")  # an example's variants do not depend on the others
            texts = variants(record[field], config, copies, rng, cleaner, report)
            report.variants_written += len(texts)
            rows = ([(0, record[field])] if keep_originals else []) + list(enumerate(texts, 1))
            for number, text in rows:
                out.write(json.dumps({**record, field: text, "augmented": number}, ensure_ascii=False) + "\n"
                          if jsonl else text + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL or text (.txt, .gz)")
    parser.add_argument("--output", required=True, help="the same format as --input")
    parser.add_argument("--field", default="inputs", help="the JSONL field to augment (default inputs)")
    parser.add_argument("--copies", type=int, default=1, help="variants per example (default 1)")
    parser.add_argument("--word_dropout", type=float, default=0.0)
    parser.add_argument("--word_swap", type=float, default=0.0)
    parser.add_argument("--typo", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_originals", action="store_true", help="write the variants only")
    parser.add_argument("--report", help="also write the report (JSON) here")
    cleaning.add_cleaner_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = NoiseConfig(word_dropout=args.word_dropout, word_swap=args.word_swap, typo=args.typo)
        cleaner = cleaning.TextCleaner(**cleaning.cleaner_options(args))
        report = augment_file(args.input, args.output, field=args.field, config=config, copies=args.copies,
                              seed=args.seed, cleaner=cleaner, keep_originals=not args.no_originals)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps({"input": args.input, "output": args.output, **report.as_dict()}, indent=2)
    print(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
