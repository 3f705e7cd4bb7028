"""What produced a run's numbers: the code (its git commit), the machine and the library versions.

Every start of train.py (new run, resume, branch, a group's run) writes one ``started`` event with these into the
run's ``log.jsonl``, so a run trained in sessions on several machines names each; every study chunk names the code and
machine its runs recorded (``chunks.jsonl``); ``evaluation.py --json`` records and the benchmarks' results carry them
too. "dirty" means a code file (``*.py``, ``*.sh``) differs from the commit or is new; data and documents do not count.

A checkout copied to a lent machine has no ``.git``. The study's ``carry`` and ``benchmarks/gpu/prepare.sh`` record
the commit here with a digest of every file the copy takes (``carry_record``, ``python -m source.provenance record``);
there, ``verify_carried`` checks the copy against it (a copy taken after the carry was made differs, and says so) and
the runs name the result through ``SRGAN_CODE`` (``"from": "carry"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from source.typed import first_line

ROOT = Path(__file__).resolve().parent.parent
CODE_ENV = "SRGAN_CODE"
COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1, or SHA-256 object names
CODE_FILES = ("*.py", "*.sh")  # what "dirty" looks at (git pathspecs: any folder)
MOST_CHANGED = 10  # changed code files named in a record
MOST_RECORD = 4 * 2**20  # bytes of a carried record (its file list: some 300 paths)
MOST_FILES, MOST_BYTES = 20_000, 2**30  # what a carry's digest reads at most (the code: some 300 files, 7 MB)
DIFFERS = "differs from the carry's"  # a record's "tree" where the copy's files are not those its carry recorded


def code_version(root: Path = ROOT) -> dict:
    """``{"commit": sha, "dirty": bool}`` (with ``"changed"``: the first code files that differ, when dirty) of the
    git checkout whose top is ``root``; elsewhere the version ``SRGAN_CODE`` carries, else null with the reason."""
    found = _checkout_commit(root)
    if isinstance(found, dict):
        return found
    return carried_code() or {"commit": None, "why": f"{found}; and {CODE_ENV} names no commit"}


def _checkout_commit(root: Path) -> dict | str:
    ok, found = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    if not ok:
        return found
    top, commit = (found.splitlines() + ["", ""])[:2]
    if top != str(root):  # a checkout around a copy of the code is another project's
        return f"{root} is not the top of a git checkout (git's is {top})"
    ok, status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *CODE_FILES)
    if not ok:
        return f"git status failed: {status}"
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), **({"changed": changed[:MOST_CHANGED]} if changed else {})}


def _git(root: Path, *arguments: str) -> tuple[bool, str]:
    """(True, git's output) or (False, why not). Without the caller's GIT_* variables (a GIT_DIR would name another
    repository), and without the index lock ``status`` otherwise takes (killed at the timeout, it would stay behind
    and stop the user's next commit)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *arguments], capture_output=True,
                              text=True, errors="replace", stdin=subprocess.DEVNULL, env=environment, timeout=20)
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        return False, f"git could not run ({error})"
    if done.returncode:
        return False, (done.stderr.strip().splitlines() or [f"git exited with {done.returncode}"])[0]
    return True, done.stdout  # not stripped: a status line starts with a space where the index is unchanged


def carried_code() -> dict | None:
    """The code version ``SRGAN_CODE`` names (set from a verified carry); None if unset or malformed."""
    try:
        return checked_code(json.loads(os.environ.get(CODE_ENV, "")))
    except (ValueError, RecursionError):
        return None


def checked_code(value) -> dict | None:
    """A code version read from elsewhere, if it is one: a commit, whether it was dirty, and (kept) whether the copy
    differed from its carry; None otherwise."""
    if not (isinstance(value, dict) and isinstance(value.get("commit"), str) and COMMIT.fullmatch(value["commit"])
            and isinstance(value.get("dirty"), bool)):
        return None
    changed = value.get("changed")
    named = {"changed": changed} if isinstance(changed, list) and len(changed) <= MOST_CHANGED and all(
        isinstance(name, str) and len(name) <= 200 and name.isprintable() for name in changed) else {}
    differs = {"tree": DIFFERS} if value.get("tree") == DIFFERS else {}
    return {"commit": value["commit"], "dirty": value["dirty"], **named, "from": "carry", **differs}


def carry_record(root: Path = ROOT) -> dict:
    """The code version here with the files a lent machine's copy takes (tracked and untracked, ignored aside: what
    the device tool copies) and their digest, for ``verify_carried`` there."""
    ok, listing = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    files = sorted(set(listing.split("\0")) - {""}) if ok else []
    return {**code_version(root), "files": files, "digest": tree_digest(root, files)}


def tree_digest(root: Path, files: list[str]) -> str | None:
    """SHA-256 over each file's name and content (a missing one, or one reached through a link out of ``root``,
    counted as such); None past MOST_FILES or MOST_BYTES: a record from elsewhere must not make us hash gigabytes."""
    root, digest, read = Path(root).resolve(), hashlib.sha256(), 0
    if len(files) > MOST_FILES:
        return None
    for name in files:
        path = root / name
        if not path.resolve().is_relative_to(root):
            content = "outside"
        elif not path.is_file():
            content = "missing"
        else:
            read += path.stat().st_size
            if read > MOST_BYTES:
                return None
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()


def verify_carried(path: Path, root: Path = ROOT) -> dict | None:
    """The carried code version (``checked_code``'s form) of the copy at ``root``: the carry's, marked dirty and
    "differs from the carry's" where the copy's files are not those the carry recorded; None for no usable record."""
    try:
        if not Path(path).is_file() or Path(path).stat().st_size > MOST_RECORD:
            return None
        record = json.loads(Path(path).read_text())
        files = record["files"]
        if not (isinstance(files, list) and all(_plain_name(name) for name in files) and len(set(files)) == len(files)):
            return None
        digest = tree_digest(root, files)
        if digest is None:
            return None
        same = digest == record["digest"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    code = checked_code(record)
    if code is None or same:
        return code
    return {**code, "dirty": True, "tree": DIFFERS}


def _plain_name(name) -> bool:
    """A relative path inside the copy (a record from elsewhere must not make us read /etc or ../..)."""
    return isinstance(name, str) and bool(name) and not name.startswith("/") and ".." not in Path(name).parts


def cpu_model() -> str:
    """The CPU's model name and its logical cores, e.g. 'Intel(R) Xeon(R) Processor x2'."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} x{len(names)}" if names else (platform.processor() or platform.machine() or "unknown CPU")


def device_name(device) -> str:
    """A GPU's name as the driver gives it ('NVIDIA H200'), or the CPU's model. Never raises: what a run records of
    itself must not stop it."""
    import torch

    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError) as error:  # torch raises these for CUDA it cannot reach
            return f"a CUDA device whose name could not be read ({first_line(error)})"
    return cpu_model() if device.type == "cpu" else device.type


def machine(device) -> dict:
    """The device (a torch.device) and the versions of what computed on it."""
    import torch

    cuda = device.type == "cuda"
    try:
        cudnn = torch.backends.cudnn.version() if cuda else None  # the library's version: no device call
    except RuntimeError:  # a cuDNN torch was not built for
        cudnn = None
    return {"device": device_name(device), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "cudnn": cudnn}


def started(command: list[str], device, world_size: int) -> dict:
    """The fields of a run's ``started`` event: how it was started, by which code, where, when (UTC)."""
    return {"command": command, "code": code_version(), "machine": machine(device), "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe_recorded(code) -> str | None:
    """``describe`` of a code version read from a record made elsewhere (a study chunk's), None where it names no
    commit: only the commit's hex digits and the flags are shown, whatever else the record holds."""
    if not (isinstance(code, dict) and isinstance(code.get("commit"), str) and COMMIT.fullmatch(code["commit"])):
        return None
    return describe({"commit": code["commit"], "dirty": code.get("dirty") is True, "from": code.get("from") == "carry",
                      "tree": code.get("tree") == DIFFERS})


def describe(code: dict) -> str:
    """A code version in a few words: 'commit 787d26a' (+ ' with local changes', ' (carried)'), or 'code version
    unknown'."""
    if code.get("commit") is None:
        return "code version unknown"
    carried = " (carried, the copy differing)" if code.get("tree") else " (carried)" if code.get("from") else ""
    return f"commit {code['commit'][:7]}{' with local changes' if code.get('dirty') else ''}{carried}"


def main(argv: list[str] | None = None) -> int:
    """``record``: print the carry record of this checkout; ``verify FILE``: print the verified code version of this
    copy against FILE (nothing where FILE is missing or no record)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["record"]:
        print(json.dumps(carry_record()))
    elif len(argv) == 2 and argv[0] == "verify":
        code = verify_carried(Path(argv[1]))
        if code is not None:
            print(json.dumps(code))
    else:
        print("usage: python -m source.provenance record | verify FILE", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
