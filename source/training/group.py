"""Several training runs in one process, interleaved iteration by iteration, each on its own CUDA stream.

    python train.py --group GROUP.json

Why: the collapse study's 32 px models are launch-bound. One step of one run is hundreds of kernels that each fill
a small part of the GPU, so a run alone leaves most of it idle; several runs as separate processes do not fill it
either, since a GPU without MPS time-slices between processes (their kernels never run at the same time). One
process that issues several runs' kernels on separate CUDA streams lets the GPU run them side by side.

The runs stay independent: each has its own models, optimizers, data, random generators, CUDA stream, run folder
and console log, and nothing of one run is read by another, so each run computes what it computes alone (on CPU
bit for bit, tested; the training path draws nothing from the global RNGs, so the RNG states a snapshot records,
the process's, matter to none of them). All of a group's runs share the process's backend settings (TF32, cuDNN
autotuning, determinism) and CUDA device, so their ``performance`` and ``deterministic`` settings must agree; they
run uncompiled (each run's D would be compiled anew, and past dynamo's recompile limit silently run eagerly), their
fast path is ``performance.step_graphs``, whose captures give each graph a cuBLAS workspace of its own
(``step_graphs._fresh_cublas_workspaces``). Past some 16 runs with step graphs CUDA's pool of 32 streams per
process hands streams out again: runs that share one are still correct, only not side by side.

GROUP.json: a list of ``{"args": [train.py arguments], "log": FILE, "status": FILE}``. A run's output goes to its
log; when it ends, its exit status (train.py's: 0 done or stopped, 1 a run that cannot go on, 2 bad input, -N not
started because signal N came first) is written to its status file as ``{"returncode": N}``. One run failing
does not stop the others. SIGTERM or Ctrl-C: every run finishes its iteration and writes a snapshot, as train.py
alone does; a second one stops at once.
"""
from __future__ import annotations

import json
import signal
import sys
import traceback
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import IO, Callable, Iterator

import torch

from source.config import ConfigError
from source.files import atomic_write_text
from source.training.distributed import World, world_size_from_env
from source.training.trainer import Trainer

OpenRun = Callable[[list[str], ExitStack, dict], Trainer]
FailureStatus = Callable[[Exception, World], "int | None"]
MAX_RUNS = 64  # each holds its log open; past 32 CUDA streams runs no longer go side by side


class Member:
    """One run of the group: its console log, its CUDA stream, its trainer once opened, its exit status once ended."""

    def __init__(self, spec: dict):
        self.args, self.status_file = spec["args"], Path(spec["status"])
        for folder in {Path(spec["log"]).parent, self.status_file.parent}:
            folder.mkdir(parents=True, exist_ok=True)
        self.log: IO = open(spec["log"], "a", buffering=1)
        self.stack = ExitStack()
        self.trainer: Trainer | None = None
        self.stream: torch.cuda.Stream | None = None
        self.returncode: int | None = None

    @contextmanager
    def turn(self) -> Iterator[None]:
        """While this run works: its output goes to its log, its kernels to its stream."""
        stream = torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()
        with redirect_stdout(self.log), redirect_stderr(self.log), stream:
            yield

    def open(self, open_run: OpenRun, failure_status: FailureStatus, shared: dict) -> None:
        # on the process's current device (a run on another is refused); past 32 streams per process CUDA's pool
        # hands out streams again: runs that share one run one after the other, as correct, less at once
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.act(lambda: setattr(self, "trainer", open_run(self.args, self.stack, shared)), failure_status)

    def advance(self, failure_status: FailureStatus) -> None:
        self.act(lambda: self.trainer.advance() or self.end(0), failure_status)

    def act(self, work: Callable[[], object], failure_status: FailureStatus) -> None:
        """``work`` in this run's turn; an error ends this run alone, with train.py's status and message for it."""
        with self.turn():
            try:
                work()
            except Exception as error:  # noqa: BLE001: one run's error is that run's, the others go on
                world = self.trainer.world if self.trainer is not None else World(0, 0, 1, torch.device("cpu"))
                status = failure_status(error, world)
                if status is None:
                    traceback.print_exc()
                self.end(1 if status is None else status)

    def end(self, returncode: int) -> None:
        """Close the run (its extensions, its log, its folder's lock: ``stack``), write its exit status, free its
        memory. An error while closing makes the status 1 and is printed to its log; the other runs go on."""
        if self.returncode is not None:
            return
        self.returncode = returncode
        try:
            with self.turn():
                try:
                    self.stack.close()
                except Exception:  # noqa: BLE001: e.g. a full disk when the event writer flushes
                    traceback.print_exc()
                    self.returncode = max(self.returncode, 1)
        finally:
            self.trainer = None
            atomic_write_text(self.status_file, json.dumps({"returncode": self.returncode}))
            self.log.close()


def read_group(path: str) -> list[dict]:
    """The group file's runs, checked (one line for a malformed file)."""
    try:
        specs = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigError(f"--group {path}: cannot read it as JSON ({error})") from None
    fields = {"args": list, "log": str, "status": str}
    if not isinstance(specs, list) or not specs or not all(
            isinstance(spec, dict) and set(spec) == set(fields) and all(isinstance(spec[k], t) for k, t in fields.items())
            and all(isinstance(arg, str) for arg in spec["args"]) for spec in specs):
        raise ConfigError(f"--group {path}: expected a non-empty list of {{\"args\": [strings], \"log\": path, "
                          f"\"status\": path}}")
    if len(specs) > MAX_RUNS:
        raise ConfigError(f"--group {path}: {len(specs)} runs; at most {MAX_RUNS} share a process (each holds its "
                          f"log open, and past 32 CUDA streams runs no longer go side by side)")
    for index, spec in enumerate(specs):
        for key in ("log", "status"):
            if problem := _output_problem(Path(spec[key]), f".{key}"):
                raise ConfigError(f"--group {path}: run {index}'s {key} {spec[key][:200]!r} {problem}")
    return specs


def _output_problem(path: Path, suffix: str) -> str | None:
    """What a group file may name for a run's output: a new or regular ``*.log``/``*.status`` file, not a link. A
    group file may come from someone else: the logs are appended to and the statuses replaced, so anything else
    (a shell's startup file, ``authorized_keys``) would be theirs to write."""
    if path.suffix != suffix or path.name == suffix:
        return f"is not a {suffix} file"
    if path.is_symlink():
        return "is a link; name the file itself"
    if path.exists() and not path.is_file():
        return "exists and is not a regular file"
    return None


def main(path: str, open_run: OpenRun, failure_status: FailureStatus) -> int:
    """Open every run of the group, then advance them in turn until each is done, stopped or failed; 0 when all
    ended with 0, else the largest status (each run's own is in its status file)."""
    try:
        if world_size_from_env() > 1:
            raise ConfigError("--group runs in one process; start it without torchrun")
        members = [Member(spec) for spec in read_group(path)]
    except (ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stop, shared = _Stop(members), {"group": path}  # the group file: each run's log names it
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for member in members:
            if stop.signum is None:
                member.open(open_run, failure_status, shared)
            else:  # signalled while the runs opened: the others do not start
                member.end(-stop.signum)
        stop.pass_on()  # to a run that was opening when the signal came: it stops after its first iteration
        while running := [m for m in members if m.returncode is None]:
            for member in running:
                member.advance(failure_status)
    except KeyboardInterrupt:  # a second signal: stopped at once, without snapshots, as train.py alone would be
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a third waits for the statuses
        for member in members:
            member.end(-(stop.signum or signal.SIGINT))
        return 128 + (stop.signum or signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for member in members:
            member.end(1)  # only runs an unexpected error left open: the others have ended
    return max(max(member.returncode, 0) for member in members)


class _Stop:
    """The group's signal handler: the first signal asks every open run to stop after its iteration (and write a
    snapshot), a second one stops at once."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.pass_on()

    def pass_on(self) -> None:
        if self.signum is None:
            return
        for member in self.members:
            if member.trainer is not None and member.returncode is None and not member.trainer.stop_requested:
                member.trainer.request_stop(self.signum)
                member.trainer.acknowledge_stop(member.log)  # not print: see Trainer.acknowledge_stop
