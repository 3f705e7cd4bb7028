"""ImageNet prepared once by ``python -m source.datasets.prepare``: a folder read through a memory map.

The folder holds
  * ``images.npy``: uint8 N x 3 x size x size, the JPEG path's ``load_square_rgb`` output, in
    scan order (sorted class folders and file names, or list-file order) less the unreadable files;
  * ``labels.npy``: int64 N;
  * ``manifest.json``: the source, size, counts, class names, the skipped files with their reason,
    sha256 checksums, the preprocessing and the format version.

Opening maps the array without reading it and checks its shape against the manifest (a truncated
copy fails here, in one line); the checksums are only compared by ``prepare verify``, since hashing
63 GB at every start would cost minutes. Nothing is unpickled: plain .npy files and JSON.

``split: val`` opens ``val_path`` (the validation images prepared into their own folder) instead of
``path``. ``long_tail`` keeps a long-tailed subset of the rows, chosen from ``labels.npy`` alone.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from source.datasets.longtail import LongTailArgs, long_tail_indices, long_tail_problems
from source.datasets.transforms import DatasetError, keys_renamed
from source.typed import first_line

FORMAT = "srgans-prepared-imagenet"
FORMAT_VERSION = 1
IMAGES_FILE, LABELS_FILE, MANIFEST_FILE = "images.npy", "labels.npy", "manifest.json"
MAX_MANIFEST_BYTES = 2**30
HASH_ROWS = 256  # images hashed per step: 12 MB at 128 px, so verify streams in constant memory
PREPARE_HINT = "python -m source.datasets.prepare imagenet --root ROOT --size SIZE --out PATH"
SPLITS = ("train", "val")


@dataclass
class PreparedImageNetArgs:
    path: str
    size: Optional[int] = None  # None: the manifest's; a number is checked against it
    dequantize: bool = True
    split: str = "train"  # val: open val_path instead of path
    val_path: Optional[str] = None
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)


def split_folder(args: PreparedImageNetArgs) -> str:
    return args.val_path if args.split == "val" else args.path


def load_manifest(path: str) -> object:
    """The JSON of a manifest that is a regular file (a FIFO would block, a link to /dev/zero fill the memory) of
    a manifest's size at most (one line per skipped image, even for all of ImageNet's)."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OSError(f"{path} is not a regular file")
    if os.path.isfile(path) and os.path.getsize(path) > MAX_MANIFEST_BYTES:
        raise OSError(f"{path} holds {os.path.getsize(path):,} bytes, more than a manifest ({MAX_MANIFEST_BYTES:,})")
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def read_manifest(folder: str) -> dict:
    """The folder's manifest, checked for the format and the keys the reader needs; else a DatasetError."""
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        manifest = load_manifest(path)
    except FileNotFoundError:
        raise DatasetError(f"dataset.args.path: {folder} has no {MANIFEST_FILE}, so it is not a prepared data set "
                           f"(or its preparation did not finish); make one with {PREPARE_HINT}") from None
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not UTF-8 or not JSON
        raise DatasetError(f"dataset.args.path: cannot read {path} ({first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"dataset.args.path: {path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        version = str(manifest.get("format_version"))[:20]
        raise DatasetError(f"dataset.args.path: {path} has format version {version!r}, this code reads version "
                           f"{FORMAT_VERSION}; prepare the data again with {PREPARE_HINT}")
    required = {"size": int, "images": int, "n_classes": int, "classes": list, "sha256": dict}
    wrong = [key for key, kind in required.items() if not isinstance(manifest.get(key), kind)
             or kind is int and (type(manifest[key]) is bool or not 0 < manifest[key] < MOST[key])]
    if wrong:
        raise DatasetError(f"dataset.args.path: {path} lacks valid {', '.join(wrong)}; prepare it again")
    if len(manifest["classes"]) not in (0, manifest["n_classes"]):  # none: labels from a list file
        raise DatasetError(f"dataset.args.path: {path} names {len(manifest['classes'])} classes for its n_classes "
                           f"{manifest['n_classes']}; prepare it again")
    return manifest


# bounds of a manifest's counts, which size tables before any image is read: below 10^5 classes, as the list files'
# labels (ImageNet-21k has 21841), 4096 px and 2^31 images
MOST = {"n_classes": 10**5, "size": 4097, "images": 2**31}


def size_mismatch(size: Optional[int], manifest: dict, folder: str) -> list[str]:
    if size is None or size == manifest["size"]:
        return []
    return [f"dataset.args.size: {size}, but {folder} holds {manifest['size']} px images; remove size, "
            f"or prepare a {size} px copy with {PREPARE_HINT}"]


def prepared_value_problems(args: PreparedImageNetArgs) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLITS:
        return [f"dataset.args.split: must be 'train' or 'val', got {args.split!r}"]
    if args.split == "val" and args.val_path is None:
        return [f"dataset.args.val_path: split 'val' needs a folder of prepared validation images ({PREPARE_HINT})"]
    return long_tail_problems(args.long_tail)


def check_prepared_args(args: PreparedImageNetArgs) -> list[str]:
    """Problems that would stop ``PreparedImageNet(args)``, found from the manifest alone."""
    problems = prepared_value_problems(args)
    if problems:
        return problems
    folder, key = split_folder(args), "dataset.args.val_path" if args.split == "val" else "dataset.args.path"
    if not os.path.isdir(folder):
        state = "is a file" if os.path.exists(folder) else "does not exist"
        return [f"{key}: {folder} {state}; it must be a folder made by {PREPARE_HINT}"]
    try:
        with keys_renamed({"path": key.removeprefix("dataset.args.")}):
            manifest = read_manifest(folder)
    except DatasetError as error:
        return [str(error)]
    missing = [name for name in (IMAGES_FILE, LABELS_FILE) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        return [f"{key}: {folder} lacks {', '.join(missing)}; prepare it again with {PREPARE_HINT}"]
    return size_mismatch(args.size, manifest, folder) + long_tail_problems(args.long_tail, manifest["n_classes"])


def open_array(path: str, shape: tuple, dtype: type, mmap: bool) -> np.ndarray:
    """The .npy at path (memory-mapped or read), which must have this shape and dtype; else a DatasetError.
    Mapped first in any case: a header that claims more than the file holds cannot be mapped, while reading it
    would allocate what it claims."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # a truncated file is too short to map: a ValueError
        reason = first_line(error)
        raise DatasetError(f"dataset.args.path: cannot read {path} ({reason}); the copy may be truncated: "
                           f"run python -m source.datasets.prepare verify on it, or prepare it again") from None
    if array.shape != shape or array.dtype != dtype:
        raise DatasetError(f"dataset.args.path: {path} holds {array.dtype} {array.shape} but the manifest says "
                           f"{np.dtype(dtype)} {shape}; the copy is incomplete or mixed up, prepare it again")
    return array if mmap else np.array(array)


def sha256_of(array: np.ndarray, description: str = "") -> str:
    """sha256 of a C-contiguous array's bytes (not the .npy header), read HASH_ROWS rows at a time."""
    digest = hashlib.sha256()
    with tqdm(total=len(array), desc=description, unit="img", disable=not description, leave=False) as progress:
        for start in range(0, len(array), HASH_ROWS):
            rows = np.ascontiguousarray(array[start:start + HASH_ROWS])
            digest.update(rows.data)
            progress.update(len(rows))
    return digest.hexdigest()


class PreparedImageNet(Dataset):
    """Items are (uint8 tensor 3 x size x size, label), read from the memory-mapped ``images.npy``;
    ``labels`` holds every item's label."""

    channels = 3
    n_unreadable = 0  # unreadable files were skipped when preparing; the manifest lists them

    def __init__(self, args: PreparedImageNetArgs):
        problems = check_prepared_args(args)
        if problems:
            raise DatasetError(problems[0])
        self.path = split_folder(args)
        with keys_renamed({"path": "val_path" if args.split == "val" else "path"}):
            self._open(args)

    def _open(self, args: PreparedImageNetArgs) -> None:
        self.manifest = read_manifest(self.path)
        self.size = self.manifest["size"]
        self.n_classes = self.manifest["n_classes"]
        self.classes = self.manifest["classes"]
        self.dequantize = args.dequantize
        self._images = self._open_images()
        self._labels = open_array(os.path.join(self.path, LABELS_FILE), (len(self._images),), np.int64, mmap=False)
        if len(self._labels) and not 0 <= self._labels.min() <= self._labels.max() < self.n_classes:
            raise DatasetError(f"dataset.args.path: {self.path}: labels outside 0..{self.n_classes - 1}; "
                               f"prepare it again")
        # the rows of images.npy that are items: all (None) or the long-tailed subset's
        self._rows = long_tail_indices(self._labels, self.n_classes, args.long_tail)
        self.labels = self._labels if self._rows is None else self._labels[self._rows]

    def _open_images(self) -> np.ndarray:
        shape = (self.manifest["images"], self.channels, self.size, self.size)
        return open_array(os.path.join(self.path, IMAGES_FILE), shape, np.uint8, mmap=True)

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped uint8 N x 3 x size x size array, mapped again where unpickled (see __getstate__)."""
        if self._images is None:
            self._images = self._open_images()
        return self._images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        row = index if self._rows is None else int(self._rows[index])
        # a copy: torch should not hold a read-only view of the map
        return torch.from_numpy(np.array(self.images[row])), int(self.labels[index])

    def checksums(self, progress: bool = False) -> dict[str, str]:
        """sha256 of the image and label arrays as the manifest records them; reads every byte."""
        return {"images": sha256_of(self.images, "hashing images" if progress else ""),
                "labels": sha256_of(self._labels)}

    def __getstate__(self) -> dict:
        # Pickling an np.memmap copies all of its data (63 GB for ImageNet at 128 px) into the
        # pickle; a DataLoader worker started by spawn or forkserver maps the file itself instead.
        # Forked workers never pickle the data set and share the parent's read-only map.
        return {**self.__dict__, "_images": None}
