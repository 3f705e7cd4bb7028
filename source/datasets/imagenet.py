"""ImageNet (ILSVRC2012 train) read from the original image files.

Two layouts:
  * class folders ``root/nXXXXXXXX/*.JPEG``: sorted folder names give labels 0..N-1, which for the
    1000 synsets is the original's ``dirname_to_label.txt`` mapping;
  * the original's list file: one ``relative/path.JPEG label`` line per image, paths relative to root.

Preprocessing follows SRGANs (docs/reference/srgan.md §7) without its bugs (§11.9): PIL decode,
``Image.convert("RGB")`` (the original kept the first 3 of 4 channels, which gives wrong colours
for CMYK JPEGs), centre crop to the short side, bilinear resize to ``size``. The per-image min-max
contrast stretch hidden in ``scipy.misc.imresize`` is deliberately not reproduced.

Unreadable files never stop a run: each is warned about once, marked in a bitmap shared with the
DataLoader workers (so ``n_unreadable`` counts every distinct bad file, whichever process met it),
and replaced by the next readable index, so a given index always yields the same image. Images over
``MAX_IMAGE_PIXELS`` count as unreadable without being decoded. The folder scan skips broken and
looping symlinks with one warning and counts them in ``n_skipped``; a class folder without images
is an error, since the model would sample its label with no real images behind it.

``split: val`` reads ``val_root`` (class folders, or ``val_list_file``) instead: the held-out
reference set. ``long_tail`` keeps a long-tailed subset of the indexed files
(source/datasets/longtail.py), chosen from the labels alone before anything is decoded.
"""
import ctypes
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from source.datasets.list_file import read_list_file, warn_label_gaps
from source.datasets.longtail import LongTailArgs, long_tail_indices, long_tail_problems
from source.datasets.transforms import (
    DatasetError, center_crop_square, keys_renamed, resize_square, size_problems, some, to_chw_uint8, to_rgb)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
# What PIL raises for truncated, corrupt, unknown-format or absurdly large files.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Checked on the header before decoding: 64 Mpixel (about 200 MB as RGB) is well above any ImageNet
# photo, and below Pillow's global limit, which other code may have raised or disabled.
MAX_IMAGE_PIXELS = 64 * 2**20
# the decoders tried, whatever the suffix says: ImageNet's JPEGs (one is a PNG), LSUN's WebPs, TIFF for 32-bit integer
# images. Not Pillow's other forty: EPS, for one, runs Ghostscript on the file's PostScript where it is installed
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF")
SPLITS = ("train", "val")


@dataclass
class ImageNetArgs:
    root: str
    list_file: Optional[str] = None
    size: int = 128
    dequantize: bool = True
    split: str = "train"  # val: val_root and val_list_file take the place of root and list_file
    val_root: Optional[str] = None
    val_list_file: Optional[str] = None
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)


def split_source(args: ImageNetArgs) -> tuple[str, Optional[str], str]:
    """(root, list file, the args' key prefix for them: '' or 'val_') of the split the args select."""
    if args.split == "val":
        return args.val_root, args.val_list_file, "val_"
    return args.root, args.list_file, ""


def imagenet_value_problems(args: ImageNetArgs) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLITS:
        return [f"dataset.args.split: must be 'train' or 'val', got {args.split!r}"]
    if args.split == "val" and args.val_root is None:
        return ["dataset.args.val_root: split 'val' needs the folder of validation images (class folders named "
                "like root's, or paths relative to it in val_list_file)"]
    return size_problems(args.size) + long_tail_problems(args.long_tail)


def check_imagenet_args(args: ImageNetArgs) -> list[str]:
    """Problems that would stop ``ImageNet(args)``, found without listing or decoding any image."""
    problems = imagenet_value_problems(args)
    if problems:
        return problems
    root, list_file, prefix = split_source(args)
    if not os.path.exists(root):
        problems.append(
            f"dataset.args.{prefix}root: {root} does not exist; download ImageNet ILSVRC2012 {args.split} and point "
            f"{prefix}root at the folder of nXXXXXXXX class folders (or set dataset.args.{prefix}list_file)")
    elif not os.path.isdir(root):
        problems.append(f"dataset.args.{prefix}root: {root} is a file, not the folder of nXXXXXXXX class folders")
    if list_file is not None and not os.path.isfile(list_file):
        problems.append(
            f"dataset.args.{prefix}list_file: {list_file} does not exist; write one 'nXXXXXXXX/name.JPEG label' "
            f"line per image (paths relative to {prefix}root) or remove {prefix}list_file to use "
            f"{prefix}root's class folders")
    return problems


def entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'other', or 'dangling' for a symlink that is broken or loops."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError:  # ELOOP: is_dir()/is_file() return False for a broken link but raise for a loop
        return "dangling"
    return "dangling" if entry.is_symlink() else "other"


def list_folder(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as error:
        raise DatasetError(f"dataset.args.root: cannot list {folder} ({error.strerror or error})") from None


@dataclass
class FolderScan:
    classes: list[str]  # sorted; the index is the label
    paths: list[str]  # relative to root
    labels: list[int]
    skipped: list[str]  # broken or looping symlinks that would have been a class folder or an image
    loose: list[str] = field(default_factory=list)  # images in root itself, which no class folder labels

    @property
    def n_classes(self) -> int:
        """A list file names no classes; its labels may skip some (see ``warn_label_gaps``)."""
        return len(self.classes) if self.classes else max(self.labels) + 1


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def scan_class_folders(root: str) -> FolderScan:
    """Lists directory entries (not recursively, so a symlink to a parent cannot loop); decodes nothing."""
    top = [(entry.name, entry_kind(entry)) for entry in list_folder(root) if not entry.name.startswith(".")]
    scan = FolderScan(sorted(name for name, kind in top if kind == "dir"), [], [],
                      sorted(name for name, kind in top if kind == "dangling"),
                      sorted(name for name, kind in top if kind == "file" and is_image_name(name)))
    for label, name in enumerate(scan.classes):
        images = sorted((entry.name, entry_kind(entry)) for entry in list_folder(os.path.join(root, name))
                        if is_image_name(entry.name))
        files = [f"{name}/{file}" for file, kind in images if kind == "file"]
        scan.paths.extend(files)
        scan.labels.extend([label] * len(files))
        scan.skipped.extend(f"{name}/{file}" for file, kind in images if kind == "dangling")
    return scan


def require_images(paths: list[str], source: str) -> None:
    if not paths:
        raise DatasetError(f"dataset.args.root: no .JPEG/.jpeg/.jpg/.png images listed in {source}")


def index_class_folders(root: str) -> FolderScan:
    """The scan of root's class folders; no images, or a class folder without any, is a DatasetError."""
    scan = scan_class_folders(root)
    if not scan.paths and scan.loose:
        raise DatasetError(f"dataset.args.root: the images lie in {root} itself ({some(scan.loose)}); labels come "
                           f"from class folders: move them into one (a single class; unconditional models: n_classes "
                           f"0) or list them in dataset.args.list_file")
    require_images(scan.paths, f"{root}/<class folder>/")
    empty = sorted(set(scan.classes) - {scan.classes[label] for label in set(scan.labels)})
    if empty:
        raise DatasetError(f"dataset.args.root: class folders with no images: {some(empty)} (under {root}); "
                           f"remove them or add .JPEG/.jpeg/.jpg/.png images")
    if scan.skipped:
        logger.warning("dataset.args.root: skipped %d broken or looping symlinks under %s: %s",
                       len(scan.skipped), root, some(scan.skipped))
    if scan.loose:
        logger.warning("dataset.args.root: %d images in %s itself are not in a class folder, so not read: %s",
                       len(scan.loose), root, some(scan.loose))
    return scan


def index_images(root: str, list_file: Optional[str]) -> FolderScan:
    """The images to read, from root's class folders or from list_file (whose scan names no classes)."""
    if list_file is None:
        return index_class_folders(root)
    paths, labels = read_list_file(list_file)
    require_images(paths, list_file)
    warn_label_gaps(list_file, labels)
    # nothing is skipped here: a missing or looping path is found when read, and counted as unreadable
    return FolderScan([], paths, labels, [])


def open_rgb(source: str | BinaryIO) -> Image.Image:
    """Decode a path or file object to 8-bit RGB; images over MAX_IMAGE_PIXELS are refused from the header."""
    with Image.open(source, formats=IMAGE_FORMATS) as image:  # reads the header only
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(
                f"{width}x{height} = {width * height} pixels, over the MAX_IMAGE_PIXELS limit of {MAX_IMAGE_PIXELS}")
        return to_rgb(image)


def load_square_rgb(path: str, size: int) -> torch.Tensor:
    """Decode any PIL-readable image to uint8 RGB 3 x size x size (short-side centre crop, bilinear)."""
    return to_chw_uint8(resize_square(center_crop_square(open_rgb(path)), size))


class SkipsUnreadable(Dataset):
    """Items whose image cannot be read are skipped: the next readable one (cyclically) is returned instead.

    Subclasses set ``labels`` and ``_unreadable`` (a shared RawArray of bools, so DataLoader workers' findings
    are counted once) and define ``_try_load(index) -> tensor or None`` and ``_nothing_readable()``.
    """

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            image = None if self._unreadable[candidate] else self._try_load(candidate)
            if image is not None:
                return image, int(self.labels[candidate])
        raise DatasetError(self._nothing_readable())

    @property
    def n_unreadable(self) -> int:
        """Distinct items found unreadable so far, by this process or its DataLoader workers."""
        return int(np.frombuffer(self._unreadable, dtype=np.bool_).sum())


class ImageNet(SkipsUnreadable):
    """Items are (uint8 tensor 3 x size x size, label); ``labels`` holds every item's label."""

    channels = 3
    root_key = "dataset.args.root"  # the key errors name: val_root for the val split

    def __init__(self, args: ImageNetArgs):
        problems = check_imagenet_args(args)
        if problems:
            raise DatasetError(problems[0])
        root, list_file, prefix = split_source(args)
        self.root_key = f"dataset.args.{prefix}root"
        with keys_renamed({"root": f"{prefix}root", "list_file": f"{prefix}list_file"}):
            self._index(index_images(root, list_file), root, args.size, args.dequantize, args.long_tail)

    def _index(self, scan: FolderScan, root: str, size: int, dequantize: bool, long_tail: LongTailArgs,
               n_classes: Optional[int] = None) -> None:
        """Keeps the scanned files (or their long-tailed subset) to read lazily; decodes nothing."""
        self.classes, self.n_skipped = scan.classes, len(scan.skipped)
        self.n_classes = scan.n_classes if n_classes is None else n_classes
        self.root = root
        self.size = size
        self.dequantize = dequantize
        labels = np.asarray(scan.labels, dtype=np.int64)
        keep = long_tail_indices(labels, self.n_classes, long_tail)
        paths = scan.paths if keep is None else [scan.paths[i] for i in keep]
        # Fixed-width bytes instead of a list of str: 1.28M Python strings in a forked worker get
        # copied page by page as reference counts change; one numpy buffer does not.
        self._paths = np.array([os.fsencode(path) for path in paths], dtype=np.bytes_)
        self.labels = labels if keep is None else labels[keep]
        self._unreadable = multiprocessing.RawArray(ctypes.c_bool, len(paths))

    def _nothing_readable(self) -> str:
        return f"{self.root_key}: none of the {len(self)} images under {self.root} can be read"

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
