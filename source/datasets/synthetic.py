"""Generated class-conditional images for tests and smoke runs: no files, any size, any count.

Class c is a colour times a pattern of oriented stripes plus a soft blob. The stripes' angle and
frequency and the colour depend only on the class, so a conditional GAN has something to learn;
each sample draws its own stripe phase and blob position and radius from ``(seed, index)``, so
items are generated lazily, identically in every process, at no cost for large ``count``.

The ``test`` split draws from other streams ((seed, index, 1) instead of (seed, index)): the same
classes, other images, for a held-out reference. ``long_tail`` keeps a long-tailed subset of the
``count`` images (label = index mod n_classes) as for any labelled data set.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from source.datasets.longtail import LongTailArgs, is_active, long_tail_indices, long_tail_problems
from source.datasets.transforms import DatasetError

GOLDEN_FRACTION = (math.sqrt(5) - 1) / 2  # multiples of it spread class hues evenly, never repeating
SPLITS = ("train", "test")
TEST_STREAM = 1  # appended to (seed, index): the test split's images never repeat the train split's
IN_MEMORY_LIMIT = 2**31  # bytes: performance.data_on_device generates every image at once


@dataclass
class SyntheticArgs:
    n_classes: int = 10
    size: int = 32
    channels: int = 3
    count: int = 1024
    seed: int = 0
    dequantize: bool = False
    split: str = "train"
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)


def check_synthetic_args(args: SyntheticArgs) -> list[str]:
    problems = [f"dataset.args.{name}: must be positive, got {getattr(args, name)}"
                for name in ("n_classes", "size", "channels", "count") if getattr(args, name) < 1]
    if args.seed < 0:
        problems.append(f"dataset.args.seed: must be >= 0, got {args.seed}")
    if args.split not in SPLITS:
        problems.append(f"dataset.args.split: must be 'train' or 'test', got {args.split!r}")
    return problems + long_tail_problems(args.long_tail, args.n_classes if args.n_classes >= 1 else None)


def class_colour(label: int, channels: int) -> np.ndarray:
    """Per-channel gain in [0.2, 1): distinct for every class, channel by channel."""
    hue = GOLDEN_FRACTION * (label + 1)
    return 0.2 + 0.8 * np.mod(hue + np.arange(channels) / channels, 1.0)


def class_pattern(label: int, n_classes: int, phase: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Stripes in [0, 1] whose orientation (and frequency, cycles per side) identify the class."""
    angle = math.pi * label / n_classes
    frequency = 2 + label % 4
    along = x * math.cos(angle) + y * math.sin(angle)
    return 0.5 + 0.5 * np.cos(2 * math.pi * (frequency * along + phase))


def blob(centre_x: float, centre_y: float, radius: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * radius ** 2))


class SyntheticImages(Dataset):
    """Items are (uint8 tensor channels x size x size, label = index mod n_classes) or, with a long tail,
    those of the kept indices; ``labels`` holds every item's label."""

    n_unreadable = 0  # generated, never read; the trainer logs it for every data set

    def __init__(self, args: SyntheticArgs):
        problems = check_synthetic_args(args)
        if problems:
            raise DatasetError(problems[0])
        self.n_classes = args.n_classes
        self.channels = args.channels
        self.size = args.size
        self.dequantize = args.dequantize
        self._seed = args.seed
        self._test = args.split == "test"
        self._count, self._indices = args.count, None
        if is_active(args.long_tail):  # else nothing is listed: a huge count stays free
            self._indices = long_tail_indices(self.labels, self.n_classes, args.long_tail)
        centres = (np.arange(args.size) + 0.5) / args.size
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")

    @property
    def labels(self) -> np.ndarray:
        """Every item's label, computed when asked: a large ``count`` costs nothing until then."""
        indices = np.arange(self._count, dtype=np.int64) if self._indices is None else self._indices
        return indices % self.n_classes

    def class_counts(self) -> list[int]:
        """Items per class; without a long tail from ``count`` alone (labels cycle), never listing them."""
        if self._indices is not None:
            return np.bincount(self.labels, minlength=self.n_classes).tolist()
        whole, extra = divmod(self._count, self.n_classes)
        return [whole + (label < extra) for label in range(self.n_classes)]

    def __len__(self) -> int:
        return self._count if self._indices is None else len(self._indices)

    def in_memory_images(self) -> torch.Tensor:
        """Every item's image, generated at once (uint8 N x C x size x size), for ``performance.data_on_device``."""
        size = len(self) * self.channels * self.size ** 2
        if size > IN_MEMORY_LIMIT:
            raise DatasetError(f"performance.data_on_device: {len(self)} synthetic images would take "
                               f"{size / 2**30:.1f} GiB; hold at most {IN_MEMORY_LIMIT / 2**30:.0f} GiB "
                               f"(fewer dataset.args.count) or set performance.data_on_device: false")
        return torch.stack([self[index][0] for index in range(len(self))])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        source = index if self._indices is None else int(self._indices[index])
        label = source % self.n_classes
        stream = (self._seed, source, TEST_STREAM) if self._test else (self._seed, source)
        phase, centre_x, centre_y, radius = np.random.default_rng(stream).random(4)
        intensity = (0.6 * class_pattern(label, self.n_classes, phase, self._x, self._y)
                     + 0.4 * blob(0.2 + 0.6 * centre_x, 0.2 + 0.6 * centre_y, 0.05 + 0.1 * radius, self._x, self._y))
        image = class_colour(label, self.channels)[:, None, None] * intensity
        return torch.from_numpy(np.rint(255 * image).astype(np.uint8)), label
