"""A run folder belongs to one run.

A lock (``RUN/.lock``, flock) is held while a run writes into the folder, so a second run started with
the same ``--out`` stops at once. A fresh run never writes into a folder that holds anything; a resume
continues a run in place only from that run's own latest snapshot with unchanged settings (changes of how the
arithmetic runs, how often it records and where a standard data set's files lie aside:
``source.training.resume.recipe_changes``), and otherwise branches into a folder of its own (``RUN-resumeN``,
``RUN-resumeN-2``, ...), so no snapshot, config or log of another run is ever overwritten.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from source.files import first_hazard, remove_stale_temp_files
from source.training import checkpoint

LOCK_FILE = ".lock"


class RunFolderError(Exception):
    """A run folder that cannot be used (in use, not empty, not writable); one-line message."""


@dataclass
class Plan:
    """Where a run may write: ``first`` only, or the first usable of ``first``, ``first-2``, ``first-3``, ..."""
    first: Path
    only: bool              # an explicit --out, or the run's own folder
    in_place: bool = False  # continues the run already in the folder

    def candidates(self) -> Iterator[Path]:
        return iter([self.first]) if self.only else numbered(self.first)


@dataclass
class RunFolder:
    path: Path
    lock: IO
    created: bool

    def release(self) -> None:
        """Unlock; a folder this run created and never wrote into is removed again."""
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()
        if self.created and is_empty(self.path):
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.path.rmdir()


def is_empty(path: Path) -> bool:
    return not path.exists() or all(entry.name == LOCK_FILE for entry in path.iterdir())


def numbered(base: Path) -> Iterator[Path]:
    """base, base-2, base-3, ..."""
    yield base
    number = 2
    while True:
        yield base.with_name(f"{base.name}-{number}")
        number += 1


def plan_fresh(out: str | None, default: Path) -> Plan:
    """A new run: ``--out`` exactly (must be empty), or the first free folder of ``default``, ``default-2``, ..."""
    return Plan(Path(out), only=True) if out else Plan(default, only=False)


def plan_resume(out: str | None, snapshot_file: str, iteration: int, changed: bool, default: Path) -> Plan:
    """A resume continues the snapshot's run in place when it may (see the module docstring), else branches."""
    parent = checkpoint.run_folder_of(snapshot_file)
    latest = checkpoint.snapshots_of(parent)[-1:] if parent else []
    own_latest = bool(latest) and latest[0].resolve() == Path(snapshot_file).resolve()
    if parent is not None and own_latest and not changed and (out is None or Path(out).resolve() == parent):
        return Plan(parent, only=True, in_place=True)
    if out:
        if parent is not None and Path(out).resolve() == parent:
            reason = "the settings changed" if changed else \
                f"it has snapshots after iteration {iteration} (latest: {latest[0].name if latest else 'none'})"
            raise RunFolderError(f"--out {out}: the snapshot's own run cannot continue in place because {reason}; "
                                 "leave out --out to branch into a new folder, or give an empty one")
        return Plan(Path(out), only=True)
    base = parent or default
    return Plan(base.with_name(f"{base.name}-resume{iteration}"), only=False)


def claim(plan: Plan) -> RunFolder:
    """Lock the first usable candidate: in place, the run's own folder; otherwise one that is new or empty."""
    for path in plan.candidates():
        if path.is_symlink() and not plan.only:  # a numbered folder (a branch's) that a received bundle placed
            continue
        folder = _lock(path)
        if folder is None:
            if plan.in_place:
                raise RunFolderError(f"{path} is in use by another run ({_holder(path)}): the run is still going; "
                                     "stop it first (Ctrl-C writes a snapshot), or branch with another --out")
            if plan.only:
                raise RunFolderError(f"{path} is in use by another run ({_holder(path)}); choose another --out")
            continue
        if plan.in_place or is_empty(path):
            hazard = first_hazard(path)
            if hazard is not None:
                folder.release()
                raise RunFolderError(f"{hazard}; a run writes only into files of its own folder (a folder from "
                                     "elsewhere could point a log or snapshot write at any file, or block it)")
            remove_stale_temp_files(path)  # of writes killed in an earlier run of this folder; we hold the lock
            return folder
        folder.release()
        if plan.only:
            latest = checkpoint.snapshots_of(path)[-1:]
            resume = f"continue it with --resume {latest[0]}" if latest else "it holds no snapshot to continue from"
            raise RunFolderError(f"{path} already holds a run ({', '.join(_contents(path))}); choose another --out, "
                                 f"delete it, or {resume}")
    raise AssertionError("numbered() never ends")


def _lock(path: Path) -> RunFolder | None:
    """The folder, created if needed and locked by this process; None when another process holds it."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a run folder; choose another --out")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+")
    except OSError as error:
        if (path / LOCK_FILE).is_symlink():
            raise RunFolderError(f"{path / LOCK_FILE} is a symbolic link; a run writes only into files of its own "
                                 "folder (remove it)") from None
        raise RunFolderError(f"cannot create the run folder {path} ({error.strerror or error}); choose another "
                             "--out") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return RunFolder(path, handle, created)


def _holder(path: Path) -> str:
    try:
        return (path / LOCK_FILE).read_text().strip() or "unknown process"
    except OSError:
        return "unknown process"


def _contents(path: Path, limit: int = 4) -> list[str]:
    names = sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_FILE)
    return names[:limit] + ([f"{len(names) - limit} more"] if len(names) > limit else [])
