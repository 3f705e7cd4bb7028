"""CIFAR-10 in torchvision's on-disk format (``root/cifar-10-batches-py``).

torchvision downloads and verifies the archive; reading is done here. torchvision's own reader
checks the md5 of all six batch files and of ``batches.meta`` on every construction, even without
``download``, so it would refuse any stand-in and re-hash 180 MB per start. The format it checks
is simple: each batch is a pickled dict with ``data`` (N x 3072 uint8, channel-major, i.e.
already C x H x W) and ``labels``; ``batches.meta`` holds ``label_names``.

CIFAR-10-LT (gSR) is the train split with ``long_tail: {ratio: 100}``: 5000, 2997, ..., 50 images
(12,406), chosen as the release chose them (source/datasets/longtail.py); its balanced evaluation set
is the test split (``reference_args``).
"""
import io
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from source.datasets.archives import Archive
from source.datasets.longtail import LongTailArgs, long_tail_indices, long_tail_problems
from source.datasets.transforms import DatasetError
from source.files import colliding_numbers, plain_dtype
from source.typed import first_line

BATCH_FOLDER = "cifar-10-batches-py"
ARCHIVE = Archive("CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                  "c58f30108f718f92721af3b95e74349a", BATCH_FOLDER)  # as torchvision's CIFAR10
SPLIT_FILES = {"train": [f"data_batch_{number}" for number in range(1, 6)], "test": ["test_batch"]}
META_FILE = "batches.meta"
SIZE = 32
N_CLASSES = 10


@dataclass
class CIFAR10Args:
    root: str = "data/cifar10"
    split: str = "train"
    download: bool = True
    dequantize: bool = True
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)
    random_flip: bool = False  # a random horizontal flip per sample (gSR's CIFAR configs: on)


def split_files(split: str) -> list[str]:
    return SPLIT_FILES[split] + [META_FILE]


def cifar10_value_problems(args: CIFAR10Args) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLIT_FILES:
        return [f"dataset.args.split: must be 'train' or 'test', got {args.split!r}"]
    return long_tail_problems(args.long_tail, N_CLASSES)


def check_cifar10_args(args: CIFAR10Args) -> list[str]:
    """Problems that would stop ``CIFAR10(args)`` without a download attempt; reads no file."""
    return cifar10_value_problems(args) or ARCHIVE.problems(args.root, split_files(args.split), args.download)


def cifar10_download_pending(args: CIFAR10Args) -> bool:
    """``CIFAR10(args)`` would download first: files missing, download allowed."""
    return not cifar10_value_problems(args) and ARCHIVE.download_pending(args.root, split_files(args.split),
                                                                         args.download)


def download_cifar10(root: str) -> None:
    ARCHIVE.download(root, contents="data_batch_1..5, test_batch, batches.meta")


def _latin1(text: str, encoding: str) -> bytes:
    """How Python 3's protocol-2 pickles spell bytes (``_codecs.encode(text, 'latin1')``), that encoding only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return text.encode("latin1")


_ARRAY = object()  # what ``numpy.ndarray`` names in a batch: an argument of _reconstruct, never a constructor
_RECONSTRUCT, _FROMBUFFER = np.ndarray(0).__reduce__()[0], np.ndarray(0).__reduce_ex__(5)[0]


def _empty_array(subtype, shape, marker) -> np.ndarray:
    """numpy's pickled arrays start empty (``_reconstruct(ndarray, (0,), b'b')``); their state then brings the
    data, which must be as long as the shape says, so an array costs what the file holds."""
    if subtype is not _ARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError("an array that does not start empty")
    return _RECONSTRUCT(np.ndarray, (0,), marker)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, strings, numbers, numpy arrays) and nothing else: a
    pickle names the functions it calls, and a file from someone else could name any (``os.system``)."""

    ALLOWED = {("numpy", "ndarray"): _ARRAY, ("numpy", "dtype"): plain_dtype, ("_codecs", "encode"): _latin1,
               **{(module, "_reconstruct"): _empty_array  # Python 2's and numpy 1's pickles, numpy 2's
                  for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
               **{(module, "_frombuffer"): _FROMBUFFER  # pickle protocol 5: as long as its buffer
                  for module in ("numpy.core.numeric", "numpy._core.numeric")}}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it calls {module}.{name}, which a CIFAR-10 batch does not; "
                                         f"not loaded") from None


def read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as file:
            data = file.read()
        if problem := colliding_numbers(data):
            raise pickle.UnpicklingError(problem)
        return _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()  # latin1: pickled by Python 2
    except Exception as error:  # noqa: BLE001: a damaged or hostile file can fail in any way; say which file
        raise DatasetError(f"{path}: not a readable CIFAR-10 pickle ({first_line(error)})") from None


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 3 x 32 x 32, int64 labels N) of one batch file."""
    batch = read_pickle(path)
    data, labels = (batch.get("data"), batch.get("labels")) if isinstance(batch, dict) else (None, None)
    # checked before numpy reads them: nested lists that share their items would be copied out exponentially
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * SIZE * SIZE) or not (isinstance(labels, list)
                                                         and all(type(label) is int for label in labels)):
        raise DatasetError(f"{path}: not a CIFAR-10 batch, expected 'data' (N x 3072 uint8) and 'labels' (N ints)")
    if len(data) != len(labels):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, SIZE, SIZE), np.asarray(labels, dtype=np.int64)


def read_class_names(meta_path: str) -> list[str]:
    meta = read_pickle(meta_path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == N_CLASSES and all(isinstance(n, str) for n in names)):
        raise DatasetError(f"{meta_path}: expected a pickled dict with 'label_names' ({N_CLASSES} strings)")
    return names


class CIFAR10(Dataset):
    """Items are (uint8 tensor 3 x 32 x 32, label in 0..9); ``classes`` names the labels, ``labels``
    holds every item's label."""

    n_classes = N_CLASSES
    channels = 3
    size = SIZE
    n_unreadable = 0  # all images are decoded at construction; the trainer logs it for every data set

    def __init__(self, args: CIFAR10Args):
        problems = check_cifar10_args(args)
        if problems:
            raise DatasetError(problems[0])
        if cifar10_download_pending(args):
            download_cifar10(args.root)
        folder = os.path.join(args.root, BATCH_FOLDER)
        images, labels = zip(*(read_batch(os.path.join(folder, name)) for name in SPLIT_FILES[args.split]))
        images, labels = np.concatenate(images), np.concatenate(labels)
        if len(labels) and not 0 <= labels.min() <= labels.max() < N_CLASSES:
            raise DatasetError(f"dataset.args.root: {folder} has labels outside 0..{N_CLASSES - 1}")
        keep = long_tail_indices(labels, self.n_classes, args.long_tail)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        self._images = torch.from_numpy(images)
        self.labels = labels
        self.classes = read_class_names(os.path.join(folder, META_FILE))
        self.dequantize = args.dequantize
        self.random_flip = args.random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def in_memory_images(self) -> torch.Tensor:
        """Every item's image at once (uint8 N x 3 x 32 x 32), for ``performance.data_on_device``."""
        return self._images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._images[index].clone(), int(self.labels[index])
