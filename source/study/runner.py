"""Running a study in chunks: its runs as concurrent ``train.py`` processes until a time budget, then stopped.

Each chunk starts every run that can go (fresh, continued in place from its latest snapshot, or branched
from its parent's snapshot once the branch point is known), at most ``parallel`` at a time, the least
advanced first; a branch whose parent reaches its branch point during the chunk starts then. At the
budget every process gets SIGTERM, finishes its iteration and writes a snapshot (``Trainer``), so the
next chunk, here or on another machine, continues exactly there. ``state.prune`` then keeps only the
snapshots a later chunk needs: each run's latest, and a parent's branch snapshot until its branch exists.

With ``per_process`` above 1, runs started together share a process (``train.py --group``): interleaved, each on
its own CUDA stream, so that the GPU can run their kernels side by side (``source/training/group.py``); each run
keeps its own folder, console log and exit status.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from source.config import ConfigError
from source.files import first_hazard
from source.study.processes import own_process_group, record_pids
from source.study.spec import Run, Study
from source.study.state import (branch_snapshot, console_log, failure_marker, latest_iteration,
                                logged_iteration, run_folder, start_iteration, status)
from source.training.checkpoint import snapshots_of
from source.training.runlog import DamagedLog, events

TRAIN = Path(__file__).resolve().parents[2] / "train.py"
POLL_SECONDS = 2.0
REPORT_SECONDS = 60.0
LEAD_SECONDS = 600.0  # the longest the other runs wait for a compiling lead run's first logged iteration


def command(study: Study, root: Path, run: Run, python: str, performance: tuple[str, ...] = (),
            data_root: str | None = None) -> list[str]:
    """The run's train.py command; ``performance``: this chunk's ``performance.*`` overrides, given to every run;
    ``data_root``: where the study's data lies on this machine, given to every run that reads the study's data (a
    snapshot may name another machine's folder). Neither is the recipe: a run continues in place with them
    (``source.training.resume.recipe_changes``)."""
    folder = run_folder(root, run)
    local = performance
    if data_root is not None and study.configured_root(run) == study.data_root():
        local += (f"dataset.args.root={json.dumps(str(data_root))}",)  # quoted: a YAML value
    chunk = [arg for override in local for arg in ("--set", override)]
    sets = [arg for override in run.overrides for arg in ("--set", override)] + chunk
    state = status(study, root, run)
    if state == "started":
        return [python, str(TRAIN), "--resume", str(snapshots_of(folder)[-1]), "--out", str(folder), *chunk]
    if state == "fresh":
        return [python, str(TRAIN), "--config", study.spec.base, "--out", str(folder), *sets]
    return [python, str(TRAIN), "--resume", str(branch_snapshot(study, root, run)), "--out", str(folder), *sets]


@dataclass
class Chunk:
    stop: str          # what ended the chunk: its budget (or an error), every run done (or none could go), a signal
    parallel: int
    per_process: int = 1  # runs sharing one process
    performance: tuple[str, ...] = ()  # the chunk's performance.* overrides
    data_root: str | None = None       # the study's data folder here, told to its runs (``command``)
    lead: str | None = None            # with compile on: the run that compiles first, alone
    lead_offset: int = 0               # where the lead's output of this chunk starts in its console log
    started: float = field(default_factory=time.time)
    runs: dict[str, dict] = field(default_factory=dict)   # name -> {from, to, seconds, returncode}
    code: dict | None = None     # what the chunk's first run to end recorded of itself at its start (provenance.py)
    machine: dict | None = None


def budget(seconds: float | None) -> Callable[[], bool] | None:
    """The usual end of a chunk: ``seconds`` after now (None: none, the chunk ends when every run is done)."""
    if seconds is None:
        return None
    deadline = time.time() + seconds
    return lambda: time.time() >= deadline


def run_chunk(study: Study, root: Path, parallel: int, runs: list[Run] | None = None,
              stop: Callable[[], bool] | None = None, python: str = sys.executable, grace: float = 120.0,
              echo=print, performance: tuple[str, ...] = (), compiled: bool = False, per_process: int = 1,
              data_root: str | Path | None = None) -> Chunk:
    """One chunk (see the module docstring) of ``runs`` (None: the study's) until ``stop()`` or all are done.

    ``performance``: ``performance.*`` overrides for every run of the chunk. ``compiled`` (the runs compile G
    and D): the first run compiles alone, with all the compile threads, until it logs an iteration; the others
    then find most of its compiled kernels in inductor's on-disk cache and compile with one thread each.
    ``per_process``: runs started together, up to this many, share one process (``train.py --group``).
    ``data_root``: the study's data folder on this machine, given to the runs that read it (``command``).
    """
    root = Path(root)
    hazard = first_hazard(root)
    if hazard is not None:
        raise ConfigError(f"{hazard}; a chunk writes only into the study root's own files (remove it)")
    runs = list(study.runs if runs is None else runs)
    chunk = Chunk("budget", parallel, per_process, tuple(performance),
                  None if data_root is None else str(data_root))
    active = {}  # run name -> (its process, when it started); a group's runs share theirs
    # the same in every chunk with these --parallel and --per-process (CPU results depend on the thread count)
    threads = str(max(1, (os.cpu_count() or 1) // math.ceil(parallel / per_process)))
    next_report = time.time() + REPORT_SECONDS
    signalled = _Signalled()
    previous = {sig: signal.signal(sig, signalled) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while signalled.name is None and (stop is None or not stop()):
            for name, (process, _) in list(active.items()):
                if process.poll() is not None:
                    _finish(chunk, root, study.run(name), active.pop(name), echo)
            # at most one launch per run and chunk: a run that failed is not retried in a loop; the folders are
            # read only when a slot is free
            free = parallel - len(active)
            if compiled and (chunk.lead is None or _lead_compiling(chunk, root, study, active)):
                free = min(free, 1 if chunk.lead is None else 0)  # the lead alone first
            ready = [r for r in runs if free > 0 and r.name not in chunk.runs
                     and status(study, root, r) in ("started", "fresh", "ready")]
            ready.sort(key=lambda r: latest_iteration(run_folder(root, r)))
            starting = ready[:free]
            for group in balanced_groups(starting, per_process):
                for run in group:
                    chunk.runs[run.name] = {"from": latest_iteration(run_folder(root, run))
                                            or start_iteration(study, root, run)}  # a branch: where it leaves
                    if run.parent is None and not chunk.runs[run.name]["from"] and logged_iteration(
                            run_folder(root, run)):  # its snapshots are gone (deleted by hand?)
                        echo(f"{run.name}: its folder holds no snapshot; it starts over from iteration 0")
                compile_threads = None if chunk.lead is None else "1"
                if compiled and chunk.lead is None:  # free was 1: a group of one
                    chunk.lead, log = group[0].name, console_log(root, group[0])
                    chunk.lead_offset = log.stat().st_size if log.is_file() else 0
                    echo(f"{chunk.lead} compiles first, alone; the others start once it logs an iteration")
                process = _launch(study, root, group, python, threads, echo, chunk, compile_threads)
                active.update({run.name: (process, time.time()) for run in group})
                record_pids(root, active)
            if not active:
                chunk.stop = "every run done, or none could go"
                break
            if time.time() >= next_report:
                next_report += REPORT_SECONDS
                echo(_progress_line(chunk, study, root, [study.run(name) for name in active]))
            time.sleep(POLL_SECONDS)
        if signalled.name is not None:
            chunk.stop = signalled.name
            raise ChunkInterrupted(signalled.name)
    finally:  # the budget, a signal or an error here: every run still writes its snapshot
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(active, grace, echo)
        for name in list(active):
            _finish(chunk, root, study.run(name), active.pop(name), echo)
        record_pids(root, active)
        _append_history(root, chunk)
    return chunk


def balanced_groups(runs: list[Run], most: int) -> list[list[Run]]:
    """``runs`` in as few groups of at most ``most`` as there can be, as equal as can be (12 by 8: 6 and 6, not 8
    and 4: a process takes its runs' iterations in turns, so a larger group's runs would advance slower)."""
    count = math.ceil(len(runs) / most)
    sizes = [len(runs) // count + (index < len(runs) % count) for index in range(count)]
    return [runs[sum(sizes[:index]):sum(sizes[:index + 1])] for index in range(count)]


def _lead_compiling(chunk: Chunk, root: Path, study: Study, active: dict) -> bool:
    """The chunk's lead run is still compiling: running, within LEAD_SECONDS, and no log line of an iteration
    (LogReport's ``iteration=...``, every display_interval) in its console output of this chunk yet."""
    if chunk.lead is None or chunk.lead not in active or time.time() - active[chunk.lead][1] > LEAD_SECONDS:
        return False
    with open(console_log(root, study.run(chunk.lead)), "rb") as handle:
        handle.seek(chunk.lead_offset)
        return not any(part.startswith(b"iteration=") for line in handle for part in line.split(b"\r"))  # \r: bars


class ChunkInterrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP reached the study runner: its runs were stopped (each wrote a snapshot)."""


class _Signalled:
    """The runner's Ctrl-C/SIGTERM/SIGHUP handler: it records the signal and the loop stops at its next turn (within
    POLL_SECONDS). Raising from the handler could land between a run's start and its being recorded as running,
    and that run would go on unstopped."""

    def __init__(self):
        self.name: str | None = None

    def __call__(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name


def _launch(study: Study, root: Path, runs: list[Run], python: str, threads: str, echo,
            chunk: Chunk, compile_threads: str | None) -> subprocess.Popen:
    """One process: ``train.py`` for a single run, ``train.py --group`` for several."""
    for run in runs:
        folder = run_folder(root, run)
        if folder.exists() and not snapshots_of(folder):
            shutil.rmtree(folder)  # stopped before its first snapshot: nothing to keep, and train.py wants it empty
        exit_status(root, run).unlink(missing_ok=True)
        console_log(root, run).parent.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        args = command(study, root, runs[0], python, chunk.performance, chunk.data_root)
        log = console_log(root, runs[0])
        echo(f"start {runs[0].name}: {' '.join(args[2:6])} ...")
    else:
        specs = [{"args": command(study, root, run, python, chunk.performance, chunk.data_root)[2:],
                  "log": str(console_log(root, run)),
                  "status": str(exit_status(root, run))} for run in runs]
        group = root / "groups" / f"{runs[0].setting}_{runs[0].arm}_s{runs[0].seed}.json"
        group.parent.mkdir(parents=True, exist_ok=True)
        group.write_text(json.dumps(specs, indent=1))
        args, log = [python, str(TRAIN), "--group", str(group)], group.with_suffix(".log")
        echo(f"start {', '.join(run.name for run in runs)} in one process ({group})")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if compile_threads is not None:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = compile_threads
    with open(log, "a") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, **own_process_group())


def exit_status(root: Path, run: Run) -> Path:
    """Where ``train.py --group`` writes a run's own exit status (a group's process has one for all of its runs)."""
    return console_log(root, run).with_suffix(".status")


def _stop(active: dict, grace: float, echo) -> None:
    """SIGTERM: each run finishes its iteration and writes a snapshot; SIGKILL after ``grace`` seconds."""
    running = {id(process): process for process, _ in active.values() if process.poll() is None}
    for process in running.values():  # once: a second means "now"
        process.send_signal(signal.SIGTERM)
    stopping = [name for name, (process, _) in active.items() if id(process) in running]  # not those that ended
    signalled = time.time()
    end = signalled + grace
    for name, (process, _) in active.items():
        try:
            process.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            echo(f"{name}: no snapshot within {grace:.0f} s of SIGTERM; killed (it continues from its last one)")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if stopping:
        echo(f"{len(stopping)} run(s) stopped {time.time() - signalled:.1f} s after SIGTERM")


# train.py's exit statuses when a second signal stopped it at once (train.stopped_at_once): a stop, as a negative
# status (killed by the signal) is, not a failure; it continues from its last snapshot
STOPPED_AT_ONCE = {128 + signal.SIGINT, 128 + signal.SIGTERM}


def _finish(chunk: Chunk, root: Path, run: Run, entry: tuple, echo) -> None:
    process, started = entry
    record = chunk.runs[run.name]
    returncode = _own_returncode(exit_status(root, run), process)
    record.update(to=latest_iteration(run_folder(root, run)), seconds=round(time.time() - started, 1),
                  returncode=returncode)
    ran_with = _ran_with(run_folder(root, run), started)
    chunk.code, chunk.machine = chunk.code or ran_with.get("code"), chunk.machine or ran_with.get("machine")
    if returncode and returncode > 0 and returncode not in STOPPED_AT_ONCE:  # an error (a diverged run: 1)
        failure_marker(root, run).write_text(json.dumps({"returncode": returncode, "iteration": record["to"]}))
        echo(f"{run.name}: train.py exited with {returncode}; not relaunched until "
             f"{failure_marker(root, run)} is deleted (see {console_log(root, run)})")
    echo(f"{run.name}: iteration {record['from']} -> {record['to']} in {record['seconds']:.0f} s")


def _ran_with(folder: Path, since: float) -> dict:
    """The code and machine of the run's last ``started`` event, if it wrote one since ``since`` (its launch): the
    runs' own records, so that this process needs neither git nor CUDA."""
    since_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
    try:
        found = [e for e in events(folder, "started") if isinstance(e.get("time"), str) and e["time"] >= since_text]
    except (DamagedLog, OSError, ValueError):
        return {}
    return {key: found[-1][key] for key in ("code", "machine") if found and isinstance(found[-1].get(key), dict)}


def _own_returncode(status: Path, process: subprocess.Popen) -> int | None:
    """A grouped run's own exit status (read once, then removed); the process's where it wrote none (a single run,
    or a group killed before the run ended)."""
    try:
        return int(json.loads(status.read_text())["returncode"])
    except (OSError, ValueError, KeyError, TypeError):
        return process.returncode
    finally:
        status.unlink(missing_ok=True)


def _progress_line(chunk: Chunk, study: Study, root: Path, runs: list[Run]) -> str:
    """One line every REPORT_SECONDS: how far the running runs are (their last logged iteration)."""
    reached = {run.name: logged_iteration(run_folder(root, run)) or start_iteration(study, root, run) or 0
               for run in runs}  # a branch that has logged nothing yet: where it left its parent
    slowest = min(reached, key=reached.get)
    return (f"{time.time() - chunk.started:.0f} s: {len(runs)} running, iterations {min(reached.values())} "
            f"({slowest}) to {max(reached.values())}")


def _append_history(root: Path, chunk: Chunk) -> None:
    root.mkdir(parents=True, exist_ok=True)
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(chunk.started)), "stop": chunk.stop,
              "parallel": chunk.parallel, "per_process": chunk.per_process, "performance": list(chunk.performance),
              "lead": chunk.lead, **({"data_root": chunk.data_root} if chunk.data_root else {}),
              "wall_s": round(time.time() - chunk.started, 1), "runs": chunk.runs,
              **{key: value for key, value in (("code", chunk.code), ("machine", chunk.machine)) if value}}
    with open(root / "chunks.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
