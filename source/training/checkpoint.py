"""Snapshot files: atomic writes, RNG capture, and reading snapshots back.

A snapshot holds everything needed to continue bit for bit: models (with SN u/v and BN
statistics, which live in the state_dicts), optimizers, updater state (incl. SR state), the RNG
states of every rank, the data-iterator position, extension states, the iteration and the config.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from source.config import first_line


class SnapshotMismatch(ValueError):
    """A snapshot's weights or optimizer states do not fit the models being built."""


SNAPSHOT_FOLDER = "snapshots"
# What a full snapshot holds beyond a generator export (gen, iteration, config).
TRAINING_STATE = ("dis", "opt_gen", "opt_dis", "updater", "rng", "data")


def snapshot_path(out: Path, iteration: int) -> Path:
    return Path(out) / SNAPSHOT_FOLDER / f"snapshot_iter_{iteration}.pt"


def generator_path(out: Path, iteration: int) -> Path:
    return Path(out) / SNAPSHOT_FOLDER / f"generator_iter_{iteration}.pt"


def run_folder_of(path: str | Path) -> Path | None:
    """RUN for RUN/snapshots/<file>; None for a snapshot kept anywhere else."""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name == SNAPSHOT_FOLDER else None


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_snapshot(path: str | Path, training_state: bool = False) -> dict:
    """A snapshot or generator export; ``training_state`` requires a full snapshot (to resume from)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {path} does not exist")
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a readable snapshot ({first_line(error)}); is the file complete?") from None
    if not isinstance(snapshot, dict) or "gen" not in snapshot or "iteration" not in snapshot:
        raise ValueError(f"{path} is not a snapshot written by this toolkit")
    if training_state and not all(key in snapshot for key in TRAINING_STATE):
        raise ValueError(f"{path} holds the generator only; resume from the snapshot_iter_N.pt beside it")
    return snapshot


def capture_rng(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
