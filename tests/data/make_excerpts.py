"""Cuts the test excerpts (tests/data/excerpts/) from the full public data sets.

    python tests/data/make_excerpts.py                       # reads $T5LITE_DATA_DIR
    python tests/data/make_excerpts.py --data_dir=../shared/data --out=tests/data/excerpts

Each excerpt keeps the layout, file name and format of the original, so t5lite's loaders read it
as they read the full set (T5LITE_DATA_DIR=tests/data/excerpts). The cuts are deterministic (the
first rows of a file, never a random sample): re-running against the same data rewrites the same
bytes. MANIFEST.json records, per file, the rows kept, the rows of the full file and the sha256 of
the excerpt; tests/conftest.py reads the row counts from it. Only data sets whose license allows
redistribution are cut (tests/data/excerpts/README.md says which, and why the others are not).
Standard library only.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "excerpts")

# (relative path, rows kept): JSON Lines files, cut to their first rows, byte for byte.
JSONL_HEADS = (
    ("arc/arc_easy.jsonl", 200),
    ("arc/arc_challenge.jsonl", 200),
    ("lambada_openai/lambada_openai.jsonl", 100),
    ("winogrande/winogrande.jsonl", 200),
    ("boolq/boolq.jsonl", 200),
    ("winogender/winogender_mc_female.jsonl", 60),
    ("winogender/winogender_mc_male.jsonl", 60),
)
SQUAD = "squad_v1.1/dev-v1.1.json"
HELLASWAG, HELLASWAG_ITEMS = "hellaswag_llamacpp/hellaswag_val_full.txt.bz2", 200
TRUTHFULQA, TRUTHFULQA_ITEMS = "truthfulqa/v0/mc_task.json", 200
MMLU_TEST_ROWS = 5  # per subject; every dev row (5 per subject) is kept for few-shot prompts


def _head_lines(source: str, rows: int) -> tuple[bytes, int]:
    """The first `rows` lines of a file, as bytes, and the number of lines in the whole file."""
    kept, total = [], 0
    with open(source, "rb") as f:
        for line in f:
            total += 1
            if total <= rows:
                kept.append(line)
    if total < rows:
        raise SystemExit(f"{source}: {total} lines, fewer than the {rows} to keep.")
    return b"".join(kept), total


def _hellaswag_head(source: str, items: int) -> tuple[bytes, int]:
    """The first `items` items (6 lines each) of the bz2 text, compressed again (bz2 is deterministic)."""
    with bz2.open(source, "rb") as f:
        lines = f.read().split(b"\n")
    total = (len(lines) - (lines[-1] == b"")) // 6
    return bz2.compress(b"\n".join(lines[:6 * items]) + b"\n"), total


def _csv_head(source: str, rows: int | None) -> tuple[bytes, int]:
    """The bytes of the first `rows` CSV records (all with None; embedded newlines and CRLF kept) and
    the number of records in the file."""
    with open(source, encoding="utf-8", newline="") as f:
        lines = f.readlines()
    consumed: list[str] = []

    def feed():
        for line in lines:
            consumed.append(line)
            yield line

    kept, total = None, 0
    for _ in csv.reader(feed()):
        total += 1
        if total == rows:
            kept = "".join(consumed)
    return (kept if kept is not None else "".join(lines)).encode("utf-8"), total


def _truthfulqa_head(source: str, items: int) -> tuple[bytes, int]:
    with open(source, encoding="utf-8") as f:
        text = f.read()
    full = json.loads(text)
    if json.dumps(full, indent=2) != text:
        raise SystemExit(f"{source}: not in json.dumps(indent=2) format; the excerpt would differ in form.")
    return json.dumps(full[:items], indent=2).encode("utf-8"), len(full)


def _squad_first_paragraphs(source: str) -> tuple[bytes, dict]:
    """SQuAD v1.1 with every article (so t5lite's 80/20 split by article title keeps both splits)
    but only its first paragraph and that paragraph's questions, serialised as the original is."""
    with open(source, encoding="utf-8") as f:
        text = f.read()
    full = json.loads(text)
    if json.dumps(full) != text:  # the original is json.dumps' default output: keep that format
        raise SystemExit(f"{source}: not in json.dumps' default format; the excerpt would differ in form.")
    data = [{"title": a["title"], "paragraphs": a["paragraphs"][:1]} for a in full["data"]]
    excerpt = {"data": data, "version": full["version"]}
    questions = sum(len(a["paragraphs"][0]["qas"]) for a in data)
    full_questions = sum(len(p["qas"]) for a in full["data"] for p in a["paragraphs"])
    counts = {"rows": questions, "full_rows": full_questions, "articles": len(data), "paragraphs": len(data),
              "full_paragraphs": sum(len(a["paragraphs"]) for a in full["data"]), "unit": "question"}
    return json.dumps(excerpt).encode("utf-8"), counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("T5LITE_DATA_DIR"),
                        help="the full data sets (default: $T5LITE_DATA_DIR)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to write the excerpts (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        parser.error("give --data_dir or set T5LITE_DATA_DIR to the full data sets (e.g. ../shared/data)")

    outputs: dict[str, tuple[bytes, dict]] = {}
    for relative, rows in JSONL_HEADS:
        content, total = _head_lines(os.path.join(args.data_dir, relative), rows)
        outputs[relative] = content, {"rows": rows, "full_rows": total, "unit": "line",
                                      "cut": f"the first {rows} lines, byte for byte"}
    content, counts = _squad_first_paragraphs(os.path.join(args.data_dir, SQUAD))
    outputs[SQUAD] = content, {**counts, "cut": "every article, its first paragraph only, re-serialised "
                                                "with json.dumps (the original's own format)"}

    content, total = _hellaswag_head(os.path.join(args.data_dir, HELLASWAG), HELLASWAG_ITEMS)
    outputs[HELLASWAG] = content, {"rows": HELLASWAG_ITEMS, "full_rows": total, "unit": "item",
                                   "cut": f"the first {HELLASWAG_ITEMS} items (6 lines each), bz2-compressed again"}
    content, total = _truthfulqa_head(os.path.join(args.data_dir, TRUTHFULQA), TRUTHFULQA_ITEMS)
    outputs[TRUTHFULQA] = content, {"rows": TRUTHFULQA_ITEMS, "full_rows": total, "unit": "question",
                                    "cut": f"the first {TRUTHFULQA_ITEMS} items, re-serialised with "
                                           "json.dumps(indent=2) (the original's own format)"}
    for split, rows in (("dev", None), ("test", MMLU_TEST_ROWS)):
        folder = os.path.join(args.data_dir, "mmlu", split)
        for name in sorted(os.listdir(folder)):
            content, total = _csv_head(os.path.join(folder, name), rows)
            outputs[f"mmlu/{split}/{name}"] = content, {
                "rows": rows or total, "full_rows": total, "unit": "record",
                "cut": "every record" if rows is None else f"the first {rows} CSV records, byte for byte"}

    manifest = {}
    for relative, (content, info) in sorted(outputs.items()):
        path = os.path.join(args.out, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        manifest[relative] = {**info, "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        print(f"{relative}: {info['rows']} of {info['full_rows']} {info['unit']}s, {len(content):,} B")
    with open(os.path.join(args.out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
