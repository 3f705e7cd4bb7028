"""What all datasets share: the user-facing error type and the image helpers.

Every dataset ends in a uint8 CHW tensor: DataLoader workers then move 4x fewer bytes than
float32, and a resumed run sees exactly the same pixels; the float conversion lives in the iterator.
"""
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from PIL import Image


# Pillow opens 16-bit greyscale PNGs as "I;16" (or, in older versions and for 16-bit PGM, "I":
# int32 holding 0..65535). convert("RGB") clips these at 255, so mid-grey would come out white.
# JPEG and PNG hold at most 16 bits per sample, so "I" is read as 16-bit data too.
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class DatasetError(Exception):
    """A user-facing problem with a data set (missing files, bad arguments); one-line message."""


@contextmanager
def keys_renamed(renames: dict[str, str]) -> Iterator[None]:
    """DatasetErrors raised inside name ``dataset.args.<new>`` where they said ``dataset.args.<old>``: the
    readers name the train split's keys (root, path), a val split reads val_root / val_path instead."""
    try:
        yield
    except DatasetError as error:
        message = str(error)
        for old, new in renames.items():  # the key wherever the message names it ("list them in dataset.args.X")
            message = re.sub(rf"dataset\.args\.{re.escape(old)}\b", f"dataset.args.{new}", message)
        raise DatasetError(message) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB; 16-bit samples keep their high byte (the inverse of v * 257)."""
    if image.mode in SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(samples.astype(np.uint8), "L")
    return image.convert("RGB")


def center_crop_square(image: Image.Image) -> Image.Image:
    """Crop the centred square whose side is the image's short side (SRGANs' preprocessing)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize to size x size; PIL widens the filter when shrinking, so there is no aliasing."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def to_chw_uint8(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or HW / HWC uint8 array -> contiguous uint8 tensor C x H x W."""
    array = np.array(image, dtype=np.uint8, copy=True)  # a copy: PIL buffers are read-only
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


MAX_SIDE = 4096  # 32 times the largest model's 128 px; a side of 10^5 made every resized image 30 GB


def size_problems(size: int) -> list[str]:
    return [] if 1 <= size <= MAX_SIDE else [f"dataset.args.size: must be in [1, {MAX_SIDE}] pixels, got {size}"]


def some(items: list, limit: int = 5, total: Optional[int] = None) -> str:
    """'a, b, c and 7 more': a one-line sample of a possibly huge list."""
    total = len(items) if total is None else total
    shown = ", ".join(str(item) for item in items[:limit])
    return shown if total <= limit else f"{shown} and {total - limit} more"
