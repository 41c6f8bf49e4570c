"""How much of what the PII scrubber touches is sensitive? Precision / recall against EnterprisePII.

    python bench/pii_filter.py [--data_dir=$T5LITE_DATA_DIR] [--limit N]

Reads enterprise_pii/enterprise_pii_classification.jsonl (3,395 business passages, each labelled
whether it holds sensitive information: gold 1 = sensitive; the passage is the text between the
triple quotes of "query"), runs t5lite.data.pii.scrub_pii on every passage and prints, as JSON:
  precision     of the passages the scrubber touched (replaced anything in), the fraction gold 1
  recall        of the gold-1 passages, the fraction touched
  touch_rate_0  of the gold-0 passages, the fraction touched
with the counts behind them and the replacements per PII kind. "Sensitive" there is broader than what
a pattern scrubber looks for (named people with roles, customers with revenue figures), so a low
recall is expected; the precision says whether the patterns fire on what the labels call private.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite.data import pii  # noqa: E402

DATA_FILE = os.path.join("enterprise_pii", "enterprise_pii_classification.jsonl")


def passages(path: str, limit: int | None = None) -> list[tuple[str, int]]:
    """(passage, gold) of each row: the text between the ''' marks of the query."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            parts = row["query"].split("'''")
            if len(parts) != 3 or row["gold"] not in (0, 1):
                raise ValueError(f"{path}:{n}: expected one '''passage''' and gold 0 or 1.")
            out.append((parts[1].strip("\n"), row["gold"]))
            if limit and len(out) >= limit:
                break
    return out


def evaluate(rows: list[tuple[str, int]]) -> dict:
    touched = collections.Counter()  # gold -> passages touched
    gold = collections.Counter(g for _, g in rows)
    kinds, examples = collections.Counter(), []
    for text, label in rows:
        scrubbed, counts = pii.scrub_pii(text)
        if counts:
            touched[label] += 1
            kinds.update(counts)
            if len(examples) < 10:  # the scrubbed text around the first placeholder
                at = min(scrubbed.find(pii.DEFAULT_PLACEHOLDERS[k]) for k in counts)
                examples.append({"gold": label, "context": scrubbed[max(0, at - 60):at + 40]})
    n_touched = touched[0] + touched[1]
    return {
        "passages": len(rows), "gold_1": gold[1], "gold_0": gold[0],
        "touched": n_touched, "touched_gold_1": touched[1], "touched_gold_0": touched[0],
        "precision": touched[1] / n_touched if n_touched else None,
        "recall": touched[1] / gold[1] if gold[1] else None,
        "touch_rate_0": touched[0] / gold[0] if gold[0] else None,
        "replaced": {k: kinds[k] for k in pii.PII_KINDS},
        "examples": examples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.environ.get("T5LITE_DATA_DIR"))
    parser.add_argument("--limit", type=int, help="first N passages only")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give --data_dir or set T5LITE_DATA_DIR (the folder holding enterprise_pii/)")
    t = time.perf_counter()
    report = evaluate(passages(os.path.join(args.data_dir, DATA_FILE), args.limit))
    report["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
