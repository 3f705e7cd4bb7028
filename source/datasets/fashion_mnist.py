"""Fashion-MNIST from its idx files: the CPU demo's real, labelled data set.

The Debian package ``dataset-fashion-mnist`` installs the four ``*-idx?-ubyte.gz`` files in
/usr/share/datasets/fashion-mnist, which works offline; ``download: true`` falls back to
torchvision, whose files land in ``root/FashionMNIST/raw`` and are read from there.

The 28x28 images are zero-padded to 32x32 (zero is the background, and 32 suits the
SNGAN 32x32 models); a different ``size`` resizes the padded image bilinearly.

``long_tail: {ratio: 100}`` on the train split keeps 6000, 3596, ..., 60 images per class
(source/datasets/longtail.py); the test split is its balanced evaluation set.
"""
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from source.datasets.longtail import LongTailArgs, long_tail_indices, long_tail_problems
from source.datasets.transforms import DatasetError, resize_square, size_problems, to_chw_uint8
from source.typed import first_line

SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
SOURCE_SIZE = 28
PADDED_SIZE = 32
IDX_UNSIGNED_BYTE = 0x08
MAX_IDX_VALUES = 2 * 10**8  # Fashion-MNIST's training images: 47 million
N_CLASSES = 10


@dataclass
class FashionMNISTArgs:
    root: str = "/usr/share/datasets/fashion-mnist"
    split: str = "train"
    size: int = 32
    download: bool = False
    dequantize: bool = True
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)


def idx_file_names(split: str) -> tuple[str, str]:
    prefix = SPLIT_PREFIXES[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def find_idx_file(root: str, name: str) -> Optional[str]:
    """The gzipped or plain file in root or in torchvision's download folder, if any."""
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        for candidate in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)):
            if os.path.isfile(candidate):
                return candidate
    return None


def fashion_mnist_value_problems(args: FashionMNISTArgs) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLIT_PREFIXES:
        return [f"dataset.args.split: must be 'train' or 'test', got {args.split!r}"]
    return size_problems(args.size) + long_tail_problems(args.long_tail, N_CLASSES)


def check_fashion_mnist_args(args: FashionMNISTArgs) -> list[str]:
    """Problems that would stop ``FashionMNIST(args)``; looks for the files, reads none."""
    problems = fashion_mnist_value_problems(args)
    if problems:
        return problems
    missing = [name + ".gz" for name in idx_file_names(args.split) if find_idx_file(args.root, name) is None]
    if missing and not args.download:
        problems.append(
            f"dataset.args.root: Fashion-MNIST files {', '.join(missing)} not found in {args.root}; install them "
            f"with `apt-get install dataset-fashion-mnist` (root /usr/share/datasets/fashion-mnist) "
            f"or set dataset.args.download: true")
    return problems


def read_idx(path: str) -> np.ndarray:
    """An idx file of unsigned bytes (the MNIST container format) as an array of its stated shape. Read no further
    than the header says, and at most MAX_IDX_VALUES: a small gzip file can unpack to gigabytes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            magic = file.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != IDX_UNSIGNED_BYTE:
                raise DatasetError(f"{path}: not an idx file of unsigned bytes")
            header = file.read(4 * magic[3])
            shape = struct.unpack(f">{magic[3]}I", header) if magic[3] and len(header) == 4 * magic[3] else None
            count = math.prod(shape) if shape is not None else -1  # Python's ints: numpy's would wrap around
            if not 0 <= count <= MAX_IDX_VALUES:
                raise DatasetError(f"{path}: an idx header for {shape or 'a cut-off shape'}: not Fashion-MNIST's")
            data = file.read(count + 1)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError; a bad deflate stream is not
        raise DatasetError(f"{path}: cannot read ({error})") from None
    if len(data) != count:
        raise DatasetError(f"{path}: expected {count} values for shape {shape}, found {len(data)}"
                           f"{' or more' if len(data) > count else ''}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def fashion_mnist_download_pending(args: FashionMNISTArgs) -> bool:
    """``FashionMNIST(args)`` would download first: files missing, download allowed."""
    return args.download and any(find_idx_file(args.root, name) is None for name in idx_file_names(args.split))


def download_fashion_mnist(root: str, split: str) -> None:
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(root, train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        reason = first_line(error)
        raise DatasetError(
            f"dataset.args.download: could not download Fashion-MNIST into {root} ({reason}); offline, "
            f"`apt-get install dataset-fashion-mnist` and set root: /usr/share/datasets/fashion-mnist") from None


class FashionMNIST(Dataset):
    """Items are (uint8 tensor 1 x size x size, label in 0..9); ``labels`` holds every item's label."""

    n_classes = N_CLASSES
    channels = 1
    n_unreadable = 0  # all images are decoded at construction; the trainer logs it for every data set

    def __init__(self, args: FashionMNISTArgs):
        problems = check_fashion_mnist_args(args)
        if problems:
            raise DatasetError(problems[0])
        image_name, label_name = idx_file_names(args.split)
        if fashion_mnist_download_pending(args):
            download_fashion_mnist(args.root, args.split)
        images = read_idx(find_idx_file(args.root, image_name))
        labels = read_idx(find_idx_file(args.root, label_name)).astype(np.int64)
        if images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE) or labels.shape != (len(images),):
            raise DatasetError(
                f"dataset.args.root: {args.root} holds {images.shape} images and {labels.shape} labels; "
                f"expected N x {SOURCE_SIZE} x {SOURCE_SIZE} images and N labels")
        if len(labels) and labels.max() >= N_CLASSES:
            raise DatasetError(f"dataset.args.root: {args.root} has label {labels.max()}; Fashion-MNIST has 0..9")
        keep = long_tail_indices(labels, self.n_classes, args.long_tail)
        margin = (PADDED_SIZE - SOURCE_SIZE) // 2  # padded once here: per item it was most of a batch's cost
        images = images if keep is None else images[keep]
        self._padded = torch.from_numpy(np.pad(images, ((0, 0), (margin, margin), (margin, margin))))
        self.labels = labels if keep is None else labels[keep]
        self.size = args.size
        self.dequantize = args.dequantize

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` at once (uint8 N x 1 x size x size, int64 N labels): what the loader would stack."""
        if self.size != PADDED_SIZE:  # resized item by item
            return default_collate([self[index] for index in indices])
        rows = torch.as_tensor(indices)  # index_select: half the time of indexing with a list
        return self._padded.index_select(0, rows).unsqueeze(1), torch.from_numpy(self.labels[rows.numpy()])

    def in_memory_images(self) -> torch.Tensor:
        """Every item's image at once (uint8 N x 1 x size x size), for ``performance.data_on_device``."""
        if self.size != PADDED_SIZE:
            return self.batch(list(range(len(self))))[0]
        return self._padded.unsqueeze(1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        padded = self._padded[index]
        if self.size != PADDED_SIZE:
            return to_chw_uint8(resize_square(Image.fromarray(padded.numpy()), self.size)), int(self.labels[index])
        return padded.unsqueeze(0).clone(), int(self.labels[index])
