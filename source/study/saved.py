"""A study's state kept with the code (the study file's ``saved_state`` folder), so that it outlives the machine: a
fresh checkout continues the study where the last chunk taken back (or run here) left it, instead of starting over.

The folder holds the study's name (``study.json``), the chunk history (``chunks.jsonl``) and one xz tar per setting
of that setting's run folders and console logs: what a chunk continues from (configs, logs, the snapshots a later
chunk needs) and what the report reads (spectra, sample grids); not tensorboard files or generator exports, and not
a done run's last snapshot (2.4 MB a run of the GPU study, which a device call carries in its 64 MiB): its
``done.json`` record says where it ended (``state.DONE``); a branch's snapshot in its parent stays. Written after
every command that changed the study's default folder (``run``, ``take-back``) and whenever that folder is found
ahead of it (a save that failed); unpacked in place of the folder's state when the folder's history is a beginning
of the saved one (none at all, in a fresh checkout). The files may come from someone else: unpacked with the checks
of a returned archive (``extract``), every snapshot opened first.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

from source.config import first_line
from source.files import atomic_write
from source.study import state
from source.study.archive import TransferError, extract, write_archive
from source.study.received import check_history, check_snapshots
from source.study.spec import Study
from source.study.transfer import MOST_HISTORY, chunk_history, run_files
from source.training.checkpoint import snapshot_iteration, snapshots_of

HISTORY = "chunks.jsonl"
NAME = "study.json"  # {"study": NAME}: a saved state is one study's
SKIPPED = {"tb"}  # tensorboard files: the logs hold the same numbers
STAGING = ".restoring"  # in the root, while a restore unpacks (a dot folder: no listing or archive reads it)


def save(study: Study, root: Path, folder: Path) -> int:
    """Write ``root``'s state into ``folder``; returns the bytes of the archives. The archives are written under
    temporary names and renamed together, the history last: a save cut short leaves the history behind the root's,
    and the next command saves again (``behind``). A TransferError when the folder cannot be written."""
    try:
        return _save(study, root, folder)
    except OSError as error:
        raise TransferError(f"the study's state was not saved into {folder} ({first_line(error)}); {root} holds it, "
                            "and the next command on the study saves it once that is mended") from None


def _save(study: Study, root: Path, folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / NAME, json.dumps({"study": study.name}).encode())
    needed = state.needed_snapshots(study, root, done_runs_last=False)
    for run in study.runs:  # a done run's last snapshot stays out: its record says where it ended
        folder_of_run = state.run_folder(root, run)
        if state.status(study, root, run) == "done" and (last := snapshots_of(folder_of_run)[-1:]):
            _write(folder_of_run / state.DONE, json.dumps({"iteration": snapshot_iteration(last[0])}).encode())
    written = {}
    try:
        for setting in study.spec.settings:
            paths = [path for run in study.runs if run.setting == setting for path in state.run_paths(root, run)]
            files = [file for file in run_files(root, paths, SKIPPED)
                     if snapshot_iteration(file) is None or file in needed]
            if files:
                written[setting] = write_archive(files, root, folder / f".{setting}.tar.xz.partial")
        for stale in set(folder.glob("*.tar.xz")) - {folder / f"{setting}.tar.xz" for setting in written}:
            stale.unlink()  # a setting with nothing yet, or one the study file no longer names
        for setting, partial in written.items():
            os.replace(partial, folder / f"{setting}.tar.xz")
    finally:
        for partial in folder.glob(".*.tar.xz.partial"):
            partial.unlink()
    history = root / HISTORY
    _write(folder / HISTORY, history.read_bytes() if history.is_file() else b"")
    return sum((folder / f"{setting}.tar.xz").stat().st_size for setting in written)


def _write(path: Path, data: bytes) -> None:
    """``data`` into ``path`` unless it holds them already (an archive of unchanged files stays byte for byte)."""
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write(path, lambda handle: handle.write(data))


def restore(study: Study, root: Path, folder: Path) -> int:
    """Replace ``root``'s state with the saved one where that is newer (``root``'s history a beginning of the saved
    one); returns the chunks it added (0: ``root`` is as new, or ahead: ``behind``). Histories that part ways are a
    TransferError: neither is thrown away. The saved state is unpacked beside the root's first, every archive
    checked; then the root's run folders give way to it whole (files the history does not record, a killed chunk's
    snapshots, would otherwise mix with it) setting by setting, the history last: a restore cut short is done
    again."""
    data = _saved_history(folder, study)
    saved, here = chunk_history(root, data), chunk_history(root)
    if saved[:len(here)] != here[:len(saved)]:
        raise TransferError(f"{root} ({len(here)} chunks) and the saved state in {folder} ({len(saved)} chunks) "
                            f"have different histories: continue one of them (--root for the other, or move {root} "
                            "away)")
    if len(saved) <= len(here):
        return 0
    check_history(saved, f"{folder / HISTORY}")
    _check_complete(saved, study, folder)
    staging = Path(root) / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for setting in study.spec.settings:
        archive = folder / f"{setting}.tar.xz"
        if archive.is_file():
            extract(archive, staging, lambda opened, setting=setting, archive=archive:
                    _check_archive(opened, study, setting, archive))
    for setting in study.spec.settings:  # what else the root holds stays (its lock, a report's figures)
        ours, unpacked = Path(root) / setting, staging / setting
        if ours.is_dir() and not ours.is_symlink():
            shutil.rmtree(ours)
        if unpacked.is_dir():
            unpacked.rename(ours)
    shutil.rmtree(staging)
    atomic_write(Path(root) / HISTORY, lambda handle: handle.write(data))
    return len(saved) - len(here)


def newer(root: Path, folder: Path, study: Study) -> bool:
    """Whether the saved state holds chunks ``root`` lacks (``restore`` would unpack it)."""
    return len(chunk_history(root, _saved_history(folder, study))) > len(chunk_history(root))


def behind(root: Path, folder: Path, study: Study) -> bool:
    """Whether ``root`` holds chunks the saved state lacks (a save that failed or was cut short: ``save`` again)."""
    return len(chunk_history(root)) > len(chunk_history(root, _saved_history(folder, study)))


def _saved_history(folder: Path, study: Study) -> bytes:
    """The saved history, once the folder is known to be this study's (a copied study file would take another's)."""
    history, name = folder / HISTORY, folder / NAME
    try:
        made_for = json.loads(name.read_bytes()[:1024]).get("study") if name.is_file() else None
    except (ValueError, RecursionError, AttributeError):
        made_for = "unknown (its study.json is damaged)"
    if made_for is not None and made_for != study.name:
        raise TransferError(f"{folder} holds the saved state of the study {made_for!r}, not {study.name!r}: give "
                            "each study file a saved_state folder of its own")
    if not history.is_file():
        return b""
    if history.stat().st_size > MOST_HISTORY:
        raise TransferError(f"{history}: {history.stat().st_size:,} bytes, over the {MOST_HISTORY:,} a study's chunk "
                            "history takes; nothing was unpacked")
    return history.read_bytes()


def _check_complete(history: list[bytes], study: Study, folder: Path) -> None:
    """Every setting the history trained runs of has its archive (one left out of a commit would restart them)."""
    records = [json.loads(line) for line in history]  # each a mapping (check_history)
    trained = {name.split("/")[0] for record in records if isinstance(record.get("runs"), dict)
               for name in record["runs"]}
    missing = sorted(setting for setting in trained & set(study.spec.settings)
                     if not (folder / f"{setting}.tar.xz").is_file())
    if missing:
        raise TransferError(f"{folder}: its history trained runs of {', '.join(missing)} but holds no "
                            f"{missing[0]}.tar.xz (not committed?); nothing was unpacked")


def _check_archive(archive: tarfile.TarFile, study: Study, setting: str, path: Path) -> None:
    """A setting's archive holds that setting's runs only, and snapshots of the iterations their names say."""
    stray = next((m.name for m in archive.getmembers() if m.name.split("/")[0] != setting), None)
    if stray is not None:
        raise TransferError(f"{path}: {stray!r} is not of the setting {setting}; nothing was unpacked")
    check_snapshots(path, archive, study)


def digest(study: Study, folder: Path) -> str:
    """A fingerprint of the saved state (its history and archives), which names it as a carry's state would."""
    hashed = hashlib.sha256()
    for path in [folder / HISTORY, *(folder / f"{setting}.tar.xz" for setting in study.spec.settings)]:
        hashed.update(path.name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
    return hashed.hexdigest()


def size(folder: Path) -> int:
    """Bytes of the saved state's files."""
    return sum(path.stat().st_size for path in Path(folder).glob("*") if path.is_file())
