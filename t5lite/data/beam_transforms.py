"""Apache Beam transforms and pipelines of the corpus tools: cleaning (t5lite.data.cleaning), deduplication
(t5lite.data.dedup) and seqio task caching. `python -m t5lite.data.pipelines` runs them (its docstring says
what equals what); build_clean / build_dedup / build_cache add them to a pipeline of your own.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from t5lite.data import cleaning, dedup, documents
from t5lite.errors import UserError

DocKey = tuple[int, int]  # (input file, document within it): the corpus order of the in-process tools
# Imported by every worker before it reads a task: they register t5lite's seqio Tasks.
TASK_MODULES = ("t5lite.data.pipeline",)


# ----------------------------------------------------------------------------------------- reading, writing


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """The files of --input patterns (paths or globs, any Beam filesystem), in flag order, each glob sorted."""
    paths = []
    for pattern in patterns:
        try:
            matched = sorted(m.path for result in FileSystems.match([pattern]) for m in result.metadata_list)
        except Exception as e:  # noqa: BLE001  (Beam raises BeamIOError or OSError by filesystem)
            raise UserError(f"--input={pattern!r}: {e}") from e
        if not matched:
            raise UserError(f"--input={pattern!r} matches no file.")
        paths += matched
    return paths


def _read_file(indexed_path: tuple[int, str], separator: str) -> Iterator[tuple[DocKey, str]]:
    file_index, path = indexed_path
    with FileSystems.open(path) as f:  # .gz and other compressions by extension
        lines = (line.decode("utf-8") for line in iter(f.readline, b""))
        try:
            for doc_index, doc in enumerate(documents.split_documents(lines, separator=separator)):
                yield (file_index, doc_index), doc
        except UnicodeDecodeError as e:
            raise UserError(f"{path!r} is not UTF-8 text ({e}).") from e


class ReadDocuments(beam.PTransform):
    """((file index, document index), text) of each document of the files, spread over the workers."""

    def __init__(self, paths: Sequence[str], separator: str):
        super().__init__()
        self._paths, self._separator = list(paths), separator

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(list(enumerate(self._paths)))
                | "Documents" >> beam.FlatMap(_read_file, self._separator)
                | "Spread" >> beam.Reshuffle())  # a file's documents would otherwise stay on its reader


def write_documents(texts, output: str, separator: str, num_shards: int):
    """Writes texts as the in-process tools do: a document per line, or documents separated by a blank line."""
    if separator != "line":
        texts = texts | "BlankLineAfter" >> beam.Map(lambda text: text + "\n")
    return texts | "Write" >> beam.io.WriteToText(output, num_shards=num_shards)


def _write_report(report, path: str):
    return (report
            | "ReportJson" >> beam.Map(lambda r: json.dumps(r, indent=2))
            | "WriteReport" >> beam.io.WriteToText(path, num_shards=1, shard_name_template=""))


def read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


# ------------------------------------------------------------------------------------------------ cleaning


def merge_cleaning_reports(reports: Iterable[cleaning.CleaningReport]) -> cleaning.CleaningReport:
    """One CleaningReport of several: counts added, field by field."""
    merged = cleaning.CleaningReport()
    for report in reports:
        for field in dataclasses.fields(merged):
            value = getattr(report, field.name)
            if isinstance(value, collections.Counter):
                getattr(merged, field.name).update(value)  # keeps the zero counts (PII kinds never found)
            else:
                setattr(merged, field.name, getattr(merged, field.name) + value)
    return merged


class MergeCleaningReports(beam.CombineFn):
    def create_accumulator(self) -> cleaning.CleaningReport:
        return cleaning.CleaningReport()

    def add_input(self, accumulator, report):
        return merge_cleaning_reports([accumulator, report])

    def merge_accumulators(self, accumulators):
        return merge_cleaning_reports(accumulators)

    def extract_output(self, accumulator):
        return accumulator


class CleanDocuments(beam.DoFn):
    """TextCleaner(**options) on each (key, text): the kept (key, cleaned text), and under REPORT each
    bundle's CleaningReport."""

    REPORT = "report"

    def __init__(self, options: dict):
        self._options = options

    def setup(self):
        self._cleaner = cleaning.TextCleaner(**self._options)  # per worker: word lists, language model
        self._empty_report = copy.deepcopy(self._cleaner.report)

    def start_bundle(self):
        self._cleaner.report = copy.deepcopy(self._empty_report)

    def process(self, keyed_document: tuple[DocKey, str]):
        key, text = keyed_document
        cleaned = self._cleaner.clean(text)
        if cleaned is not None:
            yield key, cleaned

    def finish_bundle(self):
        yield beam.pvalue.TaggedOutput(self.REPORT, GlobalWindows.windowed_value(self._cleaner.report))


def build_clean(pipeline, *, inputs: Sequence[str], output: str, report_path: str, separator: str,
                options: dict, num_shards: int = 0) -> None:
    """Adds the cleaning of inputs (files) to pipeline: OUTPUT-* shards and the JSON report at report_path."""
    docs = pipeline | "Read" >> ReadDocuments(inputs, separator)
    cleaned = docs | "Clean" >> beam.ParDo(CleanDocuments(options)).with_outputs(CleanDocuments.REPORT,
                                                                                   main="documents")
    write_documents(cleaned.documents | "Texts" >> beam.Values(), output, separator, num_shards)
    report = (cleaned[CleanDocuments.REPORT]
              | "MergeReports" >> beam.CombineGlobally(MergeCleaningReports())
              | "AsDict" >> beam.Map(lambda r: {"inputs": list(inputs), "output": output, **r.as_dict()}))
    _write_report(report, report_path)


# --------------------------------------------------------------------------------------------------- dedup


def _signed(keyed_document: tuple[DocKey, str], hasher: dedup.MinHasher) -> tuple[DocKey, np.ndarray]:
    key, text = keyed_document
    return key, hasher.signature(text).astype(np.uint32)  # values < 2^31: exact, and half the bytes to shuffle


def _band_entries(keyed_signature: tuple[DocKey, np.ndarray], num_bands: int):
    key, signature = keyed_signature
    if dedup.has_words(signature):  # as near_duplicate_mask: a text without words matches nothing
        for band_key in dedup.band_keys(signature, num_bands):
            yield band_key, keyed_signature


def _bucket_links(bucket: tuple[object, Iterable[tuple[DocKey, np.ndarray]]], threshold: float):
    """(document, earlier document it is linked to) for the documents of one LSH bucket that a verified pair
    links to an earlier one: a spanning forest of the bucket's clusters, as near_duplicate_mask builds them."""
    members = sorted(bucket[1], key=lambda member: member[0])
    if len(members) < 2:
        return
    clusters = dedup.Clusters()
    for i, (key, signature) in enumerate(members):
        for earlier, earlier_signature in members[:i]:
            if clusters.root(key) != clusters.root(earlier) and dedup.is_near_duplicate(
                    earlier_signature, signature, threshold):
                clusters.union(key, earlier)
    for key in clusters.duplicates():
        yield key, clusters.root(key)


def _near_duplicates(links: Iterable[tuple[DocKey, DocKey]]) -> set[DocKey]:
    """The documents to drop: all but the first of each cluster that the links (of every bucket) make."""
    clusters = dedup.Clusters()
    for key, other in links:
        clusters.union(key, other)
    return clusters.duplicates()


def _count(pcoll, label: str):
    """(documents, characters) of a PCollection of (key, text), as a singleton PCollection."""
    return (pcoll
            | f"Size{label}" >> beam.Map(lambda keyed: (1, len(keyed[1])))
            | f"Sum{label}" >> beam.CombineGlobally(beam.combiners.TupleCombineFn(sum, sum)))


def build_dedup(pipeline, *, inputs: Sequence[str], output: str, report_path: str, separator: str, mode: str,
                threshold: float = 0.8, num_shards: int = 0) -> None:
    """Adds the deduplication of inputs (files) to pipeline: OUTPUT-* shards and the JSON report at report_path.

    The near-duplicate links (document, linked earlier document) are merged into clusters on one worker: they
    number about the near duplicates, far fewer than the documents.
    """
    dedup.check_mode(mode)
    docs = pipeline | "Read" >> ReadDocuments(inputs, separator)
    firsts = (docs
              | "ExactKey" >> beam.Map(lambda keyed: (dedup.exact_key(keyed[1]), keyed))
              | "FirstOfEach" >> beam.CombinePerKey(min)  # the smallest (file, position): the first in the corpus
              | "Firsts" >> beam.Values())
    if mode == "near":
        hasher = dedup.MinHasher()
        dropped = (firsts
                   | "Signature" >> beam.Map(_signed, hasher)
                   | "Bands" >> beam.FlatMap(_band_entries, dedup.NUM_BANDS)
                   | "Buckets" >> beam.GroupByKey()
                   | "Links" >> beam.FlatMap(_bucket_links, threshold)
                   | "AllLinks" >> beam.combiners.ToList()
                   | "Clusters" >> beam.Map(_near_duplicates))
        kept = firsts | "DropNear" >> beam.Filter(lambda keyed, drop: keyed[0] not in drop,
                                                  beam.pvalue.AsSingleton(dropped))
        near_count = beam.pvalue.AsSingleton(dropped | "NearCount" >> beam.Map(len))
    else:
        kept, near_count = firsts, 0
    write_documents(kept | "Texts" >> beam.Values(), output, separator, num_shards)

    def report(_, total, unique, kept, near):
        return {"inputs": list(inputs), "output": output,
                **dedup.dedup_report(mode=mode, threshold=threshold, documents=total[0], kept=kept[0],
                                     exact_duplicates=total[0] - unique[0], near_duplicates=near,
                                     characters_in=total[1], characters_kept=kept[1])}

    counts = [beam.pvalue.AsSingleton(_count(pcoll, label))
              for pcoll, label in ((docs, "All"), (firsts, "Unique"), (kept, "Kept"))]
    _write_report(pipeline | "ReportOnce" >> beam.Create([None]) | "Report" >> beam.Map(report, *counts, near_count),
                  report_path)


# --------------------------------------------------------------------------------------------- seqio cache


def cacheable_tasks(names: Sequence[str]) -> list[str]:
    """The Tasks of names (Tasks or Mixtures, registered), each with a seqio.CacheDatasetPlaceholder."""
    import seqio  # noqa: PLC0415  (TensorFlow: the cache subcommand only)

    from t5lite.data import pipeline as pipeline_lib  # noqa: PLC0415  (registers t5lite's tasks)

    tasks = [t for name in names for t in pipeline_lib.list_tasks_of(name)]
    uncacheable = [t for t in tasks if not seqio.TaskRegistry.get(t).supports_caching]
    if uncacheable:
        raise UserError(
            f"Tasks {uncacheable} have no seqio.CacheDatasetPlaceholder, so seqio cannot cache them. Put one in "
            "the task's preprocessors where the cache should be: after the deterministic steps, before the random "
            "ones (t5lite's add_pretraining_task / add_supervised_task: last of extra_preprocessors, caching the "
            "cleaned text; a task of your own: after tokenize).")
    return list(dict.fromkeys(tasks))


def build_cache(pipeline, *, tasks: Sequence[str], output_cache_dir: str, modules: Sequence[str] = (),
                min_shards: int = 64, max_shards: int = 0, overwrite: bool = False) -> list[str]:
    """Adds seqio's caching of tasks (cacheable_tasks) to pipeline; returns the task directories it writes
    (a task already cached in output_cache_dir is skipped unless overwrite)."""
    import seqio  # noqa: PLC0415
    from seqio.scripts import cache_tasks_main  # noqa: PLC0415

    # seqio's run_pipeline reads its absl flags for the shard counts: set them as its command line would.
    cache_tasks_main.FLAGS([sys.argv[0], f"--min_shards={min_shards}", f"--max_shards={max_shards}"])
    seqio.add_global_cache_dirs([output_cache_dir])
    return cache_tasks_main.run_pipeline(
        pipeline, [re.escape(t) for t in tasks], output_cache_dir, modules_to_import=[*TASK_MODULES, *modules],
        overwrite=overwrite)


# ------------------------------------------------------------------------------------------ from the flags


def add_flags(command: str, parser: argparse.ArgumentParser) -> None:
    """The flags of clean: those of python -m t5lite.data.cleaning; of dedup: those of python -m
    t5lite.data.dedup (--mode, --threshold, --separator). The same argparse definitions, not copies."""
    {"clean": cleaning.add_cleaner_arguments, "dedup": dedup.add_dedup_arguments}[command](parser)


def build_from_flags(command: str, pipeline, args: argparse.Namespace, *, inputs: Sequence[str],
                     report_path: str) -> None:
    """build_clean or build_dedup with the options of parsed add_flags flags (and --output, --num_shards)."""
    common = dict(inputs=inputs, output=args.output, report_path=report_path, separator=args.separator,
                  num_shards=args.num_shards)
    if command == "clean":
        build_clean(pipeline, options=cleaning.cleaner_options(args), **common)
    else:
        build_dedup(pipeline, mode=args.mode, threshold=args.threshold, **common)
