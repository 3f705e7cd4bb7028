"""Mean ± standard deviation over repeated evaluations (gSR's final protocol: 3 runs with other latents).

A repeat is a record of numbers (possibly nested in dicts, e.g. per class). `summarize` keeps the
structure: every number becomes its mean over the repeats, and `repeat_std` holds the *sample*
standard deviation (ddof=1, the unbiased variance's root) of each. Non-numbers (labels, lists) are
taken from the first repeat.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

STD_KIND = "sample standard deviation over repeats (ddof=1)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _tree(records: list[dict], reduce: Callable[[list[float]], float], numbers_only: bool) -> dict:
    result = {}
    for key, first in records[0].items():
        values = [record[key] for record in records]
        if isinstance(first, dict):
            result[key] = _tree(values, reduce, numbers_only)
        elif _is_number(first):
            result[key] = float(reduce(values))
        elif not numbers_only:
            result[key] = first
    return result


def sample_std(values: list[float]) -> float:
    return float(np.std(values, ddof=1))


def summarize(records: list[dict], seeds: list[int]) -> dict:
    """One repeat: that record unchanged. Several: means, `repeat_std` and `repeats` (each with its seed)."""
    if len(records) != len(seeds) or not records:
        raise ValueError(f"summarize: {len(records)} records for {len(seeds)} seeds")
    if len(records) == 1:
        return dict(records[0])
    return {**_tree(records, np.mean, numbers_only=False),
            "repeat_std": _tree(records, sample_std, numbers_only=True),
            "repeats": [{"seed": seed, **record} for seed, record in zip(seeds, records)]}


def plus_minus(record: dict, path: str, digits: int = 3) -> str:
    """'mean' or 'mean ± std' of the number at a dotted path ('FID', 'group_FID.few')."""
    value, std = record, record.get("repeat_std")
    for part in path.split("."):
        value = value[part]
        std = std.get(part) if isinstance(std, dict) else None
    text = f"{value:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"
