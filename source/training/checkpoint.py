"""Snapshot files: atomic writes, RNG capture, and reading snapshots back safely.

A snapshot holds everything needed to continue bit for bit: models (with SN u/v and BN
statistics, which live in the state_dicts), optimizers, updater state (incl. SR state), the RNG
states of every rank, the data-iterator position, extension states, the iteration and the config.

Everything in it is a tensor or plain data (dict, list, tuple, str, number, bool, None), so it is read
with ``torch.load(weights_only=True)``: a file from someone else cannot run code when loaded.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from source.config import ModelSpec, first_line
from source.files import atomic_write, refused_object, torch_load


class SnapshotError(ValueError):
    """A file that cannot be used as a snapshot (unreadable, unsafe, damaged, of other networks); one-line message."""


class SnapshotMismatch(SnapshotError):
    """A snapshot's weights or optimizer states do not fit the models being built."""


SNAPSHOT_FOLDER = "snapshots"
# What every snapshot and generator export holds, and what a full snapshot holds beyond that, with their types.
EXPORT_LAYOUT = {"iteration": int, "config": dict, "gen": dict}
TRAINING_LAYOUT = {"dis": dict, "opt_gen": dict, "opt_dis": dict, "updater": dict, "rng": list, "data": dict}
CONVERT_COMMAND = "python -m source.training.convert_snapshot"


def snapshot_path(out: Path, iteration: int) -> Path:
    return Path(out) / SNAPSHOT_FOLDER / f"snapshot_iter_{iteration}.pt"


def generator_path(out: Path, iteration: int) -> Path:
    return Path(out) / SNAPSHOT_FOLDER / f"generator_iter_{iteration}.pt"


def snapshot_iteration(path: Path) -> int | None:
    """N for ``snapshot_iter_N.pt`` as the trainer spells it, None for any other name (``snapshot_iter_06.pt``
    beside ``snapshot_iter_6.pt`` would make "the newest" depend on the listing's order)."""
    stem, prefix = Path(path).stem, "snapshot_iter_"
    digits = stem[len(prefix):]
    valid = Path(path).suffix == ".pt" and stem.startswith(prefix) and digits.isdecimal() and digits.isascii()
    return int(digits) if valid and digits == str(int(digits)) else None


def snapshots_of(run: Path) -> list[Path]:
    """RUN/snapshots/snapshot_iter_N.pt, oldest first."""
    paths = [p for p in (Path(run) / SNAPSHOT_FOLDER).glob("snapshot_iter_*.pt")
             if snapshot_iteration(p) is not None and p.is_file()]
    return sorted(paths, key=snapshot_iteration)


def exports_after(run: Path, iteration: int) -> list[Path]:
    """RUN/snapshots/generator_iter_M.pt for M > ``iteration``: a run resumed at ``iteration`` never wrote them
    (a stop interrupted between an export and its snapshot leaves one)."""
    prefix = "generator_iter_"
    return [path for path in (Path(run) / SNAPSHOT_FOLDER).glob(f"{prefix}*.pt")
            if path.stem[len(prefix):].isdecimal() and int(path.stem[len(prefix):]) > iteration]


def run_folder_of(path: str | Path) -> Path | None:
    """RUN for RUN/snapshots/<file>; None for a snapshot kept anywhere else. The file's own folder, not its target's
    where the file is a link: a received run's link would otherwise make a resume write beside another run."""
    folder = Path(path).absolute().parent.resolve()
    return folder.parent if folder.name == SNAPSHOT_FOLDER else None


def latest_good_snapshot(run: Path) -> Path | None:
    """The newest snapshot of ``run`` that loads as a resume would (which refuses NaN/Inf weights and optimizer
    states)."""
    for path in reversed(snapshots_of(run)):
        try:
            load_snapshot(path, training_state=True)
        except SnapshotError:
            continue
        return path
    return None


def generator_export(snapshot: dict) -> dict:
    """A snapshot's generator-only export: the generator evaluation uses (G's EMA when the run keeps one)."""
    export = {"iteration": snapshot["iteration"], "config": snapshot["config"]}
    if "gen_ema" in snapshot:
        return {**export, "gen": snapshot["gen_ema"], "gen_is_ema": True}
    return {**export, "gen": snapshot["gen"]}


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file, fsync and rename: a crash never leaves a torn file."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def load_snapshot(path: str | Path, training_state: bool = False) -> dict:
    """A snapshot or generator export; ``training_state`` requires a full snapshot (to resume from).

    Read with weights_only=True: tensors and plain data only, whatever the file holds."""
    path = Path(path)
    if path.is_dir():
        run = path.parent if path.name == SNAPSHOT_FOLDER else path
        newest = snapshots_of(run)[-1:] or [run / SNAPSHOT_FOLDER / "snapshot_iter_N.pt"]
        raise SnapshotError(f"{path} is a directory; give a snapshot file such as {newest[0]}"
                            f"{' (its newest)' if newest[0].is_file() else ''}")
    if not path.is_file():
        newest = snapshots_of(path.parent.parent)[-1:] if path.parent.name == SNAPSHOT_FOLDER else []
        raise SnapshotError(f"snapshot {path} does not exist" + (f"; its folder's newest is {newest[0].name}"
                                                                   if newest else ""))
    try:
        snapshot = torch_load(path)
    except pickle.UnpicklingError as error:
        found = refused_object(error)
        if found is None:  # not a pickle at all
            raise SnapshotError(f"{path} is not a readable snapshot (not a file written by torch.save, or damaged)") from None
        raise SnapshotError(
            f"{path} was not loaded: it holds pickled Python objects ({found}), and loading them could run "
            f"code. Snapshots written by this toolkit before safe loading hold numpy RNG states; convert such a "
            f"file (numpy objects only: anything else is refused) with: {CONVERT_COMMAND} {path}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise SnapshotError(f"{path} is not a readable snapshot ({first_line(error)}); is the file complete?") from None
    check_layout(snapshot, path, training_state)
    return snapshot


def check_layout(snapshot: Any, path: Path, training_state: bool) -> None:
    """The top-level entries a snapshot needs, with their types (deeper damage is reported where it is read)."""
    if not isinstance(snapshot, dict) or "gen" not in snapshot or "iteration" not in snapshot:
        raise SnapshotError(f"{path} is not a snapshot written by this toolkit")
    if training_state and not all(key in snapshot for key in TRAINING_LAYOUT):
        raise SnapshotError(f"{path} holds the generator only; resume from the snapshot_iter_N.pt beside it")
    layout = {**EXPORT_LAYOUT, **(TRAINING_LAYOUT if training_state else {})}
    for key, kind in layout.items():
        if key not in snapshot:
            raise SnapshotError(f"{path} has no '{key}' entry; it is damaged or was not written by this toolkit")
        if not isinstance(snapshot[key], kind) or (kind is int and isinstance(snapshot[key], bool)):
            raise SnapshotError(f"{path}: its '{key}' entry is a {type(snapshot[key]).__name__}, not a "
                                f"{kind.__name__}; the file is damaged")
    if snapshot["iteration"] < 0:
        raise SnapshotError(f"{path}: iteration {snapshot['iteration']} is negative; the file is damaged")
    if training_state:
        check_training_entries(snapshot, path)


def check_training_entries(snapshot: dict, path: Path) -> None:
    """What a resume reads beyond the layout: tensors where tensors belong, finite weights and optimizer states, and
    counters that agree (the models' shapes are checked against the built models, ``state_mismatch``)."""
    for key in ("gen", "dis", "gen_ema"):
        if not isinstance(snapshot.get(key, {}), dict):
            raise SnapshotError(f"{path}: its '{key}' entry is a {type(snapshot[key]).__name__}, not a dict; the file "
                                f"is damaged")
        wrong = [name for name, value in snapshot.get(key, {}).items() if not torch.is_tensor(value)]
        if wrong:
            raise SnapshotError(f"{path}: its '{key}' entry holds a {type(snapshot[key][wrong[0]]).__name__} at "
                                f"{wrong[0]}, not a tensor; the file is damaged")
    bad = non_finite_weights(snapshot)
    if bad:
        raise SnapshotError(f"{path} holds NaN/Inf in {len(bad)} tensors (first: {bad[0]}); resume from an earlier "
                            f"snapshot")
    counters = {"updater.iteration": (snapshot["updater"].get("iteration"), snapshot["iteration"]),
                "data.epoch": (snapshot["data"].get("epoch"), None),
                "data.batch_in_epoch": (snapshot["data"].get("batch_in_epoch"), None),
                "data.global_batch_size": (snapshot["data"].get("global_batch_size", 1), None)}  # older: none
    for name, (value, expected) in counters.items():
        if not (type(value) is int and 0 <= value < 2**32 and expected in (None, value)):
            raise SnapshotError(f"{path}: its {name} is {value!r}, not a count" + (
                f" equal to its iteration {expected}" if expected is not None else "") + "; the file is damaged")
    elapsed = snapshot.get("elapsed", 0.0)
    if not isinstance(elapsed, (int, float)):
        raise SnapshotError(f"{path}: its 'elapsed' entry is a {type(elapsed).__name__}, not seconds; "
                            f"the file is damaged")
    if not 0 <= elapsed < 1e12:  # a century is 3e9 s; also NaN and inf, and ints too large for a float
        raise SnapshotError(f"{path}: its 'elapsed' entry {elapsed!r:.40} is not a run's seconds; the file is damaged")


def state_mismatch(name: str, expected: dict, saved: dict) -> str | None:
    """The first differences between a model's state_dict and a saved one (names, shapes, types), or None."""
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    reshaped = [f"{key} is {tuple(saved[key].shape)} in the snapshot, {tuple(value.shape)} here"
                for key, value in expected.items() if key in saved and saved[key].shape != value.shape]
    # loading would cast silently: a float64 1e300 becomes inf in float32, integers become weights
    retyped = [f"{key} is {saved[key].dtype} in the snapshot, {value.dtype} here"
               for key, value in expected.items() if key in saved and saved[key].dtype != value.dtype]
    problems = ([f"{len(missing)} tensors missing (first: {missing[0]})"] if missing else []) + \
               ([f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else []) + \
               ([f"{len(reshaped)} of another shape (first: {reshaped[0]})"] if reshaped else []) + \
               ([f"{len(retyped)} of another type (first: {retyped[0]})"] if retyped else [])
    return f"{name}: {'; '.join(problems)}" if problems else None


def weights_misfit(label: str, spec: ModelSpec, saved: Any) -> str | None:
    """How the weights ``saved`` (named ``label`` in messages) differ from the state dict of the model ``spec``
    describes, or None; found on the meta device, without memory: a file's config could ask for a
    model of any size, which building it would allocate."""
    from source.models import build_model

    if not (isinstance(saved, dict) and all(torch.is_tensor(value) for value in saved.values())):
        return f"{label}: not a dict of tensors"
    with torch.device("meta"):
        expected = build_model(spec.name, spec.args).state_dict()
    return state_mismatch(label, expected, saved)


def configured(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A snapshot's optimizer state with ``optimizer``'s hyperparameters (betas, eps, fused, ...), which the run's
    config set: torch's load would keep the snapshot's, silently ignoring a resume's ``--set adam_D.beta2=...``
    or ``performance.fused_adam``. The moments and step counts stay the snapshot's."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return saved  # torch's load reports what does not fit
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return {**saved, "param_groups": [{**group, **setting} for group, setting in zip(groups, settings)]}


def non_finite(state: dict) -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or Inf, in order. Each dict is
    walked once, without recursion: a file from someone else can share one dict many times over, which a walk
    of every path would visit exponentially often, or nest dicts deeper than Python recurses."""
    names, seen, walks = [], {id(state)}, [("", iter(state.items()))]
    while walks:
        prefix, items = walks[-1]
        for key, value in items:
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                if id(value) not in seen:
                    seen.add(id(value))
                    walks.append((f"{name}.", iter(value.items())))
                    break
            elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                names.append(name)
        else:
            walks.pop()
    return names


def optimizer_mismatch(name: str, optimizer: torch.optim.Optimizer, saved: dict) -> str | None:
    """The first saved optimizer state (Adam's moments) whose shape or type is not its parameter's, or None: torch's
    load would take it and fail at the first step (or cast it silently)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    states = saved.get("state")
    for index, entries in (states.items() if isinstance(states, dict) else ()):  # else: torch's load reports it
        if not (isinstance(index, int) and 0 <= index < len(parameters) and isinstance(entries, dict)):
            return f"{name}: a state for parameter {index!r} of {len(parameters)}"
        for key, value in entries.items():
            if torch.is_tensor(value) and value.dim() and value.shape != parameters[index].shape:
                return f"{name}: {key} of parameter {index} is {tuple(value.shape)}, the parameter " \
                       f"{tuple(parameters[index].shape)}"
            if torch.is_tensor(value) and value.dim() and value.dtype != parameters[index].dtype:
                return f"{name}: {key} of parameter {index} is {value.dtype}, the parameter {parameters[index].dtype}"
    return None


def non_finite_weights(snapshot: dict) -> list[str]:
    """The NaN/Inf tensors among a snapshot's weights and optimizer states (what a good snapshot never holds)."""
    keys = ("gen", "dis", "opt_gen", "opt_dis", "gen_ema")
    return non_finite({key: snapshot[key] for key in keys if key in snapshot})


def capture_rng(device: torch.device) -> dict:
    """Every global RNG's state as tensors and plain data (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {**numpy_state, "state": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                                                "pos": int(numpy_state["state"]["pos"])}},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {"key": key, "pos": numpy_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
