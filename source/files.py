"""Atomic file writes: a temp file in the same folder, fsync, rename. A crash leaves the old file or the new one.
Safe reads of the zip files others may hand us (torch's .pt, numpy's .npz): no more than the file holds."""
from __future__ import annotations

import math
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from source.typed import first_line

TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as handle:
            write(handle)
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


def run_figures(run: Path) -> Path:
    """RUN/figures, where figures and grids go by default, refused when it is a symbolic link: a run folder from
    elsewhere could hold one that points a figure's write into any folder of the user's."""
    folder = Path(run) / "figures"
    refuse_link(folder)
    return folder


def refuse_link(path: Path) -> Path:
    """``path``, unless it is a symbolic link (ValueError): writing would follow it to whatever file it names; or
    a FIFO, socket or device, whose opening for a write or a read can block for good."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; nothing is written through it (remove it, or give --out)")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise ValueError(f"{path} is neither a file nor a folder (a FIFO, socket or device); remove it")
    return path


def first_hazard(root: Path) -> str | None:
    """The first symbolic link, FIFO, socket or device anywhere under ``root``, said (None: none): a run folder or
    study root from elsewhere could point one of the writes that go there (logs, snapshots, markers) at any file of
    the user's through a link, or block a read or an append for good with a FIFO."""
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                return f"{path} is a symbolic link"
            if not (os.path.isdir(path) or os.path.isfile(path)):
                return f"{path} is neither a file nor a folder (a FIFO, socket or device)"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files of writes that were killed (call only while no one else writes into ``folder``)."""
    stale = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# deflated floating-point data shrinks by a few percent; a member that claims to grow more was made to (zeros
# deflate about 1000 times)
MOST_INFLATION = 64


def zip_expansion(path: str | Path, stored_only: bool) -> str | None:
    """Why the zip ``path`` would load to more than it holds, else None (also when it is no zip: the loader then
    says what it is): a member compressed other than as its writer does (torch.save: stored; numpy: stored or
    deflated), or, deflated, claiming to grow over MOST_INFLATION times, or an array whose header asks for more
    than its member holds (a small file asking for gigabytes)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    with archive:
        inflated = compressed = 0  # of the deflated members, together: 1000 members of 1 MiB each inflate too
        for member in archive.infolist():
            stored = member.compress_type == zipfile.ZIP_STORED and member.file_size == member.compress_size
            deflated = member.compress_type == zipfile.ZIP_DEFLATED and not stored_only
            if deflated and not stored:
                inflated, compressed = inflated + member.file_size, compressed + member.compress_size
            if not (stored or deflated and inflated <= MOST_INFLATION * compressed + 2**20):
                return (f"its member {member.filename} unpacks to {member.file_size:,} bytes from "
                        f"{member.compress_size:,} (compression {member.compress_type}; deflated members so far: "
                        f"{inflated:,} from {compressed:,}): not as {'torch.save' if stored_only else 'numpy'} "
                        f"writes")
            if not stored_only:  # numpy serves a member named "sigma" as "sigma.npy": every member is checked
                problem = _npy_overstated(archive, member)
                if problem:
                    return problem
    return None


def _colliding_in_torch_file(path: str | Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [member for member in archive.infolist() if member.filename.endswith("/data.pkl")]
            return next(filter(None, (colliding_numbers(archive.read(member)) for member in pickles)), None)
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _npy_overstated(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> str | None:
    """Why an .npz member's header asks for more than the member holds (numpy allocates what it says first)."""
    import numpy as np

    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with archive.open(member) as handle:
        try:
            shape, _, dtype = readers[np.lib.format.read_magic(handle)](handle)
        except (KeyError, ValueError, OSError) as error:
            return f"its member {member.filename} is not an array numpy writes ({error})"
    if dtype.hasobject or math.prod(shape) * dtype.itemsize > member.file_size:
        return f"its member {member.filename} declares {shape} of {dtype}, more than it holds"
    return None


# how numpy pickles its numeric dtypes (np.dtype(name, False, True)): bool, signed and unsigned ints, floats, complex
NUMERIC_DTYPE_NAMES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "f16",
                                 "c8", "c16", "c32"})


def plain_dtype(name: Any, align: Any = False, copy: Any = False) -> Any:
    """A pickled numpy dtype, as numpy's own dtype of that numeric type (``copy`` ignored). numpy's pickles ask for
    a copy, which the pickle's state then fills unchecked: a state naming a Python string as a field's dtype makes
    numpy's C code read the string as a dtype (a crash, at best). numpy's own dtypes ignore a state (native byte
    order: the arrays we read are uint8, or this toolkit's own from little-endian machines)."""
    import numpy as np

    if not isinstance(name, str) or name not in NUMERIC_DTYPE_NAMES or align not in (False, 0):
        raise pickle.UnpicklingError(f"a numpy dtype {str(name)[:40]!r} (align {str(align)[:10]}) that is not a "
                                     f"plain number type")
    return np.dtype(name)


MOST_COLLIDING_NUMBERS = 64


def colliding_numbers(data: bytes) -> str | None:
    """Why a pickle's numbers would take quadratic time to load, else None (also when it is no pickle: the loader
    then says what it is). Python hashes an int by its value modulo 2^61 - 1 (floats alike), so the keys k (2^61 - 1)
    of a dict all share one hash, and each one added is compared with all before it: 1 MB of them in a CIFAR batch
    took 46 s, 31 MB would take hours. No file of ours holds more than a few distinct numbers of one hash."""
    seen, per_hash = set(), {}
    try:
        for _, arg, _ in pickletools.genops(data):
            # distinct values kept by their spelling: a string's hash is salted per process, so no flood there
            if type(arg) not in (int, float) or (spelled := repr(arg)) in seen:
                continue
            seen.add(spelled)
            key = hash(arg)
            per_hash[key] = per_hash.get(key, 0) + 1
            if per_hash[key] > MOST_COLLIDING_NUMBERS:
                return f"more than {MOST_COLLIDING_NUMBERS} distinct numbers of one hash (a hash flood)"
    except (ValueError, EOFError):  # not a pickle, or cut off
        return None
    return None


def torch_load(path: str | Path, allowed: list = ()) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, once the file is known to hold what it loads to (torch would
    also inflate a crafted file's compressed members) and its pickle to load in linear time; a RuntimeError, as
    torch's for unreadable files, if not."""
    import torch

    problem = zip_expansion(path, stored_only=True) or _colliding_in_torch_file(path)
    if problem:
        raise RuntimeError(f"{problem}; refused")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():  # the converter's numpy
            # types; nothing otherwise. A sparse tensor is refused below: torch's note that it checks one is no news
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        raise
    except Exception as error:  # torch's unpickler meets bytes that are no pickle with whatever error they cause
        raise pickle.UnpicklingError(f"not a pickle ({type(error).__name__})") from None
    # torch's legacy (pre-zip) format reserves the storage sizes a file declares, unchecked: a 500-byte file could
    # ask for gigabytes, allocated at the first read of its values. Either format holds its tensors' bytes uncompressed
    problem = tensor_problem(loaded, os.path.getsize(path))
    if problem:
        raise RuntimeError(f"it holds {problem}, which torch.save never writes of a model; refused")
    return loaded


def tensor_problem(loaded: Any, most_stored: int | None = None) -> str | None:
    """Why the tensors in a loaded object are not what torch.save writes of models and optimizers, else None: a
    tensor must be dense, on the CPU, real, and not larger than its storage (torch rebuilds whatever view a file
    names, so a 2 KB file's tensor can repeat one stored number into gigabytes, which the first check of its values
    would allocate), and their storages together not over ``most_stored`` bytes when given (the file's size).
    Walked once per object, without recursion."""
    import torch

    pending, seen, stored, viewed = [loaded], set(), {}, 0
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif torch.is_tensor(item):
            if item.layout != torch.strided or item.device.type != "cpu" or item.is_complex() or item.is_quantized:
                kind = str(item.dtype).removeprefix("torch.")
                return f"a {kind} tensor ({str(item.layout).removeprefix('torch.')}, on {item.device.type})"
            storage = item.untyped_storage()
            if item.numel() * item.element_size() > storage.nbytes():
                return f"a tensor of shape {tuple(item.shape)} over {storage.nbytes():,} stored bytes"
            stored[storage.data_ptr()] = storage.nbytes()
            viewed += item.numel() * item.element_size()
    # a state dict's tensors each have their storage: many views of one (a 20 KB file's 1000 views of 64 MB of zeros)
    # would have every check of the values read it again
    if viewed > 2 * sum(stored.values()) + 2**20:
        return f"tensors viewing {viewed:,} bytes of {sum(stored.values()):,} stored (the same storage over and over)"
    if most_stored is not None and sum(stored.values()) > most_stored:
        return f"tensors of {sum(stored.values()):,} bytes in a file of {most_stored:,} bytes"
    return None


def load_refusal(error: Exception) -> str:
    """Why ``torch_load`` refused a file, in a few words. torch's own message for a pickle it will not load advises
    loading it with weights_only=False, which would run whatever code the file holds: never for a received file."""
    if isinstance(error, pickle.UnpicklingError):
        found = refused_object(error)
        return (f"it holds pickled Python objects ({found}), never loaded" if found
                else "not a file written by torch.save, or damaged")
    return first_line(error)


def refused_object(error: pickle.UnpicklingError) -> str | None:
    """The first object torch's weights-only loader refused (its message names it), None for no pickle at all."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def open_npz(path: str | Path):
    """``np.load`` of an .npz (no pickles), once its members are known not to inflate past MOST_INFLATION; a
    ValueError if they would."""
    import numpy as np

    with open(path, "rb") as handle:  # np.load reads a file by its first bytes: an .npy's header allocates first
        if handle.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ValueError(f"{path}: not an .npz archive (a zip file of arrays)")
    problem = zip_expansion(path, stored_only=False)
    if problem:
        raise ValueError(f"{path}: {problem}; refused")
    return np.load(path, allow_pickle=False)
