"""Look at a task or mixture: raw examples, what the model sees, and length/token statistics.

    python -m t5lite.data.inspect t5lite_default_span_corruption --split=validation
    python -m t5lite.data.inspect my_qa --module=my_tasks --lengths="{'inputs': 64, 'targets': 32}" --examples=5
    python -m t5lite.data.inspect --gin_file=my_run.gin      # its MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS

--module=NAME (repeatable) imports a module that registers tasks (from the current directory or
PYTHONPATH); --gin_file (repeatable) parses gin files as the train / eval entry points do, running
their imports, and takes the task and lengths from their macros unless given here.

For each task: a few raw source examples; the same number of preprocessed examples, decoded
(sentinels shown as <extra_id_N>), as cut to --lengths; then, over `--stats_examples`
preprocessed examples, token lengths before truncation (mean / p50 / p95 / max per feature, and
how many are longer than --lengths, so would be truncated) and tokens per character of the raw
text. A task whose objective needs the lengths (span corruption, LM chunks) cuts its text into
pieces of those lengths: its statistics are those of the pieces, none longer than the lengths.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import json
import os
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
    """Raw and preprocessed examples and statistics of one Task (no packing).

    The examples are cut to `lengths` (as seqio's append_eos_after_trim does, even untrimmed); the
    length statistics are of the same examples before any truncation, read again without lengths.
    A task whose preprocessing needs the lengths (UserError: e.g. span corruption) cannot be read
    without: its statistics are of the pieces it cut (`before_truncation` False in the report)."""
    task = seqio.TaskRegistry.get(task_name)
    raw = pipeline.raw_texts(task_name, split, limit=stats_examples)

    def preprocessed(sequence_length: Mapping[str, int] | None) -> list[dict]:
        dataset = task.get_dataset(sequence_length=dict(sequence_length) if sequence_length else None, split=split,
                                   shuffle=False, seed=0, trim_output_features=False)
        return list(itertools.islice(dataset.as_numpy_iterator(), stats_examples))

    processed = preprocessed(lengths)
    if not processed:
        raise UserError(f"{task_name!r} split {split!r} has no examples after preprocessing.")
    untruncated, before_truncation = processed, not lengths
    if lengths:
        try:
            untruncated, before_truncation = preprocessed(None), True
        except UserError:  # the objective needs the lengths: it cuts the text into pieces of them
            pass
    report = {"task": task_name, "split": split, "raw_examples": raw[:num_examples], "examples": []}
    for example in processed[:num_examples]:
        report["examples"].append({
            name: decode_with_eos(task.output_features[name].vocabulary, example[name].tolist())
            for name in task.output_features if name in example})
    report["token_lengths"] = {
        name: length_stats([len(ex[name]) for ex in untruncated], lengths.get(name) if lengths else None)
        for name in task.output_features if name in untruncated[0]}
    report["before_truncation"] = before_truncation
    vocabulary = next(iter(task.output_features.values())).vocabulary
    chars = sum(len(t) for t in raw)
    report["tokens_per_character"] = sum(len(vocabulary.encode(t)) for t in raw) / max(chars, 1)
    return report


def import_modules(names: Sequence[str]) -> None:
    """Imports the modules that register the user's tasks; UserError (one line) for one not found."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the module exists but itself imports something missing: its traceback says what
            raise UserError(f"--module={name}: no module {e.name!r} found from {os.getcwd()} or PYTHONPATH "
                            "(give the module's import name, e.g. my_tasks for my_tasks.py here).") from None


def _gin_defaults(gin_files: Sequence[str]) -> tuple[str | None, Mapping[str, int] | None]:
    """Parses the gin files as the entry points do (their imports register tasks); -> their
    MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS macros, None where unbound."""
    import gin  # noqa: PLC0415

    from t5lite import gin_cli  # noqa: PLC0415  (only with --gin_file: it loads jax)

    gin_cli.parse_gin(gin_files, [])

    def macro(name: str):
        try:
            return gin.query_parameter(f"{name}/macro.value")
        except ValueError:
            return None

    return macro("MIXTURE_OR_TASK_NAME"), macro("TASK_FEATURE_LENGTHS")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="a registered seqio Task or Mixture (default: the gin files' "
                        "MIXTURE_OR_TASK_NAME)")
    parser.add_argument("--module", action="append", default=[], help="module that registers tasks (repeatable)")
    parser.add_argument("--gin_file", action="append", default=[], help="gin file whose imports register tasks "
                        "(repeatable); its MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS are the defaults")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--lengths", help="task feature lengths, e.g. \"{'inputs': 128, 'targets': 32}\"")
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--stats_examples", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        import_modules(args.module)
        name, lengths = _gin_defaults(args.gin_file) if args.gin_file else (None, None)
        name = args.name or name
        if not name:
            raise UserError("Name a task or mixture, or give a --gin_file that binds MIXTURE_OR_TASK_NAME.")
        lengths = ast.literal_eval(args.lengths) if args.lengths else lengths
        reports = [task_report(t, args.split, lengths, args.examples, args.stats_examples)
                   for t in pipeline.list_tasks_of(name)]
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
        how = "" if r["before_truncation"] else " (pieces cut to these lengths by the task's preprocessors)"
        for name, s in r["token_lengths"].items():
            print(f"{name} tokens{how}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in s.items()))
        print(f"tokens per character (raw text): {r['tokens_per_character']:.4f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
