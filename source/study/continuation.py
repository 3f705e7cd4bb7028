"""A lent GPU machine's study folder across the calls of one lending (``source.study device``): a later call on the
still-warm machine continues what the earlier call left there, and returns what no call has returned yet.

Each call's pack is relative to a listing recorded in the folder (``SINCE``): at the carry's unpacking, then after
every pack that completed. Taken back in order (``transfer.take_back`` checks the chunk count they continue), the
calls' files rebuild here the state the machine has there.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from source.files import atomic_write_text
from source.study import saved
from source.study.archive import TransferError, extract
from source.study.spec import Study
from source.study.transfer import CARRY_STUDY, STATE, chunk_count, listing

SINCE = ".device-since.json"  # on the lent machine, in the study's root: see ``restore``


@dataclass
class Since:
    """What a device call's pack is relative to: the files' listing, and how many chunks the study had then."""
    listing: dict[str, tuple[int, int]]
    chunks: int
    continued: bool  # the state an earlier call on this machine left, not the carry's


def restore(carry: Path, root: Path, study: Study | None = None) -> Since:
    """Unpack the carried state into ``root`` (or, where the carry says the state travels in the working tree, the
    study's saved state: ``saved``); return what a chunk's pack compares against.

    A later call on a machine still warm, with the same carry, finds a newer state there (an earlier call's chunk):
    unpacking the carry would put older logs beside newer snapshots. That state continues instead, and the chunk
    returns what changed since what the earlier call returned (``packed``), or, where that call did not get to
    pack (killed at its limit), since the carry: taken back in order, the calls' files rebuild this state here.
    Another carry (made anew here) replaces the state there: it is the state to continue (``_empty``)."""
    state, record_path, kept = Path(carry) / STATE, Path(root) / SINCE, saved_state_of(carry, study)
    carried = (saved.digest(study, kept) if kept else hashlib.sha256(state.read_bytes()).hexdigest()
               if state.is_file() else "no state carried")
    record = _since_record(record_path)
    if record is not None and record["carry"] == carried:
        return Since(record["listing"], record["chunks"], True)
    if kept:
        if record_path.exists():
            _empty(Path(root))
        saved.restore(study, Path(root), kept)
    elif state.is_file():
        # an earlier call's state there, of another carry (or its record is damaged), goes once the carry is checked
        extract(state, root, (lambda _: _empty(Path(root))) if record_path.exists() else None)
    Path(root).mkdir(parents=True, exist_ok=True)
    since = Since(listing(root), chunk_count(root), False)
    atomic_write_text(record_path, json.dumps({"carry": carried, "listing": since.listing, "chunks": since.chunks}))
    return since


def saved_state_of(carry: Path, study: Study | None) -> Path | None:
    """The study's saved folder where the carry says its state travels in the working tree (``carry``), else None."""
    path = Path(carry) / CARRY_STUDY
    try:
        made = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        made = {}
    if not (isinstance(made, dict) and made.get("saved_state") is True):
        return None
    if study is None or study.saved_folder() is None:
        raise TransferError(f"{carry} was made for the state a study file names in saved_state, and it names none")
    return study.saved_folder()


def _since_record(path: Path) -> dict | None:
    """``restore``'s record, checked; None where there is none or it is not as ``restore`` writes it."""
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
        listing_ = {name: (stamp[0], stamp[1]) for name, stamp in record["listing"].items()
                    if len(stamp) == 2 and all(type(value) is int for value in stamp)}
        if len(listing_) != len(record["listing"]) or type(record["chunks"]) is not int:
            return None
        return {"carry": str(record["carry"]), "listing": listing_, "chunks": record["chunks"]}
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError):
        return None


def _empty(root: Path) -> None:
    """Everything under ``root`` but its dot files (the folder's lock): what earlier calls left and never returned
    must not be mistaken for the carry's state, nor linger beside it (a run's spectra, a failure marker)."""
    for path in root.iterdir():
        if not path.name.startswith("."):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def packed(root: Path, out: Path) -> None:
    """Record that the files under ``root`` have now been returned (``restore``: a next call's pack starts here),
    except those the pack left out for room (``out/left_out.txt``), which stay due."""
    record_path = Path(root) / SINCE
    record = json.loads(record_path.read_text())
    left_out = Path(out) / "left_out.txt"
    unsent = set(left_out.read_text().splitlines()) if left_out.is_file() else set()
    returned = {name: stamp for name, stamp in listing(root).items() if name not in unsent}
    atomic_write_text(record_path, json.dumps({"carry": record["carry"], "listing": returned,
                                               "chunks": chunk_count(root)}))
