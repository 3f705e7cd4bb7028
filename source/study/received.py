"""What a study's files from elsewhere (a device call's return, a saved state) must hold before any is unpacked:
snapshots of the study's runs, of their recipes, named for their iterations; chunk histories of chunk records."""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from source.config import Config
from source.study.archive import TransferError
from source.study.spec import Run, Study
from source.study.state import DONE
from source.training.checkpoint import SnapshotError, load_snapshot, snapshot_iteration
from source.training.resume import config_changes, recipe_changes


def check_snapshots(where: Path, archive: tarfile.TarFile, study: Study | None = None) -> None:
    """Every returned (or saved) snapshot is a file that opens as a snapshot of the iteration its name says, and
    with ``study``, in one of its runs, not past the run's end, of the run's recipe (a resume continues with the
    snapshot's config: another learning rate or loss would go on silently under the run's name). Pruning keeps each
    run's newest snapshot by its name and deletes the others: a damaged or planted ``snapshot_iter_999999.pt`` (or a
    folder of that name) taken for the newest would delete the real ones and mark the run done."""
    runs = {run.name: run for run in study.runs} if study else {}
    for member in archive.getmembers():
        name = Path(member.name)
        run = runs.get("/".join(name.parts[:2]))
        if name.name == DONE and study:
            _check_done(where, member, archive, run)
        if name.name.startswith(("snapshot_iter_", "generator_iter_")) and not member.isfile():
            raise TransferError(f"{where}: {member.name} is not a file; nothing unpacked")
        iteration = snapshot_iteration(name)
        if iteration is None:
            continue
        if study and (run is None or name.parts[2:] != ("snapshots", name.name) or iteration > run.iteration):
            raise TransferError(f"{where}: {member.name} is no snapshot of the study's runs (a run's "
                                "snapshots/snapshot_iter_N.pt, N at most its last iteration); nothing unpacked")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(member.name).name
            with archive.extractfile(member) as source, open(path, "wb") as copy:
                shutil.copyfileobj(source, copy)
            try:
                snapshot = load_snapshot(path, training_state=True)
                found = snapshot["iteration"]
            except SnapshotError as error:
                found = str(error).replace(str(path), "it")
        if study and found == iteration:
            _check_recipe(where, member.name, snapshot, study.config(run))
        if found != iteration:
            raise TransferError(f"{where}: {member.name} is not the snapshot of iteration {iteration} its name "
                                f"says ({found if isinstance(found, str) else f'iteration {found}'}); nothing unpacked")


def _check_done(where: Path, member: tarfile.TarInfo, archive: tarfile.TarFile, run: Run | None) -> None:
    """A done run's record (``state.DONE``) says the run's last iteration, in the run's folder: a planted one would
    mark a run done that never ran."""
    data = archive.extractfile(member).read() if member.isfile() and member.size <= 1024 else b""
    if run is None or member.name != f"{run.name}/{DONE}" or data != json.dumps({"iteration": run.iteration}).encode():
        raise TransferError(f"{where}: {member.name} is no done record of the study's runs ({{\"iteration\": N}}, N "
                            "its last iteration, in its folder); nothing unpacked")


def _check_recipe(where: Path, name: str, snapshot: dict, recipe: Config) -> None:
    changes = recipe_changes(config_changes(snapshot, recipe), recipe.dataset.name)
    if changes:
        raise TransferError(f"{where}: {name} was trained with another recipe than its run's ({len(changes)} "
                            f"differ, e.g. {changes[0]}: the snapshot's, then the run's); nothing unpacked")


def check_history(history: list[bytes], where: str) -> None:
    """Every line of a chunk history from elsewhere is a chunk's record (a JSON object)."""
    if not all(_is_record(line) for line in history):
        raise TransferError(f"{where} holds a line that is not a chunk's record; nothing unpacked")


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False
