"""The study runner's processes: each ``train.py`` leads a process group of its own, and a chunk records their ids
(``state.PIDS``) so that a later chunk can stop what a killed one left running, and nothing else; one command at a
time writes a study's folder (``root_lock``)."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from source.study.state import PIDS


def own_process_group() -> dict:
    """Popen's arguments for a child in a process group of its own: Ctrl-C at a terminal does not reach it (its
    parent stops it) and ``os.killpg`` ends it with what it started. Not a session of its own: the device machine
    ends a call's processes with the call, except those that started a new session, which would load the GPU of
    the next call."""
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot: /proc/PID/stat's 22nd field), None once it has ended
    (gone, or a zombie). With the pid, it tells a chunk's process from a later one that was given the same number."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def record_pids(root: Path, active: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    processes = {name: [process.pid, start_time(process.pid)] for name, (process, _) in active.items()}
    (root / PIDS).write_text(json.dumps(processes))


def stop_leftovers(root: Path, grace: float, echo) -> None:
    """Stop train.py processes a killed earlier chunk left running (each leads a process group of its own): those
    recorded whose pid still names a process started when it was recorded, not another one with that number."""
    path = root / PIDS
    if path.exists() and not path.is_file():
        raise StudyFolderError(f"{path} is not a file as a chunk writes it; move it out of the study's folder")
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, RecursionError):  # not what a chunk writes: nothing in it is stopped
        recorded = {}
    recorded = recorded.items() if isinstance(recorded, dict) else []
    leftovers = {tuple(entry): name for name, entry in recorded  # a group's runs share their process: stop it once
                 if isinstance(entry, list) and len(entry) == 2 and all(type(n) is int and 0 < n < 2**63
                                                                         for n in entry)}
    for (pid, started), name in leftovers.items():
        if start_time(pid) != started:
            continue
        echo(f"{name}: still running from an earlier chunk (pid {pid}); stopping it")
        os.kill(pid, signal.SIGTERM)
        end = time.time() + grace
        while start_time(pid) == started and time.time() < end:
            time.sleep(0.5)
        if start_time(pid) == started:
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)


ROOT_LOCK = ".chunk.lock"  # in the study's root, flock-ed while a command writes there


class StudyFolderError(RuntimeError):
    """Another command (a chunk, a take-back, a carry's pruning) is writing the study's folder, or it cannot be."""


@contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold the study folder's lock, or refuse: a second chunk would stop the first one's runs as if a killed chunk had
    left them, and a take-back during a chunk would unpack older files under its runs. Released when the process
    ends, however it ends."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(os.open(root / ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+")
    except OSError as error:
        raise StudyFolderError(f"{root}: cannot be written ({error.strerror or error})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another process"
            raise StudyFolderError(f"{root} is in use by {holder} (a chunk, take-back or carry of this study); wait "
                                   "for it to end, or stop it") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield


ROOT_STUDY = "study.json"  # the name of the study whose runs a study folder holds


def check_root(root: Path, study: str, claim: bool) -> None:
    """A study folder holds one study's runs: another study's folder (its ``study.json``), or a train.py run folder,
    is refused before anything is read as this study's state or written there; ``claim`` names an unnamed folder
    (inside the lock) for ``study``."""
    if (root / "log.jsonl").is_file() or (root / "config.yaml").is_file():
        raise StudyFolderError(f"--root {root} is a train.py run folder, not a study's folder (default: "
                               "results/<study name>)")
    marker = root / ROOT_STUDY
    try:
        named = json.loads(marker.read_text()).get("study") if marker.is_file() else None
    except (OSError, ValueError, RecursionError, AttributeError):
        raise StudyFolderError(f"{marker} is not as a study writes it; delete it if {root} is the study "
                               f"{study!r}'s folder") from None
    if named is not None and named != study:
        raise StudyFolderError(f"--root {root} holds the study {named!r}, not {study!r}: give that study's file, or "
                               "another --root")
    if claim and named is None:
        marker.write_text(json.dumps({"study": study}) + "\n")
