"""Section (f): the prepared-shard and JPEG loaders' images/s with all the machine's cores (issue 9, part 3).

The same measurement as ``benchmarks/bench_loaders.py`` (its docstring says how), smaller so that it fits the
section's budget: generated photo-like JPEGs, prepared once (timed), then both streams through the training
``InfiniteBatchIterator`` with one worker per core, dequantization on and off.
"""
from __future__ import annotations

import os

from benchmarks.bench_loaders import measure


def run(params: dict, partial) -> None:
    workers = params["workers"] or os.cpu_count()
    partial.record(**measure(params["images"], params["epochs"], params["repeats"], workers))
