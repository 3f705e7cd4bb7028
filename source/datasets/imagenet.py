"""ImageNet (ILSVRC2012 train) read from the original image files.

Two layouts:
  * class folders ``root/nXXXXXXXX/*.JPEG``: sorted folder names give labels 0..N-1, which for the
    1000 synsets is the original's ``dirname_to_label.txt`` mapping;
  * the original's list file: one ``relative/path.JPEG label`` line per image, paths relative to root.

Preprocessing follows SRGANs (reference/srgan.md §7) without its bugs (§11.9): PIL decode,
``Image.convert("RGB")`` (the original kept the first 3 of 4 channels, which gives wrong colours
for CMYK JPEGs), centre crop to the short side, bilinear resize to ``size``. The per-image min-max
contrast stretch hidden in ``scipy.misc.imresize`` is deliberately not reproduced.

Unreadable files never stop a run: each is warned about once, marked in a bitmap shared with the
DataLoader workers (so ``n_unreadable`` counts every distinct bad file, whichever process met it),
and replaced by the next readable index, so a given index always yields the same image.
"""
import ctypes
import logging
import multiprocessing
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from source.datasets.transforms import (
    DatasetError, center_crop_square, resize_square, size_problems, to_chw_uint8)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
# What PIL raises for truncated, corrupt, unknown-format or absurdly large files.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class ImageNetArgs:
    root: str
    list_file: Optional[str] = None
    size: int = 128
    dequantize: bool = True


def check_imagenet_args(args: ImageNetArgs) -> list[str]:
    """Problems that would stop ``ImageNet(args)``, found without listing or decoding any image."""
    problems = []
    if not os.path.exists(args.root):
        problems.append(
            f"dataset.args.root: {args.root} does not exist; download ImageNet ILSVRC2012 train and point "
            f"root at the folder of nXXXXXXXX class folders (or set list_file)")
    elif not os.path.isdir(args.root):
        problems.append(f"dataset.args.root: {args.root} is a file, not the folder of nXXXXXXXX class folders")
    if args.list_file is not None and not os.path.isfile(args.list_file):
        problems.append(
            f"dataset.args.list_file: {args.list_file} does not exist; write one 'nXXXXXXXX/name.JPEG label' "
            f"line per image (paths relative to root) or remove list_file to use root's class folders")
    return problems + size_problems(args.size)


def scan_class_folders(root: str) -> tuple[list[str], list[str], list[int]]:
    """(sorted class names, relative image paths, labels); lists directory entries, decodes nothing."""
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(entry.name for entry in os.scandir(os.path.join(root, name))
                       if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES)
        paths.extend(f"{name}/{file}" for file in files)
        labels.extend([label] * len(files))
    return classes, paths, labels


def read_list_file(list_file: str) -> tuple[list[str], list[int]]:
    """(relative image paths, labels) from ``path label`` lines; the path may contain spaces."""
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2 or not fields[1].isdigit():
                raise DatasetError(f"{list_file}:{number}: expected 'relative/path.JPEG label' with a label >= 0, "
                                   f"got {line.strip()!r}")
            paths.append(fields[0])
            labels.append(int(fields[1]))
    return paths, labels


def load_square_rgb(path: str, size: int) -> torch.Tensor:
    """Decode any PIL-readable image to uint8 RGB 3 x size x size (short-side centre crop, bilinear)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return to_chw_uint8(resize_square(center_crop_square(rgb), size))


class ImageNet(Dataset):
    """Items are (uint8 tensor 3 x size x size, label)."""

    channels = 3

    def __init__(self, args: ImageNetArgs):
        problems = check_imagenet_args(args)
        if problems:
            raise DatasetError(problems[0])
        if args.list_file is None:
            self.classes, paths, labels = scan_class_folders(args.root)
            self.n_classes = len(self.classes)
        else:
            paths, labels = read_list_file(args.list_file)
            self.classes = []
            self.n_classes = max(labels, default=-1) + 1
        if not paths:
            source = args.list_file or f"{args.root}/<class folder>/"
            raise DatasetError(f"dataset.args.root: no .JPEG/.jpeg/.jpg/.png images listed in {source}")
        self.root = args.root
        self.size = args.size
        self.dequantize = args.dequantize
        # Fixed-width bytes instead of a list of str: 1.28M Python strings in a forked worker get
        # copied page by page as reference counts change; one numpy buffer does not.
        self._paths = np.array([os.fsencode(path) for path in paths], dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._unreadable = multiprocessing.RawArray(ctypes.c_bool, len(paths))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            image = None if self._unreadable[candidate] else self._try_load(candidate)
            if image is not None:
                return image, int(self._labels[candidate])
        raise DatasetError(f"dataset.args.root: none of the {len(self)} images under {self.root} can be read")

    @property
    def n_unreadable(self) -> int:
        """Distinct files found unreadable so far, by this process or its DataLoader workers."""
        return int(np.frombuffer(self._unreadable, dtype=np.bool_).sum())

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def _try_load(self, index: int) -> Optional[torch.Tensor]:
        path = self.path(index)
        try:
            return load_square_rgb(path, self.size)
        except UNREADABLE_ERRORS as error:
            self._unreadable[index] = True
            logger.warning("skipping unreadable image %s (%s: %s); using the next readable one instead",
                           path, type(error).__name__, error)
            return None
