"""Long-tailed subsets of labelled data (gSR, docs/reference/gsr_studiogan.md A5): pure functions on label arrays.

The profile is the released exponential one: class i of K keeps n_i = int(n_max * (1/ratio) ** (i / (K - 1)))
images, class 0 the head, so ratio = n_max / n_min (the release's ``imb_factor`` is 1/ratio). LSUN-LT's
release adds 1e-9 to the exponent's denominator (``exponent_offset``), which nudges an exact power like
n_max / sqrt(ratio) above, never below, its integer.

Which images: the release seeds numpy's global generator once (``np.random.seed(0)``) and then, class
by class in label order, shuffles that class's indices and keeps the first n_i. ``select_shuffled``
does the same with its own ``np.random.RandomState(seed)`` (the same Mersenne Twister stream, but
touching no global state), so with seed 0 and the same label order it keeps the release's images, in
the release's item order (class by class, shuffled within a class). LSUN-LT keeps the first n_i images
of each class instead, as released (source/datasets/lsun.py).

The subset is on when ``ratio != 1`` or ``n_max`` is set; ratio 1 with an ``n_max`` is a balanced cap.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from source.datasets.transforms import DatasetError

KEY = "dataset.args.long_tail"
MAX_SEED = 2**32 - 1  # numpy.random.RandomState's seed range


@dataclass
class LongTailArgs:
    ratio: float = 1.0  # imbalance ratio rho = n_max / n_min; 1 (with n_max null) = the data as it is
    n_max: Optional[int] = None  # images of the head class (class 0); null = the largest class count
    seed: int = 0  # the per-class shuffle's seed (the release: 0)


def is_active(args: LongTailArgs) -> bool:
    return args.ratio != 1 or args.n_max is not None


def long_tail_problems(args: LongTailArgs, n_classes: Optional[int] = None) -> list[str]:
    """Problems found without reading data; with ``n_classes`` and ``n_max`` known, also empty classes."""
    problems = []
    if not (math.isfinite(args.ratio) and args.ratio >= 1):
        problems.append(f"{KEY}.ratio: must be a finite number >= 1 (n_max / n_min; 1 = off), got {args.ratio}; "
                        f"the release's imb_factor 0.01 is ratio 100")
    if args.n_max is not None and args.n_max < 1:
        problems.append(f"{KEY}.n_max: must be >= 1 or null (the largest class), got {args.n_max}")
    if not 0 <= args.seed <= MAX_SEED:
        problems.append(f"{KEY}.seed: must be in 0..{MAX_SEED}, got {args.seed}")
    if not problems and n_classes is not None and args.n_max is not None:
        problems += empty_class_problems(profile(args.n_max, n_classes, args.ratio), args)
    return problems


def profile(n_max: int, n_classes: int, ratio: float, exponent_offset: float = 0.0) -> list[int]:
    """Images per class: int(n_max * (1/ratio) ** (i / (K - 1 + exponent_offset))) for i = 0..K-1."""
    if n_classes == 1:
        return [int(n_max)]
    denominator = n_classes - 1 + exponent_offset
    return [int(n_max * (1 / ratio) ** (i / denominator)) for i in range(n_classes)]


def empty_class_problems(counts: Sequence[int], args: LongTailArgs) -> list[str]:
    empty = [i for i, count in enumerate(counts) if count < 1]
    if not empty:
        return []
    # the profile decreases, so the empty classes are the last ones
    last = len(counts) - 1
    which = f"class {last}" if empty[0] == last else f"classes {empty[0]}..{last}"
    return [f"{KEY}: {which} would keep int(n_max * ratio ** (-i / (K - 1))) = 0 images with n_max {counts[0]} "
            f"and ratio {args.ratio:g}; raise n_max or lower ratio"]


def class_sizes(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]


def target_counts(available: Sequence[int], args: LongTailArgs, exponent_offset: float = 0.0) -> list[int]:
    """The profile for classes with ``available`` images each; a DatasetError when it cannot be met."""
    problems = long_tail_problems(args)
    if problems:
        raise DatasetError(problems[0])
    n_max = args.n_max if args.n_max is not None else int(max(available))
    counts = profile(n_max, len(available), args.ratio, exponent_offset)
    problems = empty_class_problems(counts, args)
    if problems:
        raise DatasetError(problems[0])
    short = [i for i, (want, have) in enumerate(zip(counts, available)) if want > have]
    if short:
        i = short[0]
        raise DatasetError(f"{KEY}: class {i} has {available[i]} images but the profile wants {counts[i]} "
                           f"(n_max {n_max}, ratio {args.ratio:g}; {len(short)} of {len(counts)} classes fall short); "
                           f"lower n_max or ratio")
    return counts


def select_shuffled(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Indices keeping counts[c] images of each class c: one RandomState(seed) shuffles each class in turn."""
    labels = np.asarray(labels, dtype=np.int64)
    # a stable sort lists each class's indices in item order, like np.where(labels == c), in one pass
    by_class = np.argsort(labels, kind="stable")
    ends = np.cumsum(np.bincount(labels, minlength=len(counts)))
    starts = ends - np.bincount(labels, minlength=len(counts))
    random = np.random.RandomState(seed)
    chosen = []
    for label, count in enumerate(counts):
        indices = by_class[starts[label]:ends[label]].copy()
        random.shuffle(indices)
        chosen.append(indices[:count])
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def long_tail_indices(labels: np.ndarray, n_classes: int, args: LongTailArgs) -> Optional[np.ndarray]:
    """The item indices of the long-tailed subset (the release's shuffled choice), or None when it is off."""
    if not is_active(args):
        return None
    counts = target_counts(class_sizes(labels, n_classes), args)
    return select_shuffled(labels, counts, args.seed)
