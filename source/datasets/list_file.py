"""ImageNet's list file (the original's ``train.txt``): one ``relative/path.JPEG label`` line per image."""
import logging
import os
import re
from itertools import islice

from source.datasets.transforms import DatasetError, some

logger = logging.getLogger(__name__)

# not str.isdigit(): it accepts "²", which int() rejects. Below 10^5 classes (ImageNet-21k has 21841): a label
# sets n_classes, and per-class tables (counts, embeddings) are that long
LABEL = re.compile(r"[0-9]{1,5}")
MAX_PATH_BYTES = 4096  # the paths are held in one fixed-width array: one long path would widen every line


def decode_list_file(list_file: str) -> str:
    try:
        with open(list_file, "rb") as file:
            data = file.read()
    except OSError as error:
        raise DatasetError(f"dataset.args.list_file: cannot read {list_file} ({error.strerror or error})") from None
    try:
        # without removing a byte-order mark (some editors save one), it would become part of the first path
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(f"{list_file}:{line}: not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
                           f"save the list file as UTF-8") from None


def read_list_file(list_file: str) -> tuple[list[str], list[int]]:
    """(relative image paths, labels) from ``path label`` lines; the path may contain spaces."""
    paths, labels = [], []
    # splitlines(), unlike a text file's lines, would also split at form feeds and other separators
    lines = decode_list_file(list_file).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not LABEL.fullmatch(fields[1]):
            raise DatasetError(f"{list_file}:{number}: expected 'relative/path.JPEG label' with a label of 0 to "
                               f"99999, got {line.strip()[:200]!r}")
        if len(os.fsencode(fields[0])) > MAX_PATH_BYTES:
            raise DatasetError(f"{list_file}:{number}: a path of {len(os.fsencode(fields[0]))} bytes, over the "
                               f"{MAX_PATH_BYTES} a file system allows")
        if os.path.isabs(fields[0]) or ".." in fields[0].replace("\\", "/").split("/"):
            raise DatasetError(f"{list_file}:{number}: {fields[0][:200]!r}: a list file names images inside the "
                               f"root, relative to it and without '..'")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    return paths, labels


def warn_label_gaps(list_file: str, labels: list[int]) -> None:
    """A warning, not an error: a subset of the 1000 synsets may keep the original labels on purpose."""
    present = set(labels)
    n_classes = max(present) + 1
    if len(present) < n_classes:
        missing = list(islice((label for label in range(n_classes) if label not in present), 5))
        logger.warning("dataset.args.list_file: %s: labels %s have no images, yet n_classes is %d "
                       "(the largest label + 1) and a conditional model samples them all", list_file,
                       some(missing, total=n_classes - len(present)), n_classes)
