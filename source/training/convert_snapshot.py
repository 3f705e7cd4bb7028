"""Convert a snapshot written before safe loading into one that loads with weights_only=True.

    python -m source.training.convert_snapshot RUN/snapshots/snapshot_iter_N.pt [...]

The old format pickled numpy objects, which the safe loader refuses. This reads it with the safe loader too,
allowing numpy's arrays, scalars and numeric dtypes and nothing else (no object arrays), so a file that names any
other function (one that would run a command) is refused, not converted. The numpy RNG states (the only objects
older snapshots of this toolkit pickled) become tensors; numpy arrays and scalars anywhere else become tensors and
Python numbers. The original is kept beside the result as FILE.orig, and the result is checked by loading it the
safe way.
"""
from __future__ import annotations

import argparse
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from source.config import first_line
from source.files import plain_dtype, refused_object, torch_load
from source.training.checkpoint import SnapshotError, atomic_save, load_snapshot


def plain(value: Any, done: dict | None = None) -> Any:
    """numpy arrays -> tensors, numpy scalars -> Python numbers, containers converted recursively. Each container
    and array once (``done``, by identity): a file can share one list many times over, which a walk of every path
    would convert exponentially often (40 levels of [x, x] in 1.5 KB), and one array (5000 references to 2 MiB
    asked 10 GB)."""
    done = {} if done is None else done
    if isinstance(value, np.generic):
        return value.item()
    if not isinstance(value, (dict, list, tuple, np.ndarray)):
        return value
    if id(value) not in done:
        if isinstance(value, np.ndarray):
            done[id(value)] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
        elif isinstance(value, dict):
            done[id(value)] = {key: plain(item, done) for key, item in value.items()}
        else:
            done[id(value)] = type(value)(plain(item, done) for item in value)
    return done[id(value)]


def legacy_numpy_rng(state: Any) -> Any:
    """np.random.get_state()'s legacy tuple -> the dict form capture_rng writes."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == "MT19937"):
        return state
    name, key, pos, has_gauss, gauss = state
    return {"bit_generator": name, "state": {"key": key, "pos": int(pos)},
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_globals() -> list:
    """What the old format pickled: numpy arrays and scalars of numeric dtypes, also under numpy 1's names."""
    reconstruct, scalar = np.ndarray(0).__reduce__()[0], np.float64(0).__reduce__()[0]
    # each numeric scalar type's dtype class (np.dtypes.Float64DType, ...; numpy < 1.25 has no np.dtypes module)
    numeric = sorted({type(np.dtype(kind)) for kind in np.sctypeDict.values()
                      if issubclass(kind, (np.number, np.bool_))}, key=str)
    return [reconstruct, scalar, np.ndarray, (plain_dtype, "numpy.dtype"), *numeric,
            (reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]


def convert(path: Path) -> Path | None:
    """Rewrite ``path`` in the safe format; returns where the original was kept (None: it loads safely already,
    and is left as it is)."""
    try:
        torch_load(path)
        return None
    except (pickle.UnpicklingError, RuntimeError):
        pass  # numpy objects (the old format), or no snapshot: the load below tells
    backup = path.with_name(path.name + ".orig")
    if backup.exists():  # a second conversion would replace the true original with the first one's output
        raise SnapshotError(f"{backup} exists (an earlier conversion's original?); move it away first")
    try:
        snapshot = torch_load(path, numpy_globals())
    except pickle.UnpicklingError as error:
        raise SnapshotError("it holds Python objects other than numpy arrays and numbers: not a snapshot of this "
                            "toolkit's old format; not converted, nothing run" if refused_object(error) else
                            "not a file written by torch.save, or damaged; not converted") from None
    if not isinstance(snapshot, dict):
        raise SnapshotError(f"{path} is not a snapshot written by this toolkit")
    states = snapshot.get("rng", [])
    if not (isinstance(states, list) and all(isinstance(state, dict) for state in states)):
        raise SnapshotError("its 'rng' entry is not a list of each rank's states: not a snapshot of this toolkit")
    for rank_state in states:
        rank_state["numpy"] = legacy_numpy_rng(rank_state.get("numpy"))
    converted = plain(snapshot)  # before the original is copied: a failure leaves no .orig to refuse a retry
    shutil.copy2(path, backup)
    atomic_save(converted, path)
    load_snapshot(path)  # proves the result loads safely
    return backup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", nargs="+", type=Path, help="snapshot or generator files in the old format")
    args = parser.parse_args(argv)
    for path in args.snapshots:
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
        try:
            backup = convert(path)
        except (SnapshotError, RuntimeError, OSError, EOFError) as error:  # RecursionError: a RuntimeError
            print(f"error: {path}: {first_line(error)}", file=sys.stderr)
            return 2
        except MemoryError:
            print(f"error: {path}: out of memory converting it; nothing was changed", file=sys.stderr)
            return 2
        print(f"converted {path} (original kept as {backup})" if backup else
              f"{path} loads safely already: nothing to convert")
    return 0


if __name__ == "__main__":
    sys.exit(main())
