"""Running a study in chunks: its runs as concurrent ``train.py`` processes until a time budget, then stopped.

Each chunk starts every run that can go (fresh, continued in place from its latest snapshot, or branched
from its parent's snapshot once the branch point is known), at most ``parallel`` at a time, the least
advanced first; a branch whose parent reaches its branch point during the chunk starts then. At the
budget every process gets SIGTERM, finishes its iteration and writes a snapshot (``Trainer``), so the
next chunk, here or on another machine, continues exactly there. ``prune`` then keeps only the
snapshots a later chunk needs: each run's latest, and a parent's branch snapshot until its branch exists.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from source.study.spec import Run, Study
from source.training.checkpoint import generator_path, snapshot_iteration, snapshots_of
from source.training.runlog import events, read_jsonl

TRAIN = Path(__file__).resolve().parents[2] / "train.py"
POLL_SECONDS = 2.0
REPORT_SECONDS = 60.0


def run_folder(root: Path, run: Run) -> Path:
    return Path(root) / run.setting / f"{run.arm}_s{run.seed}"


def console_log(root: Path, run: Run) -> Path:
    return Path(root) / run.setting / "console" / f"{run.arm}_s{run.seed}.log"


def failure_marker(root: Path, run: Run) -> Path:
    """Written when a run's train.py exits with an error; the run is not relaunched until it is deleted."""
    return console_log(root, run).with_suffix(".failed")


def latest_iteration(folder: Path) -> int:
    snapshots = snapshots_of(folder)
    return snapshot_iteration(snapshots[-1]) if snapshots else 0


def first_collapse(folder: Path) -> int | None:
    """The iteration of the first collapse the run's detector logged (None: none yet)."""
    return next((r["iteration"] for r in events(folder, "collapse")), None)


def branch_point(study: Study, root: Path, run: Run) -> int | None:
    """Where ``run`` leaves its parent, once known: the parent's first collapse, or the fixed ``at`` once passed."""
    parent = run_folder(root, study.run(run.parent))
    if run.at == "collapse":
        return first_collapse(parent)
    return run.at if latest_iteration(parent) >= run.at else None


def branch_limit(study: Study, root: Path, run: Run) -> int | None:
    """The newest iteration a branch may leave its parent at, once known: the detector's last check before the
    parent's first collapse (the collapse iteration less one spectra interval), or the fixed ``at``."""
    point = branch_point(study, root, run)
    if point is None:
        return None
    return point - study.run(run.parent).spectra_interval if run.at == "collapse" else point


def branch_snapshot(study: Study, root: Path, run: Run) -> Path | None:
    """The parent's latest snapshot at or before ``branch_limit``; None while unknown (or none is that old)."""
    limit = branch_limit(study, root, run)
    if limit is None:
        return None
    before = [s for s in snapshots_of(run_folder(root, study.run(run.parent))) if snapshot_iteration(s) <= limit]
    return before[-1] if before else None


def branch_candidate(study: Study, root: Path, run: Run) -> Path | None:
    """The parent's snapshot a waiting branch may need: its branch snapshot once known; before that, the newest
    one at a detector check (collapse) or at or before ``at``, not one a chunk's stop left at any iteration."""
    if branch_point(study, root, run) is not None:
        return branch_snapshot(study, root, run)
    parent = study.run(run.parent)
    fits = (lambda i: i % parent.spectra_interval == 0) if run.at == "collapse" else (lambda i: i <= run.at)
    candidates = [s for s in snapshots_of(run_folder(root, parent)) if fits(snapshot_iteration(s))]
    return candidates[-1] if candidates else None


def status(study: Study, root: Path, run: Run) -> str:
    """done | failed | started | fresh | ready (a branch that can start) | waiting (its parent has not got there)
    | never (its parent ended without getting there)."""
    folder = run_folder(root, run)
    iteration = latest_iteration(folder)
    if iteration >= run.iteration:
        return "done"
    if failure_marker(root, run).is_file():
        return "failed"
    if iteration:
        return "started"
    if run.parent is None:
        return "fresh"
    if branch_snapshot(study, root, run) is not None:
        return "ready"
    parent = study.run(run.parent)
    parent_done = latest_iteration(run_folder(root, parent)) >= parent.iteration
    return "never" if parent_done or branch_point(study, root, run) is not None else "waiting"


def command(study: Study, root: Path, run: Run, python: str) -> list[str]:
    folder = run_folder(root, run)
    sets = [arg for override in run.overrides for arg in ("--set", override)]
    state = status(study, root, run)
    if state == "started":
        return [python, str(TRAIN), "--resume", str(snapshots_of(folder)[-1]), "--out", str(folder)]
    if state == "fresh":
        return [python, str(TRAIN), "--config", study.spec.base, "--out", str(folder), *sets]
    return [python, str(TRAIN), "--resume", str(branch_snapshot(study, root, run)), "--out", str(folder), *sets]


@dataclass
class Chunk:
    stop: str          # what ends the chunk: a budget, or every run done
    parallel: int
    started: float = field(default_factory=time.time)
    runs: dict[str, dict] = field(default_factory=dict)   # name -> {from, to, seconds, returncode}


def budget(seconds: float | None) -> Callable[[], bool] | None:
    """The usual end of a chunk: ``seconds`` after now (None: none, the chunk ends when every run is done)."""
    if seconds is None:
        return None
    deadline = time.time() + seconds
    return lambda: time.time() >= deadline


def run_chunk(study: Study, root: Path, parallel: int, runs: list[Run] | None = None,
              stop: Callable[[], bool] | None = None, python: str = sys.executable, grace: float = 120.0,
              echo=print) -> Chunk:
    """One chunk (see the module docstring) of ``runs`` (None: the study's) until ``stop()`` or all are done."""
    root = Path(root)
    runs = list(study.runs if runs is None else runs)
    chunk, active = Chunk("budget" if stop else "until done", parallel), {}
    # the same in every chunk with this --parallel (CPU results depend on the thread count)
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    next_report = time.time() + REPORT_SECONDS
    _stop_leftovers(root, grace, echo)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while stop is None or not stop():
            for name, (process, _) in list(active.items()):
                if process.poll() is not None:
                    _finish(chunk, root, study.run(name), active.pop(name), echo)
            # at most one launch per run and chunk: a run that failed is not retried in a loop; the folders are
            # read only when a slot is free
            free = parallel - len(active)
            ready = [r for r in runs if free > 0 and r.name not in chunk.runs
                     and status(study, root, r) in ("started", "fresh", "ready")]
            ready.sort(key=lambda r: latest_iteration(run_folder(root, r)))
            for run in ready[:free]:
                chunk.runs[run.name] = {"from": latest_iteration(run_folder(root, run))}
                active[run.name] = (_launch(study, root, run, python, threads, echo), time.time())
                _record_pids(root, active)
            if not active:
                break
            if time.time() >= next_report:
                next_report += REPORT_SECONDS
                echo(_progress_line(chunk, root, [study.run(name) for name in active]))
            time.sleep(POLL_SECONDS)
    finally:  # the budget, Ctrl-C, SIGTERM/SIGHUP or an error here: every run still writes its snapshot
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(active, grace, echo)
        for name in list(active):
            _finish(chunk, root, study.run(name), active.pop(name), echo)
        _record_pids(root, active)
        _append_history(root, chunk)
    return chunk


class ChunkInterrupted(Exception):
    """SIGTERM or SIGHUP reached the study runner: its runs were stopped (each wrote a snapshot)."""


def _interrupt(signum, frame) -> None:
    raise ChunkInterrupted(signal.Signals(signum).name)


PIDS = "running.json"  # in the study's root: the train.py processes of a chunk under way


def _record_pids(root: Path, active: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / PIDS).write_text(json.dumps({name: process.pid for name, (process, _) in active.items()}))


def _stop_leftovers(root: Path, grace: float, echo) -> None:
    """Stop train.py processes a killed earlier chunk left running (they run in their own sessions)."""
    path = root / PIDS
    pids = json.loads(path.read_text()).items() if path.is_file() else []
    for name, pid in pids:
        try:
            if b"train.py" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            echo(f"{name}: still running from an earlier chunk (pid {pid}); stopping it")
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        end = time.time() + grace
        while Path(f"/proc/{pid}").exists() and time.time() < end:
            time.sleep(0.5)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)


def _launch(study: Study, root: Path, run: Run, python: str, threads: str, echo) -> subprocess.Popen:
    folder = run_folder(root, run)
    if folder.exists() and not snapshots_of(folder):
        shutil.rmtree(folder)  # stopped before its first snapshot: nothing to keep, and train.py wants it empty
    args = command(study, root, run, python)
    log = console_log(root, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    echo(f"start {run.name}: {' '.join(args[2:6])} ...")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(active: dict, grace: float, echo) -> None:
    """SIGTERM: each run finishes its iteration and writes a snapshot; SIGKILL after ``grace`` seconds."""
    for process, _ in active.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    end = time.time() + grace
    for name, (process, _) in active.items():
        try:
            process.wait(timeout=max(0.0, end - time.time()))
        except subprocess.TimeoutExpired:
            echo(f"{name}: no snapshot within {grace:.0f} s of SIGTERM; killed (it continues from its last one)")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _finish(chunk: Chunk, root: Path, run: Run, entry: tuple, echo) -> None:
    process, started = entry
    record = chunk.runs[run.name]
    record.update(to=latest_iteration(run_folder(root, run)), seconds=round(time.time() - started, 1),
                  returncode=process.returncode)
    if process.returncode and process.returncode > 0:  # an error (a diverged run: 1), not a stop by a signal
        failure_marker(root, run).write_text(json.dumps({"returncode": process.returncode, "iteration": record["to"]}))
        echo(f"{run.name}: train.py exited with {process.returncode}; not relaunched until "
             f"{failure_marker(root, run)} is deleted (see {console_log(root, run)})")
    echo(f"{run.name}: iteration {record['from']} -> {record['to']} in {record['seconds']:.0f} s")


def _progress_line(chunk: Chunk, root: Path, runs: list[Run]) -> str:
    """One line every REPORT_SECONDS: how far the running runs are (their last logged iteration)."""
    reached = {run.name: max([r["iteration"] for r in read_jsonl(run_folder(root, run) / "log.jsonl")
                              if "iteration" in r], default=0) for run in runs}
    slowest = min(reached, key=reached.get)
    return (f"{time.time() - chunk.started:.0f} s: {len(runs)} running, iterations {min(reached.values())} "
            f"({slowest}) to {max(reached.values())}")


def _append_history(root: Path, chunk: Chunk) -> None:
    root.mkdir(parents=True, exist_ok=True)
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(chunk.started)), "stop": chunk.stop,
              "parallel": chunk.parallel, "wall_s": round(time.time() - chunk.started, 1), "runs": chunk.runs}
    with open(root / "chunks.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def prune(study: Study, root: Path) -> list[Path]:
    """Delete the snapshots (and generator exports) no later chunk needs; returns what went."""
    keep = set()
    for run in study.runs:
        snapshots = snapshots_of(run_folder(root, run))
        keep.update(snapshots[-1:])
        if run.parent is not None and status(study, root, run) in ("ready", "waiting"):
            keep.update(filter(None, [branch_candidate(study, root, run)]))  # the parent's latest is kept anyway
    removed = []
    for run in study.runs:
        folder = run_folder(root, run)
        for snapshot in snapshots_of(folder):
            if snapshot not in keep:
                for path in (snapshot, generator_path(folder, snapshot_iteration(snapshot))):
                    if path.is_file():
                        path.unlink()
                        removed.append(path)
    return removed


def progress_table(study: Study, root: Path, runs: list[Run] | None = None) -> list[dict]:
    """Per run (default: all): status, latest snapshot's iteration, target, first detected collapse."""
    return [{"run": run.name, "status": status(study, root, run), "iteration": latest_iteration(run_folder(root, run)),
             "target": run.iteration, "collapse": first_collapse(run_folder(root, run))}
            for run in (study.runs if runs is None else runs)]
