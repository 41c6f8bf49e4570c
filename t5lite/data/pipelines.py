"""Corpus cleaning, deduplication and seqio task caching as Apache Beam pipelines, for corpora larger than a machine.

    python -m t5lite.data.pipelines clean --input='raw/*.txt.gz' --output=out/clean --c4_lines [Beam options]
    python -m t5lite.data.pipelines dedup --input='out/clean-*' --output=out/dedup --mode=near [Beam options]
    python -m t5lite.data.pipelines cache --task=my_task --output_cache_dir=cache [Beam options]

Every flag that is not the subcommand's own is a Beam pipeline option: none runs the DirectRunner in this
process; --direct_num_workers=2 --direct_running_mode=multi_processing uses two local processes;
--runner=DataflowRunner --project=P --region=R --temp_location=gs://... (or FlinkRunner, SparkRunner) a
cluster. --input takes files or globs (gs:// too), read in flag order, each glob's files sorted.

What equals what, on any runner:
  clean  the flags of `python -m t5lite.data.cleaning` (the same argparse definitions); the documents it keeps
         and its report are that tool's on the same input (each worker's CleaningReport, merged by a combiner).
  dedup  the flags of `python -m t5lite.data.dedup`; the set of documents kept and the report are that tool's:
         documents are ordered by (input file, position), the first of each exact-duplicate group stays, and
         near mode runs the same MinHash signatures, LSH bands and verification (t5lite.data.dedup), then keeps
         the first document of each cluster of linked documents.
  cache  seqio's Beam caching (seqio.scripts.cache_tasks_main) of Tasks with a seqio.CacheDatasetPlaceholder;
         train from the cache with DataConfig.cache_dir.
The output is sharded text, OUTPUT-00000-of-0000N, one document per line (separator line) or blank-line
separated; documents are in no particular order. The JSON report goes to --report (default OUTPUT.report.json)
and is printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from t5lite.data import beam_transforms
from t5lite.errors import reports_user_errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, tool in (("clean", "cleaning"), ("dedup", "dedup")):
        command = commands.add_parser(name, help=f"python -m t5lite.data.{tool} as a Beam pipeline")
        command.add_argument("--input", action="append", default=[], required=True, help="file or glob (repeatable)")
        command.add_argument("--output", required=True, help="prefix of the output shards")
        command.add_argument("--report", help="JSON report path (default OUTPUT.report.json)")
        command.add_argument("--num_shards", type=int, default=0, help="output shards (0: the runner decides)")
        beam_transforms.add_flags(name, command)
    cache = commands.add_parser("cache", help="seqio task caching (seqio.scripts.cache_tasks_main)")
    cache.add_argument("--task", action="append", default=[], required=True, help="Task or Mixture (repeatable)")
    cache.add_argument("--output_cache_dir", required=True)
    cache.add_argument("--module_import", action="append", default=[], help="module registering your tasks")
    cache.add_argument("--min_shards", type=int, default=64, help="at least this many files per split")
    cache.add_argument("--max_shards", type=int, default=0, help="at most this many (0: no limit)")
    cache.add_argument("--overwrite", action="store_true", help="re-cache a task already in output_cache_dir")
    return parser


def _without(argv: Sequence[str], removed: Sequence[str]) -> list[str]:
    """argv less the subsequence removed (in order)."""
    out, j = [], 0
    for arg in argv:
        if j < len(removed) and arg == removed[j]:
            j += 1
        else:
            out.append(arg)
    return out


def _unknown_beam_options(beam_argv: Sequence[str]) -> list[str]:
    """The flags of beam_argv that no Beam PipelineOptions class defines (a typo in a t5lite flag lands here)."""
    def is_value(i: int) -> bool:  # the value of "--flag value"
        return i > 0 and beam_argv[i - 1].startswith("--") and "=" not in beam_argv[i - 1]

    strays = [a for i, a in enumerate(beam_argv) if not a.startswith("--") and not is_value(i)]
    if strays:
        return strays
    options = PipelineOptions(list(beam_argv))
    beam_logger = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_logger.level
    beam_logger.setLevel(logging.ERROR)  # it would warn "Discarding unparseable args": we report them
    try:
        known = options.get_all_options(retain_unknown_options=False)
        everything = options.get_all_options(retain_unknown_options=True)
    finally:
        beam_logger.setLevel(level)
    return sorted(f"--{name}" for name in set(everything) - set(known))


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(the subcommand's flags, the Beam pipeline options): every flag the subcommand lacks goes to Beam."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    _, beam_argv = parser.parse_known_args(argv)
    args = parser.parse_args(_without(argv, beam_argv))
    unknown = _unknown_beam_options(beam_argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither a flag of `{args.command}` nor a Beam "
                     "pipeline option)")
    return args, beam_argv


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args, beam_argv = parse_args(argv)
    if args.command == "cache":
        for module in args.module_import:
            importlib.import_module(module)
        tasks = beam_transforms.cacheable_tasks(args.task)
        with beam.Pipeline(options=PipelineOptions(beam_argv)) as pipeline:
            written = beam_transforms.build_cache(pipeline, tasks=tasks, output_cache_dir=args.output_cache_dir,
                                  modules=args.module_import, min_shards=args.min_shards,
                                  max_shards=args.max_shards, overwrite=args.overwrite)
        print(json.dumps({"tasks": tasks, "output_cache_dir": args.output_cache_dir, "written": written}, indent=2))
        return 0
    inputs = beam_transforms.expand_inputs(args.input)
    report_path = args.report or f"{args.output}.report.json"
    with beam.Pipeline(options=PipelineOptions(beam_argv)) as pipeline:
        beam_transforms.build_from_flags(args.command, pipeline, args, inputs=inputs, report_path=report_path)
    text = beam_transforms.read_text(report_path)
    print(text.strip())
    if args.command == "clean" and json.loads(text)["documents_out"] == 0:
        print("error: cleaning removed every document (the report above says why).", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
