"""LSUN scene categories read from the official LMDB folders, and LSUN-LT (gSR).

``root`` holds ``<category>_train_lmdb`` folders as the official download unpacks them; class i is
``categories[i]``. Each LMDB maps an image id (bytes) to an encoded JPEG/WebP image. Keys are
listed once at construction in cursor order (only as many as the split uses; an LMDB's entry count
comes from its header) and kept in memory; values are decoded lazily with PIL, converted to RGB and
resized to size x size without a crop, as released (``Resize((s, s))``).

Splits, per category with N images in cursor order (E = ``eval_images``):
  * ``eval_overlap: false`` (default): ``eval`` is the LAST E images and ``train`` the N - E before
    them, so the two never share an image;
  * ``eval_overlap: true`` (the release): ``eval`` is the FIRST E images (the release's
    ``IMBALANCELSUN(imb_factor=1.0, max_samples=2000)``) and ``train`` all N, which overlap.

LSUN-LT: ``long_tail`` keeps the FIRST n_i images of each category's split, no shuffle (``seed``
is unused), with the release's profile n_i = int(n_max * (1/ratio) ** (i / (K - 1 + 1e-9))).
The release's settings are ``{ratio: 100, n_max: 50000}`` (50000/15811/5000/1581/500) at 64 px
and ``{ratio: 1000, n_max: 50000}`` (50000/8891/1581/281/50) at 128 px.

Corrupt or missing values are treated like unreadable ImageNet files: warned about once, counted in
``n_unreadable`` (shared with DataLoader workers) and replaced by the next readable item.

Each process opens an LMDB once, lazily (readonly, lock=False), and every LSUN data set in it shares
that environment: py-lmdb refuses to open a path twice in one process, and an environment must not
be used across a fork, so a forked DataLoader worker closes its inherited copies and opens its own.
"""
import ctypes
import importlib.util
import io
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from source.datasets.imagenet import UNREADABLE_ERRORS, SkipsUnreadable, open_rgb
from source.datasets.longtail import LongTailArgs, is_active, long_tail_problems, target_counts
from source.datasets.transforms import DatasetError, resize_square, size_problems, to_chw_uint8

logger = logging.getLogger(__name__)

DEFAULT_CATEGORIES = ("bedroom", "conference_room", "dining_room", "kitchen", "living_room")
SPLITS = ("train", "eval")
EXPONENT_OFFSET = 1e-9  # the release's LSUN profile divides by K - 1 + 1e-9
MISSING_LMDB = "dataset 'lsun' reads LMDB folders with the lmdb package, which is not installed: pip install lmdb"


@dataclass
class LSUNArgs:
    root: str
    categories: list[str] = field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    size: int = 64
    split: str = "train"
    eval_images: int = 2000  # per category, in the eval split
    eval_overlap: bool = False  # true: eval = the first eval_images of the train images, as released
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)
    dequantize: bool = True


def lmdb_folder(root: str, category: str) -> str:
    return os.path.join(root, f"{category}_train_lmdb")


def import_lmdb() -> Any:
    try:
        import lmdb
    except ImportError:
        raise DatasetError(MISSING_LMDB) from None
    return lmdb


def lsun_value_problems(args: LSUNArgs) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLITS:
        return [f"dataset.args.split: must be 'train' or 'eval', got {args.split!r}"]
    if not args.categories or len(set(args.categories)) != len(args.categories):
        return [f"dataset.args.categories: need one or more distinct categories, got {args.categories}"]
    problems = size_problems(args.size) + long_tail_problems(args.long_tail, len(args.categories))
    if args.eval_images < 1:
        problems.append(f"dataset.args.eval_images: must be >= 1, got {args.eval_images}")
    return problems


def check_lsun_args(args: LSUNArgs) -> list[str]:
    """Problems that would stop ``LSUN(args)``, found without opening any LMDB."""
    problems = lsun_value_problems(args)
    if problems:
        return problems
    if importlib.util.find_spec("lmdb") is None:
        problems.append(MISSING_LMDB)
    if not os.path.isdir(args.root):
        return problems + [f"dataset.args.root: {args.root} is not a folder; point it at the folder holding the "
                           f"<category>_train_lmdb folders of the LSUN download"]
    missing = [category for category in args.categories if not os.path.isdir(lmdb_folder(args.root, category))]
    if missing:
        problems.append(f"dataset.args.root: no {', '.join(f'{c}_train_lmdb' for c in missing)} folder in "
                        f"{args.root}; download LSUN (https://github.com/fyu/lsun) and unzip it there")
    return problems


_ENVS: dict[str, Any] = {}  # real path -> this process's open environment
_ENVS_PID: Optional[int] = None  # the process that opened them


def shared_env(path: str) -> Any:
    """This process's read-only environment of the LMDB folder ``path``, opened on first use."""
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for env in _ENVS.values():  # inherited through fork: close the child's copies, the parent keeps its own
            env.close()
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    key = os.path.realpath(path)
    if key not in _ENVS:
        _ENVS[key] = open_lmdb(path)
    return _ENVS[key]


def open_lmdb(path: str) -> Any:
    lmdb = import_lmdb()
    try:
        # readonly and lock=False: many readers (DataLoader workers) and read-only media are fine;
        # readahead=False: random access would otherwise read pages it never uses
        return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as error:
        raise DatasetError(f"dataset.args.root: {path} is not a readable LMDB ({error})") from None


def entry_count(env: Any) -> int:
    with env.begin(write=False) as txn:
        return txn.stat()["entries"]


def read_keys(env: Any, start: int, stop: int, total: int) -> list[bytes]:
    """Keys at cursor positions [start, stop), walking from whichever end is nearer."""
    with env.begin(write=False) as txn, txn.cursor() as cursor:
        if total - start < stop:  # fewer steps from the end: walk backwards, then restore the order
            if not cursor.last():
                return []
            keys = [key for _, key in zip(range(total - start), cursor.iterprev(keys=True, values=False))]
            return keys[::-1][:stop - start]
        if not cursor.first():
            return []
        keys = [key for _, key in zip(range(stop), cursor.iternext(keys=True, values=False))]
        return keys[start:]


def split_ranges(counts: list[int], args: LSUNArgs) -> list[tuple[int, int]]:
    """Cursor positions [start, stop) of each category's split, before the long tail; checks the sizes."""
    ranges = []
    held_out = 0 if args.eval_overlap else args.eval_images
    for category, count in zip(args.categories, counts):
        if count < max(args.eval_images, held_out + 1):
            rest = "" if args.eval_overlap else " and train on the rest"
            raise DatasetError(f"dataset.args.eval_images: {category} has {count} images, too few to take "
                               f"{args.eval_images} for the eval split{rest}; lower eval_images")
        if args.split == "train":
            ranges.append((0, count - held_out))
        else:
            ranges.append((0, args.eval_images) if args.eval_overlap else (count - args.eval_images, count))
    return ranges


def apply_long_tail(ranges: list[tuple[int, int]], long_tail: LongTailArgs) -> list[tuple[int, int]]:
    """The first n_i positions of each range (the release's choice), or the ranges when it is off."""
    if not is_active(long_tail):
        return ranges
    counts = target_counts([stop - start for start, stop in ranges], long_tail, EXPONENT_OFFSET)
    return [(start, start + n) for (start, _), n in zip(ranges, counts)]


def pack_keys(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """All keys in one uint8 buffer plus offsets: forked workers share it without copying (no refcounts)."""
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum([len(key) for key in keys], out=offsets[1:])
    return np.frombuffer(b"".join(keys), dtype=np.uint8).copy(), offsets


class LSUN(SkipsUnreadable):
    """Items are (uint8 tensor 3 x size x size, label = category index); ``labels`` holds every item's label."""

    channels = 3

    def __init__(self, args: LSUNArgs):
        problems = check_lsun_args(args)
        if problems:
            raise DatasetError(problems[0])
        self.classes = list(args.categories)
        self.n_classes = len(self.classes)
        self.size = args.size
        self.dequantize = args.dequantize
        self._folders = [lmdb_folder(args.root, category) for category in self.classes]
        envs = [shared_env(folder) for folder in self._folders]
        try:
            counts = [entry_count(env) for env in envs]
            ranges = apply_long_tail(split_ranges(counts, args), args.long_tail)
            keys = [read_keys(env, start, stop, count) for env, (start, stop), count in zip(envs, ranges, counts)]
        except import_lmdb().Error as error:  # a damaged database, not one bad image
            raise DatasetError(f"dataset.args.root: cannot list the LSUN LMDBs in {args.root} ({error})") from None
        for category, count, (start, stop), listed in zip(self.classes, counts, ranges, keys):
            if len(listed) != stop - start:  # the split would silently shrink, or a backward walk overlap another
                raise DatasetError(f"dataset.args.root: the {category} LMDB counts {count} entries, but its cursor "
                                   f"gave {len(listed)} of positions {start}..{stop - 1}; the database is damaged "
                                   "(rebuild or download it again)")
        self.labels = np.repeat(np.arange(self.n_classes, dtype=np.int64), [len(k) for k in keys])
        self._keys, self._offsets = pack_keys([key for class_keys in keys for key in class_keys])
        self._unreadable = multiprocessing.RawArray(ctypes.c_bool, len(self.labels))

    def _nothing_readable(self) -> str:
        return f"dataset.args.root: none of the {len(self)} LSUN images can be read"

    def key(self, index: int) -> bytes:
        return self._keys[self._offsets[index]:self._offsets[index + 1]].tobytes()

    def _try_load(self, index: int) -> Optional[torch.Tensor]:
        label = int(self.labels[index])
        key = self.key(index)
        try:
            with shared_env(self._folders[label]).begin(write=False) as txn:
                value = txn.get(key)
            if value is None:
                raise KeyError("no value stored under this key")
            return to_chw_uint8(resize_square(open_rgb(io.BytesIO(value)), self.size))
        except (*UNREADABLE_ERRORS, KeyError) as error:
            self._unreadable[index] = True
            logger.warning("skipping unreadable LSUN image %r in %s (%s: %s); using the next readable one instead",
                           key.decode(errors="replace"), self._folders[label], type(error).__name__, error)
            return None
