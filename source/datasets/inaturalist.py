"""iNaturalist 2019 read from image lists, as gSR trains on it (docs/reference/gsr_studiogan.md A5).

The release builds ``iNaturalist19_train.txt`` and ``iNaturalist19_val.txt`` (classifier-balancing
``gen_lists.py``): one ``relative/path.jpg label`` line per image, paths relative to the data
root. ``train_list`` and ``val_list`` are absolute or relative to ``root``. The lists are read by
the ImageNet list loader, with its preprocessing, which is the release's CenterCropLongEdge + Resize:
the centred square of side = the short edge, bilinear resize to ``size`` (64 by default).

``n_classes`` is 1010 (iNaturalist 2019's categories) by default, so the train and val splits agree
even where a list lacks some labels; null infers it as the largest label + 1. The data are long-tailed
by nature: ``long_tail`` off (ratio 1) keeps them as listed; a profile is applied to the listed
label order, class 0 first, and must fit every class's count.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from source.datasets.imagenet import ImageNet, index_images
from source.datasets.longtail import LongTailArgs, long_tail_problems
from source.datasets.transforms import DatasetError, size_problems

SPLITS = ("train", "val")
N_CLASSES = 1010


@dataclass
class INaturalistArgs:
    root: str
    train_list: str = "iNaturalist19_train.txt"  # absolute, or relative to root
    val_list: str = "iNaturalist19_val.txt"
    split: str = "train"
    size: int = 64
    n_classes: Optional[int] = N_CLASSES  # null: the largest listed label + 1
    long_tail: LongTailArgs = field(default_factory=LongTailArgs)
    dequantize: bool = True


def list_path(args: INaturalistArgs) -> tuple[str, str]:
    """(path of the split's list file, its args key)."""
    key = "train_list" if args.split == "train" else "val_list"
    return os.path.join(args.root, getattr(args, key)), key  # join keeps an absolute list path as it is


def inaturalist_value_problems(args: INaturalistArgs) -> list[str]:
    """The args' own problems, whatever the files (config validation)."""
    if args.split not in SPLITS:
        return [f"dataset.args.split: must be 'train' or 'val', got {args.split!r}"]
    problems = size_problems(args.size) + long_tail_problems(args.long_tail, args.n_classes)
    if args.n_classes is not None and args.n_classes < 1:
        problems.append(f"dataset.args.n_classes: must be >= 1 or null (the largest label + 1), got {args.n_classes}")
    return problems


def check_inaturalist_args(args: INaturalistArgs) -> list[str]:
    """Problems that would stop ``INaturalist(args)``, found without reading the list."""
    problems = inaturalist_value_problems(args)
    if problems:
        return problems
    if not os.path.isdir(args.root):
        return [f"dataset.args.root: {args.root} is not a folder; point it at the iNaturalist 2019 folder the list "
                f"paths are relative to"]
    path, key = list_path(args)
    if not os.path.isfile(path):
        problems.append(f"dataset.args.{key}: {path} does not exist; write one 'relative/path.jpg label' line per "
                        f"image (the release's iNaturalist19_{args.split}.txt)")
    return problems


class INaturalist(ImageNet):
    """Items are (uint8 tensor 3 x size x size, label); ``labels`` holds every item's label."""

    def __init__(self, args: INaturalistArgs):
        problems = check_inaturalist_args(args)
        if problems:
            raise DatasetError(problems[0])
        path, key = list_path(args)
        scan = index_images(args.root, path)
        n_classes = scan.n_classes if args.n_classes is None else args.n_classes
        if max(scan.labels) >= n_classes:
            raise DatasetError(f"dataset.args.n_classes: {path} has label {max(scan.labels)}, but n_classes is "
                               f"{n_classes}; raise n_classes or set it to null (the largest label + 1)")
        self._index(scan, args.root, args.size, args.dequantize, args.long_tail, n_classes)
        self.list_file = path
