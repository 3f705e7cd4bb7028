"""A study's xz tar archives (a carry's state, a device call's returned files): written, and unpacked once checked.

An archive may come from someone else (a returned-files folder can be swapped), so ``extract`` unpacks nothing until
it has walked every header within bounds: files and folders only, plainly named, inside the study's root, none where
the other kind is or will be, at most MOST_MEMBERS of them and MOST_UNPACKED bytes. tarfile reads a GNU long-name
or pax record whole into memory, whatever size it claims, so a header is refused before that (``_PlainHeader``);
small pax records stay allowed: tarfile writes one for every file's fractional mtime.
"""
from __future__ import annotations

import io
import lzma
import os
import tarfile
from pathlib import Path
from typing import Callable

from source.config import first_line
from source.study.state import PIDS

MOST_COMPRESSED = 64 * 2**20  # an archive as a call carries or returns it
MOST_UNPACKED = 2**30  # what an archive may unpack to (snapshots barely compress: a return holds some 100 MiB)
MOST_MEMBERS = 50_000  # files and folders it may hold (a chunk of 36 runs returns a few thousand)
MOST_DEPTH = 8  # folders deep (setting/run/snapshots/file is 4)
MOST_LOG = 64 * 2**20  # bytes of a .jsonl log (50k iterations log some 1 MiB)
MOST_PAX_RECORD = 4096  # bytes of a pax record (an mtime's is some 30)
PAX_KEYS = {"mtime", "atime", "ctime", "path", "size"}  # what tarfile writes for a study's files
PLAIN_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE)


class TransferError(RuntimeError):
    """A study that cannot travel as asked (too large, parts missing), or an archive that is not unpacked."""


def write_archive(files: list[Path], base: Path, destination: Path) -> Path:
    """An xz tar of ``files`` named relative to ``base`` (preset 1: weights barely compress further)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(destination, "w:xz", preset=1) as archive:
        for path in files:
            archive.add(path, arcname=str(path.relative_to(base)))
    return destination


def extract(data: bytes | Path, root: Path, before: Callable[[tarfile.TarFile], None] | None = None) -> list[str]:
    """Unpack an xz tar into ``root`` once every member is checked (``_checked_members``) and ``before`` (given the
    open archive) has not refused it; returns the names unpacked."""
    size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
    if size > MOST_COMPRESSED:
        raise TransferError(f"the archive is {size / 2**20:.0f} MiB, over the {MOST_COMPRESSED // 2**20} MiB a call "
                            "carries or returns; nothing was unpacked")
    source = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")
    try:
        with source, tarfile.open(fileobj=source, mode="r:xz", tarinfo=_PlainHeader) as archive:
            members = _checked_members(archive, Path(root))
            if before is not None:
                before(archive)
            # the chunk history last: unpacking cut short (a full disk) leaves it as it was, so the files are taken
            # back again, not refused as taken back before
            members.sort(key=lambda member: member.name == "chunks.jsonl")
            try:
                _unpack(archive, root, members)
            except OSError as error:  # the checks passed: a full disk, say
                raise TransferError(f"unpacking stopped part-way ({first_line(error)}): {root} may hold part of the "
                                    "archive; take these files back again once that is mended") from None
            return [member.name for member in members]
    except (tarfile.TarError, lzma.LZMAError, EOFError) as error:
        raise TransferError(f"the archive is not an xz tar as a device call writes it ({first_line(error)}); "
                            "nothing was unpacked") from None


def member_bytes(archive: tarfile.TarFile, name: str, most: int) -> bytes:
    """One file of a checked archive (b"" where it has none), or a TransferError when it holds over ``most`` bytes."""
    try:
        member = archive.getmember(name)
    except KeyError:
        return b""
    if member.size > most:
        raise TransferError(f"the archive's {name} holds {member.size:,} bytes, over the {most:,} it may; nothing "
                            "was unpacked")
    handle = archive.extractfile(member)
    return b"" if handle is None else handle.read()


class _PlainHeader(tarfile.TarInfo):
    """A header tarfile reads, refused before tarfile reads what it announces unless it is a file, a folder or a
    small pax record. (``_proc_member`` is tarfile's step for each header just read; tests/test_study_archive.py
    checks that a long-name record claiming megabytes is refused, which would fail if tarfile stopped calling it.)"""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in PLAIN_TYPES and not (self.type == tarfile.XHDTYPE and self.size <= MOST_PAX_RECORD):
            raise TransferError(_refusal(self.name))
        return super()._proc_member(archive)


def _refusal(name: str) -> str:
    return (f"archive member {name[:200]!r}: only files and folders inside the study's root are unpacked (no links, "
            "nothing outside, plain names); nothing was unpacked")


def _unpack(archive: tarfile.TarFile, root: Path, members: list[tarfile.TarInfo]) -> None:
    """Unpack checked members with tarfile's "data" filter, or, on a Python that has none (before 3.10.12 and
    3.11.4), with what that filter would add to _checked_members' own checks: no foreign owner, no mode bits beyond
    a plain file's or folder's."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(root, members=members, filter="data")
        return
    for member in members:
        member.mode = 0o755 if member.isdir() else 0o644
        member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    archive.extractall(root, members=members)


def _plain_name(name: str) -> bool:
    """Printable ASCII, no backslash, each part at most 255 characters, at most MOST_DEPTH deep."""
    parts = name.split("/")
    return len(parts) <= MOST_DEPTH and all(
        0 < len(part) <= 255 and part.isascii() and part.isprintable() and "\\" not in part for part in parts)


def _checked_members(archive: tarfile.TarFile, root: Path) -> list[tarfile.TarInfo]:
    """The members to unpack, or a TransferError before anything is: an archive may come from someone else, and
    tarfile's "data" filter alone has been bypassed through chains of links (CVE-2025-4517, Pythons before
    3.11.13). Walked header by header, so a flood of members or bytes stops at the bound. ``running.json`` (another
    machine's process ids: state.PIDS) is left out."""
    real_root, members, kinds, names, total, count = os.path.realpath(root), [], {}, set(), 0, 0
    while (member := archive.next()) is not None:
        count += 1
        if count > MOST_MEMBERS:
            raise TransferError(f"the archive holds more than {MOST_MEMBERS} members, more than a study's chunk "
                                "returns; nothing was unpacked")
        # one spelling per path, as tarfile writes it: a check reads a member by its name ("chunks.jsonl"), and
        # a second one ("./chunks.jsonl", or the same name again) would be unpacked over it
        name = os.path.normpath(member.name)
        inside = os.path.realpath(os.path.join(real_root, name)).startswith(real_root + os.sep)
        if (not (member.isfile() or member.isdir()) or member.sparse is not None or set(member.pax_headers) - PAX_KEYS
                or name != member.name or name.startswith("/") or ".." in name.split("/") or not _plain_name(name)
                or not inside):
            raise TransferError(_refusal(member.name))
        if name.split("/")[0] == PIDS and name != PIDS:  # a folder there would break every later command
            raise TransferError(_refusal(member.name))
        if name in names:
            raise TransferError(f"archive member {name!r} is in it twice; nothing was unpacked")
        names.add(name)
        _check_kind(name, member.isdir(), kinds, root)
        if name.endswith(".jsonl") and member.size > MOST_LOG:  # every status and chunk reads the logs whole
            raise TransferError(f"archive member {name!r} holds {member.size:,} bytes, over the {MOST_LOG:,} a run's "
                                "log takes; nothing was unpacked")
        total += member.size
        if total > MOST_UNPACKED:
            raise TransferError(f"the archive unpacks to over {MOST_UNPACKED // 2**20} MiB, more than a study's chunk "
                                "returns; nothing was unpacked")
        if name != PIDS:
            members.append(member)
    return members


def _check_kind(name: str, is_folder: bool, kinds: dict[str, bool], root: Path) -> None:
    """A member is a folder where the archive or ``root`` has a folder, a file where either has a file or nothing,
    and everything above it is a folder: otherwise unpacking fails half-way, or a folder replaces a study's file."""
    parts = name.split("/")
    for depth in range(1, len(parts) + 1):
        path, folder = "/".join(parts[:depth]), depth < len(parts) or is_folder
        if kinds.setdefault(path, folder) != folder:
            raise TransferError(f"archive member {name!r}: the archive has {path} as a file and as a folder; nothing "
                                "was unpacked")
        here = root / path
        if here.exists() and here.is_dir() != folder:
            kinds_here = ("file", "folder") if folder else ("folder", "file")
            raise TransferError(f"archive member {name!r}: {path} is a {kinds_here[0]} in {root}, which the archive "
                                f"would make a {kinds_here[1]}; nothing was unpacked")
