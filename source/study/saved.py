"""A study's state kept with the code (the study file's ``saved_state`` folder), so that it outlives the machine: a
fresh checkout continues the study where the last chunk taken back (or run here) left it, instead of starting over.

The folder holds the chunk history (``chunks.jsonl``, plain text) and one xz tar per setting of that setting's run
folders and console logs: what a chunk continues from (configs, logs, the snapshots a later chunk needs) and what
the report reads (spectra, sample grids); not tensorboard files or generator exports, and not a done run's last
snapshot (2.4 MB a run of the GPU study, which a device call carries in its 64 MiB): its ``done.json`` record says
where it ended (``state.DONE``); a branch's snapshot in its parent stays. Written after every command that changed the
study's default folder (``run``, ``take-back``); read back into that folder when its history is a beginning of the
saved one (none at all, in a fresh checkout). The files may come from someone else: unpacked with the checks of a
returned archive (``extract``), every snapshot opened first.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from source.files import atomic_write
from source.study import state
from source.study.archive import TransferError, extract, write_archive
from source.study.spec import Study
from source.training.checkpoint import snapshot_iteration, snapshots_of
from source.study.received import check_history, check_snapshots
from source.study.transfer import MOST_HISTORY, chunk_history

HISTORY = "chunks.jsonl"
SKIPPED = {"tb"}  # tensorboard files: the logs hold the same numbers


def save(study: Study, root: Path, folder: Path) -> int:
    """Write ``root``'s state into ``folder`` (each archive whole or not at all, the history last); returns the bytes
    written."""
    folder.mkdir(parents=True, exist_ok=True)
    needed, written = state.needed_snapshots(study, root, done_runs_last=False), 0
    for run in study.runs:  # a done run's last snapshot stays here: its record says where it ended
        if state.status(study, root, run) == "done" and (last := snapshots_of(state.run_folder(root, run))[-1:]):
            record = json.dumps({"iteration": snapshot_iteration(last[0])})
            atomic_write(state.run_folder(root, run) / state.DONE, lambda handle: handle.write(record.encode()))
    for setting in study.spec.settings:
        paths = [path for run in study.runs if run.setting == setting for path in
                 (state.run_folder(root, run), state.console_log(root, run), state.failure_marker(root, run))]
        files = [file for file in _files(paths) if not SKIPPED & set(file.relative_to(root).parts)
                 and (snapshot_iteration(file) is None or file in needed)]
        archive = folder / f"{setting}.tar.xz"
        if not files:
            archive.unlink(missing_ok=True)
            continue
        partial = folder / f".{setting}.tar.xz.partial"
        try:
            os.replace(write_archive(files, root, partial), archive)
        finally:
            partial.unlink(missing_ok=True)
        written += archive.stat().st_size
    history = root / HISTORY
    data = history.read_bytes() if history.is_file() else b""
    atomic_write(folder / HISTORY, lambda handle: handle.write(data))
    return written


def _files(paths: list[Path]) -> list[Path]:
    """The files under ``paths`` (folders or files), generator exports and dot files (locks) aside."""
    found = []
    for path in paths:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []:
            if file.is_file() and not file.name.startswith(("generator_iter_", ".")):
                found.append(file)
    return found


def restore(study: Study, root: Path, folder: Path) -> int:
    """Unpack the saved state into ``root`` where it is newer (``root``'s history a beginning of the saved one);
    returns the chunks it added (0: ``root`` is as new, or newer and not yet saved). Histories that part ways are
    a TransferError: neither is thrown away."""
    data = _saved_history(folder)
    saved, here = chunk_history(root, data), chunk_history(root)
    if saved[:len(here)] != here[:len(saved)]:
        raise TransferError(f"{root} ({len(here)} chunks) and the saved state in {folder} ({len(saved)} chunks) "
                            f"have different histories: continue one of them (--root for the other, or move {root} "
                            "away)")
    if len(saved) <= len(here):
        return 0
    check_history(saved, f"{folder / HISTORY}")
    for setting in study.spec.settings:
        archive = folder / f"{setting}.tar.xz"
        if archive.is_file():
            extract(archive, root, lambda opened, setting=setting, archive=archive:
                    _check_archive(opened, study, setting, archive))
    atomic_write(root / HISTORY, lambda handle: handle.write(data))  # last: an interrupted restore is done again
    return len(saved) - len(here)


def newer(root: Path, folder: Path) -> bool:
    """Whether the saved state holds chunks ``root`` lacks (``restore`` would unpack it)."""
    return len(chunk_history(root, _saved_history(folder))) > len(chunk_history(root))


def _saved_history(folder: Path) -> bytes:
    history = folder / HISTORY
    if not history.is_file():
        return b""
    if history.stat().st_size > MOST_HISTORY:
        raise TransferError(f"{history}: {history.stat().st_size:,} bytes, over the {MOST_HISTORY:,} a study's chunk "
                            "history takes; nothing was unpacked")
    return history.read_bytes()


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
