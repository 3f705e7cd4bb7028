"""gSR's class groups of long-tailed data: many / medium / few by training images per class.

A class with more than `many_above` training images is "many", one with at most `few_at_most` is
"few", the rest "medium" (gSR: > 100, 41-100, <= 40; docs/reference/gsr_studiogan.md A6). Membership comes
from the *training* counts, whatever data the reference statistics come from.
"""
from __future__ import annotations

from collections.abc import Sequence

GROUPS = ("many", "medium", "few")


def group_of(count: int, many_above: int, few_at_most: int) -> str:
    if count > many_above:
        return "many"
    return "few" if count <= few_at_most else "medium"


def class_groups(counts: Sequence[int], many_above: int, few_at_most: int) -> dict[str, list[int]]:
    """{"many": [classes], "medium": [...], "few": [...]} (every group present, possibly empty)."""
    if few_at_most >= many_above:
        raise ValueError(f"evaluation.few_at_most ({few_at_most}) must be below evaluation.many_above ({many_above})")
    groups: dict[str, list[int]] = {name: [] for name in GROUPS}
    for label, count in enumerate(counts):
        groups[group_of(count, many_above, few_at_most)].append(label)
    return groups


def label_to_group(groups: dict[str, list[int]]) -> dict[int, int]:
    """class -> index of its group in GROUPS: the labels under which per-group reference statistics are kept."""
    return {label: GROUPS.index(name) for name, members in groups.items() for label in members}
