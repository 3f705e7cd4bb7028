"""Data sets and the training iterator.

A config names a data set (``dataset: {name: imagenet, args: {...}}``); ``source.config`` checks the
args against the data set's args dataclass, ``build_dataset`` makes it. Every data set yields
(uint8 tensor C x size x size, int label) and has ``n_classes``, ``channels``, ``size``,
``dequantize`` and ``n_unreadable`` (files skipped so far as unreadable, 0 where nothing is read
lazily); ``InfiniteBatchIterator`` turns it into float batches in [-1, 1].
"""
from typing import Any, Callable

from torch.utils.data import Dataset

from source.datasets.cifar10 import CIFAR10, CIFAR10Args, check_cifar10_args
from source.datasets.fashion_mnist import FashionMNIST, FashionMNISTArgs, check_fashion_mnist_args
from source.datasets.imagenet import ImageNet, ImageNetArgs, check_imagenet_args
from source.datasets.iterator import InfiniteBatchIterator
from source.datasets.prepared import PreparedImageNet, PreparedImageNetArgs, check_prepared_args
from source.datasets.synthetic import SyntheticArgs, SyntheticImages, check_synthetic_args
from source.datasets.transforms import DatasetError

# name -> (args dataclass, builder taking an instance of it)
DATASETS: dict[str, tuple[type, Callable[[Any], Dataset]]] = {
    "imagenet": (ImageNetArgs, ImageNet),
    "imagenet_prepared": (PreparedImageNetArgs, PreparedImageNet),  # made by python -m source.datasets.prepare
    "fashion_mnist": (FashionMNISTArgs, FashionMNIST),
    "cifar10": (CIFAR10Args, CIFAR10),
    "synthetic": (SyntheticArgs, SyntheticImages),
}

_CHECKS: dict[str, Callable[[Any], list[str]]] = {
    "imagenet": check_imagenet_args,
    "imagenet_prepared": check_prepared_args,
    "fashion_mnist": check_fashion_mnist_args,
    "cifar10": check_cifar10_args,
    "synthetic": check_synthetic_args,
}


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
    A CIFAR-10 or Fashion-MNIST download that is allowed but not yet done is not a problem here."""
    _require_known(name, args)
    return _CHECKS[name](args)


__all__ = ["DATASETS", "DatasetError", "InfiniteBatchIterator", "build_dataset", "check_dataset_args",
           "CIFAR10", "CIFAR10Args", "FashionMNIST", "FashionMNISTArgs", "ImageNet", "ImageNetArgs",
           "PreparedImageNet", "PreparedImageNetArgs", "SyntheticArgs", "SyntheticImages"]
