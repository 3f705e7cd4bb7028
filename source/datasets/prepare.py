"""Prepare ImageNet once, so that training reads pixels instead of decoding JPEGs.

    python -m source.datasets.prepare imagenet --root /data/imagenet/train [--list-file F] --size 128 \\
        --out /data/imagenet128 [--workers N] [--force]
    python -m source.datasets.prepare verify /data/imagenet128

``imagenet`` runs the JPEG path's own scan and ``load_square_rgb`` on every image, in a process
pool, and writes the folder that the ``imagenet_prepared`` data set reads (layout in
source/datasets/prepared.py); train with ``--set dataset.name=imagenet_prepared --set
dataset.args.path=/data/imagenet128``. Unreadable files are left out and listed in the manifest
with the reason. The folder is assembled under a temporary name beside OUT and renamed at the end,
so an interrupted run never leaves an OUT that looks complete. ``verify`` re-hashes the arrays and
compares them with the manifest's checksums.

Exit status: 0 done, 1 verify found a mismatch, 2 bad input (one line on stderr), 130 interrupted.
"""
import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
from datetime import datetime, timezone
from typing import Iterator, Optional

import numpy as np
import PIL
import torch
from tqdm import tqdm

from source.datasets.imagenet import (
    UNREADABLE_ERRORS, FolderScan, ImageNetArgs, check_imagenet_args, index_images, load_square_rgb)
from source.datasets.prepared import (
    FORMAT, FORMAT_VERSION, IMAGES_FILE, LABELS_FILE, MANIFEST_FILE, PreparedImageNet, PreparedImageNetArgs,
    load_manifest, sha256_of)
from source.datasets.transforms import DatasetError, some
from source.models.generator import CHANNEL_MULTIPLIERS

PREPROCESSING = ("source.datasets.imagenet.load_square_rgb: PIL decode; Image.convert('RGB') (16-bit samples keep "
                 "their high byte); centre crop to the short side; PIL bilinear resize to size x size; no min-max "
                 "stretch (docs/reference/srgan.md section 7); uint8, channels first")
CHUNK = 64  # images per pool task: amortises the inter-process traffic without starving cores at the end
MAX_WORKERS = 512  # decoding processes; a pool asked for 10^20 kept starting them until it was killed
SYMLINK_REASON = "broken or looping symlink"
MODEL_RESOLUTIONS = tuple(sorted(CHANNEL_MULTIPLIERS))  # ResNetGenerator's (BigGAN's: these but 48)
OPTION_NAMES = {"root": "--root", "list_file": "--list-file", "size": "--size", "path": "OUT"}


def load_or_reason(path: str, size: int) -> tuple[Optional[np.ndarray], str]:
    """(uint8 3 x size x size, '') or (None, why the file cannot be read); runs in a pool worker."""
    try:
        return load_square_rgb(path, size).numpy(), ""
    except UNREADABLE_ERRORS as error:
        return None, f"{type(error).__name__}: {error}"


def init_worker() -> None:
    # One thread per worker, as in DataLoader workers: the pool already uses every core, and a torch
    # thread pool inherited through fork from a parent that ran parallel torch ops (a test session,
    # a notebook) deadlocks the child's first parallel op; with one thread torch never enters it.
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the parent stops the pool, workers need not print tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_all(paths: list[str], size: int, workers: int) -> Iterator[tuple[Optional[np.ndarray], str]]:
    """``load_or_reason`` of every path, in order, computed by a pool of ``workers`` processes."""
    chunk = max(1, min(CHUNK, len(paths) // (4 * workers)))
    with multiprocessing.Pool(workers, initializer=init_worker) as pool:
        results = pool.imap(functools.partial(load_or_reason, size=size), paths, chunksize=chunk)
        yield from tqdm(results, total=len(paths), desc="preparing", unit="img", file=sys.stderr)


class RowWriter:
    """Appends uint8 rows to a .npy file and hashes them; the header's row count is set when closing.

    numpy leaves room in a .npy header for the first dimension to grow to 21 digits, so rewriting the
    header with the final count (unknown until every image is decoded) does not move the data.
    """

    def __init__(self, path: str, capacity: int, row_shape: tuple):
        self.row_shape = row_shape
        self.count = 0
        self.digest = hashlib.sha256()
        self.file = open(path, "wb")
        self._write_header(capacity)
        self.data_offset = self.file.tell()

    def _write_header(self, rows: int) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, row: np.ndarray) -> None:
        self.file.write(row.data)
        self.digest.update(row.data)
        self.count += 1

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.file.seek(0)
            self._write_header(self.count)
            if self.file.tell() != self.data_offset:
                raise RuntimeError(f"{self.file.name}: the .npy header changed length; numpy no longer pads it")
        self.file.close()


def write_prepared(scan: FolderScan, source: dict, size: int, workers: int, folder: str) -> dict:
    """Decodes the scanned images into folder's arrays and writes its manifest, which it returns."""
    skipped = [{"path": path, "reason": SYMLINK_REASON} for path in scan.skipped]
    kept = []
    paths = [os.path.join(source["root"], path) for path in scan.paths]
    with RowWriter(os.path.join(folder, IMAGES_FILE), len(paths), (3, size, size)) as images:
        for index, (image, reason) in enumerate(decode_all(paths, size, workers)):
            if image is None:
                skipped.append({"path": scan.paths[index], "reason": reason})
            else:
                images.append(image)
                kept.append(index)
    if not kept:
        raise DatasetError(f"dataset.args.root: none of the {len(paths)} images can be read, e.g. "
                           f"{skipped[-1]['path']} ({skipped[-1]['reason']})")
    labels = np.asarray(scan.labels, dtype=np.int64)[kept]
    np.save(os.path.join(folder, LABELS_FILE), labels, allow_pickle=False)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source, "size": size,
        "images": len(kept), "n_classes": scan.n_classes, "classes": scan.classes,
        "class_counts": np.bincount(labels, minlength=scan.n_classes).tolist(), "skipped": skipped,
        "sha256": {"images": images.digest.hexdigest(), "labels": sha256_of(labels)},
        "preprocessing": PREPROCESSING, "versions": {"pillow": PIL.__version__, "numpy": np.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=1)
    return manifest


def check_output(out: str, force: bool) -> None:
    """OUT may be new or empty; --force replaces an earlier prepared folder, never any other folder."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise DatasetError(f"--out: {out} is a file; name a folder to create")
    if not os.listdir(out):
        return
    if not force:
        raise DatasetError(f"--out: {out} exists and is not empty; choose a new folder, or add --force to replace "
                           f"an earlier prepared one")
    try:  # any format version: an older prepared folder is what --force replaces
        prepared = load_manifest(os.path.join(out, MANIFEST_FILE)).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        prepared = False
    if not prepared:
        raise DatasetError(f"--out: {out} has no {FORMAT} {MANIFEST_FILE}, so it is not a prepared folder; "
                           f"--force only replaces those, remove it yourself if it should go")


def move_into_place(staging: str, out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):  # an earlier prepared folder, allowed by --force
        old = staging + ".old"
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old)
    else:
        os.rename(staging, out)  # replaces an empty folder


def prepare_imagenet(root: str, list_file: Optional[str], size: int, out: str, workers: int,
                     force: bool = False) -> dict:
    """Writes the prepared folder OUT from an ImageNet folder; returns its manifest."""
    problems = check_imagenet_args(ImageNetArgs(root=root, list_file=list_file, size=size))
    if not 1 <= workers <= MAX_WORKERS:  # a pool is started with this many processes, however few the images
        problems.append(f"--workers: must be in [1, {MAX_WORKERS}], got {workers}")
    if problems:
        raise DatasetError(problems[0])
    check_output(out, force)
    scan = index_images(root, list_file)
    source = {"root": os.path.abspath(root), "list_file": list_file and os.path.abspath(list_file)}
    parent = os.path.dirname(os.path.abspath(out))
    # beside OUT: same file system, so the final rename is atomic; the pid keeps concurrent runs apart
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run that had this pid
        os.mkdir(staging)
        manifest = write_prepared(scan, source, size, workers, staging)
        move_into_place(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):  # a full disk, no permission: the images themselves were read already
            raise DatasetError(f"--out: cannot write {out} ({error.strerror or error})") from None
        raise
    return manifest


def verify(folder: str) -> list[str]:
    """Checksum mismatches between folder's arrays and its manifest; empty when the copy is intact."""
    dataset = PreparedImageNet(PreparedImageNetArgs(path=folder))
    expected = dataset.manifest["sha256"]
    return [f"{name}: sha256 {actual}, but the manifest records {str(expected.get(name))[:80]!r}"
            for name, actual in dataset.checksums(progress=True).items() if actual != expected.get(name)]


def cli_message(error: Exception, command: str) -> str:
    """The data set's one-line message, naming this command's arguments instead of config keys."""
    names = {**OPTION_NAMES, "path": "FOLDER"} if command == "verify" else OPTION_NAMES
    return re.sub(r"dataset\.args\.(\w+)", lambda match: names.get(match[1], match[0]), str(error))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m source.datasets.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    imagenet = commands.add_parser("imagenet", help="decode, crop and resize an ImageNet folder into OUT")
    imagenet.add_argument("--root", required=True, help="the folder of nXXXXXXXX class folders")
    imagenet.add_argument("--list-file", help="'relative/path.JPEG label' lines, instead of the class folders")
    imagenet.add_argument("--size", type=int, default=128, help="side of the square images (default 128)")
    imagenet.add_argument("--out", required=True, help="the folder to write")
    imagenet.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    imagenet.add_argument("--force", action="store_true", help="replace OUT if it is an earlier prepared folder")
    check = commands.add_parser("verify", help="re-hash a prepared folder and compare with its manifest")
    check.add_argument("folder", metavar="FOLDER", help="a folder made by the imagenet command")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "verify":
            mismatches = verify(args.folder)
            print(f"{args.folder}: {'; '.join(mismatches) if mismatches else 'all checksums match'}")
            return 1 if mismatches else 0
        if args.size not in MODEL_RESOLUTIONS:  # said before hours of decoding (small sizes: quick checks)
            print(f"prepare: note: the models are built for {', '.join(map(str, MODEL_RESOLUTIONS))} px; no "
                  f"generator trains on {args.size} px images", file=sys.stderr)
        manifest = prepare_imagenet(args.root, args.list_file, args.size, args.out, args.workers, args.force)
    except DatasetError as error:
        print(f"prepare: error: {cli_message(error, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare: interrupted; OUT was not written", file=sys.stderr)
        return 130
    skipped = [entry["path"] for entry in manifest["skipped"]]
    print(f"{args.out}: {manifest['images']} images, {manifest['n_classes']} classes, {args.size} px; "
          f"{len(skipped)} skipped{': ' + some(skipped) if skipped else ''} (reasons in {MANIFEST_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
