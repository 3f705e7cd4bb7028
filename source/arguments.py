"""argparse types of the command lines: a number out of range is argparse's one-line usage error, before any work.

Without them a zero batch size was a ZeroDivisionError, a huge seed an overflow inside torch, and a billion
repeats a process killed for memory while it built its list of seeds.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

SEED_LIMIT = 2**32  # numpy's seed range; a config's seed is held to it too (source/config_checks.py)


def integer(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound where high is None); ``why`` explains the bound in the error."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{f' ({why})' if why else ''}, got {text}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'abc'"
    return parse


positive_int = integer(1)


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^32), got {text}")
    return value


seed.__name__ = "int"


def positive_float(high: float = math.inf) -> Callable[[str], float]:
    """A finite number in (0, high]."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and 0 < value <= high):
            bound = "a finite number > 0" if high == math.inf else f"a number in (0, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = "float"
    return parse
