"""Data sets and the training iterator.

A config names a data set (``dataset: {name: imagenet, args: {...}}``); ``source.config`` checks the
args against the data set's args dataclass, ``build_dataset`` makes it. Every data set yields
(uint8 tensor C x size x size, int label) and has ``n_classes``, ``channels``, ``size``,
``dequantize``, ``n_unreadable`` (files skipped so far as unreadable, 0 where nothing is read
lazily) and ``labels`` (every item's label, in item order, known without decoding an image);
``InfiniteBatchIterator`` turns it into float batches in [-1, 1].

Every labelled data set takes ``long_tail: {ratio, n_max, seed}`` (source/datasets/longtail.py);
``class_counts`` and ``describe_class_counts`` report the result, and ``reference_args`` names the
balanced held-out split that long-tailed training data are evaluated against.
"""
import dataclasses
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from source.datasets.cifar10 import (CIFAR10, CIFAR10Args, check_cifar10_args, cifar10_download_pending,
                                    cifar10_value_problems)
from source.datasets.fashion_mnist import (FashionMNIST, FashionMNISTArgs, check_fashion_mnist_args,
                                          fashion_mnist_download_pending, fashion_mnist_value_problems)
from source.datasets.imagenet import ImageNet, ImageNetArgs, check_imagenet_args, imagenet_value_problems
from source.datasets.inaturalist import (INaturalist, INaturalistArgs, check_inaturalist_args,
                                        inaturalist_value_problems)
from source.datasets.iterator import InfiniteBatchIterator
from source.datasets.longtail import LongTailArgs
from source.datasets.lsun import LSUN, LSUNArgs, check_lsun_args, lsun_value_problems
from source.datasets.prepared import PreparedImageNet, PreparedImageNetArgs, check_prepared_args, prepared_value_problems
from source.datasets.stl10 import (STL10, STL10Args, check_stl10_args, stl10_download_pending,
                                   stl10_value_problems)
from source.datasets.synthetic import SyntheticArgs, SyntheticImages, check_synthetic_args
from source.datasets.transforms import DatasetError

# name -> (args dataclass, builder taking an instance of it)
DATASETS: dict[str, tuple[type, Callable[[Any], Dataset]]] = {
    "imagenet": (ImageNetArgs, ImageNet),
    "imagenet_prepared": (PreparedImageNetArgs, PreparedImageNet),  # made by python -m source.datasets.prepare
    "fashion_mnist": (FashionMNISTArgs, FashionMNIST),
    "cifar10": (CIFAR10Args, CIFAR10),
    "stl10": (STL10Args, STL10),
    "lsun": (LSUNArgs, LSUN),
    "inaturalist": (INaturalistArgs, INaturalist),
    "synthetic": (SyntheticArgs, SyntheticImages),
}

_CHECKS: dict[str, Callable[[Any], list[str]]] = {
    "imagenet": check_imagenet_args,
    "imagenet_prepared": check_prepared_args,
    "fashion_mnist": check_fashion_mnist_args,
    "cifar10": check_cifar10_args,
    "stl10": check_stl10_args,
    "lsun": check_lsun_args,
    "inaturalist": check_inaturalist_args,
    "synthetic": check_synthetic_args,
}

# the args' own problems, found without touching a file: config validation refuses them (a run, a dry run)
_VALUE_CHECKS: dict[str, Callable[[Any], list[str]]] = {
    "imagenet": imagenet_value_problems,
    "imagenet_prepared": prepared_value_problems,
    "fashion_mnist": fashion_mnist_value_problems,
    "cifar10": cifar10_value_problems,
    "stl10": stl10_value_problems,
    "lsun": lsun_value_problems,
    "inaturalist": inaturalist_value_problems,
    "synthetic": check_synthetic_args,  # nothing to look for on disk
}

_DOWNLOADS: dict[str, Callable[[Any], bool]] = {
    "fashion_mnist": fashion_mnist_download_pending,
    "cifar10": cifar10_download_pending,
    "stl10": stl10_download_pending,
}

# data sets that a name and a split fix (the standard files, which their loaders check): ``root`` says only where
# the files lie, so a run may move (source/training/resume.py: recipe_changes) and a reference keep its cache
# (metrics/reference.py)
STANDARD_FILES = ("fashion_mnist", "cifar10", "stl10")

# the values of each data set's ``split`` arg; the first is the training split, the last the held-out one
SPLITS: dict[str, tuple[str, ...]] = {
    "imagenet": ("train", "val"),
    "imagenet_prepared": ("train", "val"),
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "stl10": ("unlabeled", "train", "test"),
    "lsun": ("train", "eval"),
    "inaturalist": ("train", "val"),
    "synthetic": ("train", "test"),
}

# args that must be set before a split can be read: (data set, split) -> (arg, what it holds)
_SPLIT_NEEDS = {("imagenet", "val"): ("val_root", "the validation images' folder"),
                ("imagenet_prepared", "val"): ("val_path", "a prepared copy of the validation images")}


def _require_known(name: str, args: Any) -> None:
    if name not in DATASETS:
        # config validation suggests the closest name; this guards direct calls
        raise DatasetError(f"dataset.name: unknown dataset '{name}'; known: {', '.join(sorted(DATASETS))}")
    args_class = DATASETS[name][0]
    if not isinstance(args, args_class):
        raise TypeError(f"dataset '{name}' needs a {args_class.__name__}, got {type(args).__name__}")


def build_dataset(name: str, args: Any) -> Dataset:
    """The data set ``name`` built from its args dataclass; problems raise a one-line DatasetError."""
    _require_known(name, args)
    return DATASETS[name][1](args)


def check_dataset_args(name: str, args: Any) -> list[str]:
    """One-line problems that ``build_dataset`` would raise (missing files, bad values), found
    without listing folders or decoding anything, for ``--dry-run``; empty when all looks fine.
    A CIFAR-10, STL-10 or Fashion-MNIST download that is allowed but not yet done is not a problem here."""
    _require_known(name, args)
    return _CHECKS[name](args)


def value_problems(name: str, args: Any) -> list[str]:
    """Problems of the args themselves (bad values), whatever is on disk; empty when none."""
    _require_known(name, args)
    return _VALUE_CHECKS[name](args)


def download_pending(name: str, args: Any) -> bool:
    """``build_dataset`` would download the data first (CIFAR-10, STL-10, Fashion-MNIST: allowed, not yet done)."""
    _require_known(name, args)
    return name in _DOWNLOADS and _DOWNLOADS[name](args)


def reference_args(name: str, args: Any, split: str) -> Any:
    """The args of the held-out set that ``args``' (long-tailed) training data are evaluated against:
    a copy with ``split`` replaced and the long tail off. A DatasetError when the data set has no such split."""
    _require_known(name, args)
    if split not in SPLITS[name]:
        raise DatasetError(f"dataset '{name}' has no split '{split}'; its splits: {', '.join(SPLITS[name])}")
    needed = _SPLIT_NEEDS.get((name, split))
    if needed and getattr(args, needed[0]) is None:
        raise DatasetError(f"dataset '{name}': split '{split}' needs dataset.args.{needed[0]} ({needed[1]})")
    return dataclasses.replace(args, split=split, long_tail=LongTailArgs())


def class_counts(dataset: Dataset) -> list[int]:
    """Items per class (length ``n_classes``), from the data set's ``labels``; decodes no image."""
    own = getattr(dataset, "class_counts", None)
    if callable(own):  # a data set that knows its counts without listing labels (synthetic's huge counts)
        return list(own())
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise DatasetError(f"{type(dataset).__name__} has no labels array, so its class counts are unknown")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and not 0 <= labels.min() <= labels.max() < dataset.n_classes:
        raise DatasetError(f"{type(dataset).__name__}: labels {labels.min()}..{labels.max()} outside "
                           f"0..{dataset.n_classes - 1}")
    return np.bincount(labels, minlength=dataset.n_classes).tolist()


def classes_text(n_classes: int) -> str:
    return f"{n_classes} class{'' if n_classes == 1 else 'es'}"


def describe_class_counts(dataset: Dataset, shown: int = 10) -> str:
    """One line: every count for up to ``shown`` classes, else the first and last few and the median;
    rho = largest / smallest count, the imbalance ratio."""
    counts = class_counts(dataset)
    smallest, largest = min(counts), max(counts)
    rho = f"rho {largest / smallest:.1f}" if smallest else f"rho inf: {counts.count(0)} classes have no images"
    if len(counts) <= shown:
        return f"per class: {' '.join(map(str, counts))} ({rho})"
    head, tail = " ".join(map(str, counts[:3])), " ".join(map(str, counts[-3:]))
    return (f"per class ({len(counts)} classes, {sum(counts)} images): {head} ... {tail}; "
            f"max {largest}, median {np.median(counts):g}, min {smallest} ({rho})")


__all__ = ["DATASETS", "SPLITS", "STANDARD_FILES", "DatasetError", "InfiniteBatchIterator", "LongTailArgs", "build_dataset",
           "check_dataset_args", "class_counts", "classes_text", "describe_class_counts", "download_pending",
           "reference_args", "value_problems",
           "CIFAR10", "CIFAR10Args", "FashionMNIST", "FashionMNISTArgs", "ImageNet", "ImageNetArgs",
           "INaturalist", "INaturalistArgs", "LSUN", "LSUNArgs", "PreparedImageNet", "PreparedImageNetArgs",
           "STL10", "STL10Args",
           "SyntheticArgs", "SyntheticImages"]
