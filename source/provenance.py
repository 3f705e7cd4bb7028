"""What produced a run's numbers: the code (its git commit), the machine and the library versions.

Every start of train.py (new run, resume, branch, a group's run) writes one ``started`` event with these into the
run's ``log.jsonl``, so a run trained in sessions on several machines names each; every study chunk names its machine
in ``chunks.jsonl``; ``evaluation.py --json`` records and the benchmarks' results carry them too. A checkout copied to
a lent machine has no ``.git``: the study's ``carry`` writes the commit it was made from, and ``device`` hands it to
its runs in ``SRGAN_CODE`` (the record then says ``"from": "carry"``).
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CODE_ENV = "SRGAN_CODE"
COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1, or SHA-256 object names


def code_version(root: Path = ROOT) -> dict:
    """``{"commit": sha, "dirty": bool}``: dirty when tracked files differ from the commit (untracked files are not
    looked at). Outside a git checkout of this code, the commit ``SRGAN_CODE`` carries, else null with the reason."""
    found = _checkout_commit(root)
    if isinstance(found, dict):
        return found
    return carried_code() or {"commit": None, "why": f"{found}; and {CODE_ENV} names no commit"}


def _checkout_commit(root: Path) -> dict | str:
    """``{"commit", "dirty"}`` of the git checkout whose top is ``root``, or why there is none."""
    ok, found = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    if not ok:
        return found
    top, commit = (found.splitlines() + ["", ""])[:2]
    if top != str(root):  # a checkout around a copy of the code is another project's
        return f"{root} is not the top of a git checkout (git's is {top})"
    ok, changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changes)} if ok else f"git status failed: {changes}"


def carried_code() -> dict | None:
    """The code version a carry recorded where it was made, as ``device`` passes it on; None if unset or malformed."""
    try:
        return checked_code(json.loads(os.environ.get(CODE_ENV, "")))
    except ValueError:
        return None


def checked_code(value) -> dict | None:
    """A code version read from elsewhere (a carry's study.json, ``SRGAN_CODE``), if it is one: a commit and whether
    it was dirty; None otherwise."""
    if isinstance(value, dict) and isinstance(value.get("commit"), str) and COMMIT.fullmatch(value["commit"]) \
            and isinstance(value.get("dirty"), bool):
        return {"commit": value["commit"], "dirty": value["dirty"], "from": "carry"}
    return None


def _git(root: Path, *arguments: str) -> tuple[bool, str]:
    """(True, git's output) or (False, why not: git's first line of error, or that git is missing or hung)."""
    try:
        done = subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as error:
        return False, f"git could not run ({error})"
    if done.returncode:
        return False, (done.stderr.strip().splitlines() or [f"git exited with {done.returncode}"])[0]
    return True, done.stdout.strip()


def cpu_model() -> str:
    """The CPU's model name and its logical cores, e.g. 'Intel(R) Xeon(R) Processor x2'."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0]} x{len(names)}" if names else (platform.processor() or platform.machine() or "unknown CPU")


def device_name(device: torch.device) -> str:
    """A GPU's name as the driver gives it ('NVIDIA H200'), or the CPU's model. Never raises: a record of what ran
    (a chunk's, after its runs) must not fail where a run left the GPU unusable."""
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError) as error:  # torch raises these for CUDA it cannot reach
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            return f"a CUDA device whose name could not be read ({reason})"
    return cpu_model() if device.type == "cpu" else device.type


def machine(device: torch.device) -> dict:
    """The device and the versions of what computed on it."""
    cuda = device.type == "cuda"
    return {"device": device_name(device), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None}  # the library's version: no device call


def started(command: list[str], device: torch.device, world_size: int) -> dict:
    """The fields of a run's ``started`` event: how it was started, by which code, where, when (UTC)."""
    return {"command": command, "code": code_version(), "machine": machine(device), "world_size": world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe(code: dict) -> str:
    """A code version in a few words: 'commit 787d26a' (+ ' with local changes'), or 'code version unknown'."""
    if code.get("commit") is None:
        return "code version unknown"
    return f"commit {code['commit'][:7]}{' with local changes' if code.get('dirty') else ''}"
