"""STL-10 from its binary release (``root/stl10_binary``), at 48 px, the size SNGAN and SRGANs train it at.

The release's ``{split}_X.bin`` files hold N images of 3 x 96 x 96 bytes, each channel stored column by
column (Matlab's order), and nothing else, so a file's size says how many images it holds; ``train_y.bin``
and ``test_y.bin`` hold one label byte (1..10) per image. The unlabeled split (100,000 images, the data GANs
train on) has no labels: it is one class here, every label 0.

Images are shrunk with PIL's bilinear filter (widened when shrinking, so no aliasing): what
torchvision's ``Resize((48, 48))`` does to an STL-10 image, as public SNGAN reproductions prepare the unlabeled
split (our references do not say which split or filter the papers used). All images are read, a chunk at a time,
and resized once, at construction, in threads (PIL releases the GIL): for the unlabeled split 20 s of CPU, 13 s on
the 2-core development machine, 0.69 GB held at 48 px (1.25 GB at the peak). A file holding more images than the
release's split is refused, so that is the most a file can make us hold.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from source.datasets.archives import Archive
from source.datasets.longtail import LongTailArgs, is_active, long_tail_indices, long_tail_problems
from source.datasets.transforms import DatasetError, resize_square, size_problems

BASE_FOLDER = "stl10_binary"
ARCHIVE = Archive("STL-10", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz",
                  "91f7769df0f17e558f3565bffb0c7dfb", BASE_FOLDER, remove_after_extracting=True)  # as torchvision's
SPLITS = ("unlabeled", "train", "test")
RELEASE_IMAGES = {"unlabeled": 100_000, "train": 5_000, "test": 8_000}
LABELLED = ("train", "test")
SOURCE_SIZE = 96
IMAGE_BYTES = 3 * SOURCE_SIZE * SOURCE_SIZE
N_CLASSES = 10
CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
CHUNK = 1000  # images per thread task: read and resized together (28 MB)


@dataclass
class STL10Args:
    root: str = "data/stl10"
    split: str = "unlabeled"
    size: int = 48
    download: bool = True  # its 113,000 images alone are 3.1 GB
    dequantize: bool = True
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)


def split_files(split: str) -> list[str]:
    return [f"{split}_X.bin"] + ([f"{split}_y.bin"] if split in LABELLED else [])


def stl10_value_problems(args: STL10Args) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLITS:
        return [f"dataset.args.split: must be one of {', '.join(SPLITS)}, got {args.split!r}"]
    if args.split not in LABELLED and is_active(args.long_tail):
        return [f"dataset.args.long_tail: the {args.split} split has no labels; a long tail needs split train or test"]
    return size_problems(args.size) + long_tail_problems(args.long_tail, N_CLASSES)


def check_stl10_args(args: STL10Args) -> list[str]:
    """Problems that would stop ``STL10(args)`` without a download attempt; reads no file."""
    return stl10_value_problems(args) or ARCHIVE.problems(args.root, split_files(args.split), args.download)


def stl10_download_pending(args: STL10Args) -> bool:
    """``STL10(args)`` would download first: files missing, download allowed."""
    return not stl10_value_problems(args) and ARCHIVE.download_pending(args.root, split_files(args.split),
                                                                       args.download)


def download_stl10(root: str) -> None:
    ARCHIVE.download(root, contents="the *_X.bin and *_y.bin files")


def count_images(path: str, split: str) -> int:
    """How many images a ``*_X.bin`` file holds, from its size (at most the release's count for the split)."""
    size = os.path.getsize(path)
    if size == 0 or size % IMAGE_BYTES:
        raise DatasetError(f"{path}: {size} bytes is not a whole number of STL-10 images ({IMAGE_BYTES} bytes each)")
    if size // IMAGE_BYTES > RELEASE_IMAGES[split]:
        raise DatasetError(f"{path}: {size // IMAGE_BYTES} images; the release's {split} split has "
                           f"{RELEASE_IMAGES[split]}")
    return size // IMAGE_BYTES


def read_images(path: str, start: int, count: int) -> np.ndarray:
    """Images ``start`` .. ``start + count`` of a ``*_X.bin`` file as uint8 count x 3 x 96 x 96 (C, H, W)."""
    stored = np.fromfile(path, dtype=np.uint8, count=count * IMAGE_BYTES, offset=start * IMAGE_BYTES)
    if len(stored) != count * IMAGE_BYTES:  # the file shrank since it was measured
        raise DatasetError(f"{path}: ends within image {start + len(stored) // IMAGE_BYTES}; read it again")
    return stored.reshape(count, 3, SOURCE_SIZE, SOURCE_SIZE).transpose(0, 1, 3, 2)  # channels stored by column


def read_labels(path: str, count: int) -> np.ndarray:
    """0-based labels of a ``*_y.bin`` file (the release numbers classes 1..10)."""
    size = os.path.getsize(path)  # a label per byte: counted before any is read
    if size != count:
        raise DatasetError(f"{path}: {size} labels for {count} images")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) and not 1 <= labels.min() <= labels.max() <= N_CLASSES:
        raise DatasetError(f"{path}: labels {labels.min()}..{labels.max()}; STL-10 numbers its classes 1..{N_CLASSES}")
    return labels - 1


def read_resized(path: str, count: int, size: int) -> np.ndarray:
    """uint8 count x 3 x size x size: the file's images through ``resize_square`` (PIL bilinear), in threads."""
    out = np.empty((count, 3, size, size), dtype=np.uint8)

    def read_chunk(start: int) -> None:
        for index, image in enumerate(read_images(path, start, min(CHUNK, count - start)), start):
            shrunk = resize_square(Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))), size)
            out[index] = np.asarray(shrunk).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(read_chunk, range(0, count, CHUNK)))  # list(): re-raises a thread's error
    return out


class STL10(Dataset):
    """Items are (uint8 tensor 3 x size x size, label); labels 0..9 (``classes`` names them) in the train and
    test splits, 0 for every image of the unlabeled split (``n_classes`` 1)."""

    channels = 3
    n_unreadable = 0  # all images are decoded at construction; the trainer logs it for every data set

    def __init__(self, args: STL10Args):
        problems = check_stl10_args(args)
        if problems:
            raise DatasetError(problems[0])
        if stl10_download_pending(args):
            download_stl10(args.root)
        folder = os.path.join(args.root, BASE_FOLDER)
        image_path = os.path.join(folder, f"{args.split}_X.bin")
        count = count_images(image_path, args.split)
        labelled = args.split in LABELLED
        labels = (read_labels(os.path.join(folder, f"{args.split}_y.bin"), count) if labelled
                  else np.zeros(count, dtype=np.int64))
        images = read_resized(image_path, count, args.size)
        keep = long_tail_indices(labels, N_CLASSES, args.long_tail) if labelled else None
        if keep is not None:
            images, labels = images[keep], labels[keep]
        self._images = torch.from_numpy(images)
        self.labels = labels
        self.n_classes = N_CLASSES if labelled else 1
        self.classes = list(CLASS_NAMES) if labelled else ["unlabeled"]
        self.size = args.size
        self.dequantize = args.dequantize

    def __len__(self) -> int:
        return len(self.labels)

    def in_memory_images(self) -> torch.Tensor:
        """Every item's image at once (uint8 N x 3 x size x size), for ``performance.data_on_device``."""
        return self._images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._images[index].clone(), int(self.labels[index])
