"""Summarise a JAX profiler trace (.xplane.pb) as the events that took the most time, by name.

    python bench/profile_summary.py MODEL_DIR/profile [--top 30] [--match REGEX]

Reads every *.xplane.pb under the path (as written by `python -m t5lite.train --profile_steps=A:B`
or jax.profiler.trace) and prints, per event name, its count, total milliseconds and share of
the total of the printed plane. On CPU the XLA ops appear as the executable's thunks (fusions,
dots, copies) when the run had XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re


def load_planes(path: str):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415  (TF ships the proto)

    files = [path] if path.endswith(".xplane.pb") else glob.glob(os.path.join(path, "**", "*.xplane.pb"),
                                                                  recursive=True)
    for f in files:
        space = xplane_pb2.XSpace()
        with open(f, "rb") as fh:
            space.ParseFromString(fh.read())
        yield from space.planes


def summarise(planes, match: str | None) -> collections.Counter:
    """event name -> [count, total ps] over all lines of all planes (names filtered by `match`)."""
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for plane in planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if match and not re.search(match, name):
                    continue
                totals[name][0] += 1
                totals[name][1] += event.duration_ps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default=None, help="only event names matching this regex")
    args = parser.parse_args()
    totals = summarise(load_planes(args.path), args.match)
    grand = sum(t for _, t in totals.values()) or 1
    print(f"{'event':70s} {'count':>6s} {'total ms':>10s} {'share':>6s}")
    for name, (count, ps) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{name[:70]:70s} {count:6d} {ps / 1e9:10.1f} {ps / grand:6.1%}")


if __name__ == "__main__":
    main()
