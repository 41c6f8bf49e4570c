"""Look at a task or mixture: raw examples, what the model sees, and length/token statistics.

    python -m t5lite.data.inspect t5lite_default_span_corruption --split=validation
    python -m t5lite.data.inspect my_qa --lengths="{'inputs': 64, 'targets': 32}" --examples=5

For each task: a few raw source examples; the same number of preprocessed examples, decoded
(sentinels shown as <extra_id_N>); then, over `--stats_examples` preprocessed examples, token
lengths (mean / p50 / p95 / max per feature, and how many would be truncated) and tokens per
character of the raw text.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import seqio

from t5lite.data import pipeline
from t5lite.errors import UserError


def length_stats(lengths: Sequence[int], limit: int | None) -> dict[str, float]:
    """Summary of token counts; `truncated` counts examples longer than `limit`."""
    arr = np.asarray(lengths)
    stats = {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
             "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}
    if limit is not None:
        stats["truncated"] = int((arr > limit).sum())
    return stats


def decode_with_eos(vocabulary: seqio.Vocabulary, ids: Sequence[int]) -> str:
    """Decodes every EOS-separated piece (seqio's decode stops at the first EOS), shown as </s>."""
    pieces, current = [], []
    for i in ids:
        if i == vocabulary.eos_id:
            pieces.append(vocabulary.decode(current))
            current = []
        else:
            current.append(i)
    return " </s> ".join(pieces + ([vocabulary.decode(current)] if current else []))


def task_report(task_name: str, split: str, lengths: Mapping[str, int] | None, num_examples: int,
                stats_examples: int) -> dict:
    """Raw and preprocessed examples and statistics of one Task (no truncation, no packing)."""
    task = seqio.TaskRegistry.get(task_name)
    raw = pipeline.raw_texts(task_name, split, limit=stats_examples)
    dataset = task.get_dataset(sequence_length=dict(lengths) if lengths else None, split=split, shuffle=False,
                               seed=0, trim_output_features=False)
    processed = list(itertools.islice(dataset.as_numpy_iterator(), stats_examples))
    if not processed:
        raise UserError(f"{task_name!r} split {split!r} has no examples after preprocessing.")
    report = {"task": task_name, "split": split, "raw_examples": raw[:num_examples], "examples": []}
    for example in processed[:num_examples]:
        report["examples"].append({
            name: decode_with_eos(task.output_features[name].vocabulary, example[name].tolist())
            for name in task.output_features if name in example})
    report["token_lengths"] = {
        name: length_stats([len(ex[name]) for ex in processed], lengths.get(name) if lengths else None)
        for name in task.output_features if name in processed[0]}
    vocabulary = next(iter(task.output_features.values())).vocabulary
    chars = sum(len(t) for t in raw)
    report["tokens_per_character"] = sum(len(vocabulary.encode(t)) for t in raw) / max(chars, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a registered seqio Task or Mixture")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--lengths", help="task feature lengths, e.g. \"{'inputs': 128, 'targets': 32}\"")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--stats_examples", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        lengths = ast.literal_eval(args.lengths) if args.lengths else None
        reports = [task_report(t, args.split, lengths, args.examples, args.stats_examples)
                   for t in pipeline.list_tasks_of(args.name)]
    except (UserError, ValueError, SyntaxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    for r in reports:
        print(f"=== {r['task']} [{r['split']}]")
        for i, text in enumerate(r["raw_examples"]):
            print(f"--- raw {i}: {text[:400]!r}")
        for i, ex in enumerate(r["examples"]):
            for name, text in ex.items():
                print(f"--- {name} {i}: {text[:400]!r}")
        for name, s in r["token_lengths"].items():
            print(f"{name} tokens: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in s.items()))
        print(f"tokens per character (raw text): {r['tokens_per_character']:.4f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
