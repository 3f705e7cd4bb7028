"""Where each run of a study stands, read from its folder: its snapshots and log, whether and where a branch
leaves its parent, what a later chunk needs (``prune`` deletes the rest). Pure reads, except ``prune``."""
from __future__ import annotations

import json
from pathlib import Path

from source import provenance
from source.study.spec import Run, Study
from source.training.checkpoint import generator_path, snapshot_iteration, snapshots_of
from source.training.runlog import DamagedLog, events, read_jsonl


PIDS = "running.json"  # in the study's root: the train.py processes of a chunk under way, {run: [pid, started]}
DONE = "done.json"  # in a done run's folder: {"iteration": N}, where a saved state leaves its last snapshot out


def run_folder(root: Path, run: Run) -> Path:
    return Path(root) / run.setting / f"{run.arm}_s{run.seed}"


def console_log(root: Path, run: Run) -> Path:
    return Path(root) / run.setting / "console" / f"{run.arm}_s{run.seed}.log"


def run_paths(root: Path, run: Run) -> tuple[Path, Path, Path]:
    """Where a run's state lies: its folder, its console log and its failure marker."""
    return run_folder(root, run), console_log(root, run), failure_marker(root, run)


def failure_marker(root: Path, run: Run) -> Path:
    """Written when a run's train.py exits with an error; the run is not relaunched until it is deleted."""
    return console_log(root, run).with_suffix(".failed")


def latest_iteration(folder: Path) -> int:
    """The newest snapshot's iteration, or where its ``DONE`` record says it ended, if later (0: neither)."""
    snapshots = snapshots_of(folder)
    return max(snapshot_iteration(snapshots[-1]) if snapshots else 0, done_iteration(folder))


def done_iteration(folder: Path) -> int:
    """A done run's last iteration, from its ``DONE`` record (``saved.save`` writes it): 0 without one."""
    path = Path(folder) / DONE
    if not path.is_file():
        return 0
    try:
        record = json.loads(path.read_bytes()[:1024])
        if isinstance(record, dict) and type(record.get("iteration")) is int and record["iteration"] >= 0:
            return record["iteration"]
    except (ValueError, RecursionError):
        pass
    raise DamagedLog(f"{path} is not a done run's record ({{\"iteration\": N}}); delete it if the run has snapshots")


def first_collapse(folder: Path) -> int | None:
    """The iteration of the first collapse the run's detector logged (None: none yet); a DamagedLog for one at an
    iteration the run has not reached (a received log's 10^15 would start a branch, and count in the report)."""
    found = next((r["iteration"] for r in events(folder, "collapse") if "iteration" in r), None)
    if found is not None and not (type(found) is int and
                                  0 <= found <= max(logged_iteration(folder), latest_iteration(folder))):
        raise DamagedLog(f"{folder / 'log.jsonl'}: a collapse at iteration {found!r:.40}, which the run has not "
                         "reached; the log is damaged")
    return found


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
    if iteration and not snapshots_of(folder):  # a saved state's done run, whose study file now asks for more
        raise DamagedLog(f"{folder} ended at iteration {iteration} ({DONE}) and its last snapshot was not kept, so "
                         f"it cannot train on to {run.iteration}; a longer run is a new study")
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


def logged_iteration(folder: Path) -> int:
    """The last iteration the run's log.jsonl reports losses of (0: none; events such as ``resumed`` do not count)."""
    return max([r.get("iteration", 0) for r in read_jsonl(folder / "log.jsonl") if "loss_dis" in r], default=0)


def needed_snapshots(study: Study, root: Path, done_runs_last: bool = True) -> set[Path]:
    """The snapshots a later chunk needs: each run's newest (``done_runs_last``: a done run's too, which its status
    and an evaluation read) and a waiting or ready branch's candidate in its parent."""
    keep = set()
    for run in study.runs:
        snapshots, current = snapshots_of(run_folder(root, run)), status(study, root, run)
        if done_runs_last or current != "done":
            keep.update(snapshots[-1:])
        if run.parent is not None and current in ("ready", "waiting"):
            keep.update(filter(None, [branch_candidate(study, root, run)]))
    return keep


def prune(study: Study, root: Path) -> list[Path]:
    """Delete the snapshots (and generator exports) no later chunk needs; returns what went."""
    keep = needed_snapshots(study, root)
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


def start_iteration(study: Study, root: Path, run: Run) -> int | None:
    """Where a run's training starts: 0, or for a branch the parent's iteration it left at (its first resume;
    before it starts, its branch snapshot's); None while unknown (a branch waiting for its parent)."""
    if run.parent is None:
        return 0
    resumed = [r["iteration"] for r in events(run_folder(root, run), "resumed") if "iteration" in r]
    if resumed:
        return resumed[0]
    snapshot = branch_snapshot(study, root, run)
    return None if snapshot is None else snapshot_iteration(snapshot)


def outlook(study: Study, root: Path, runs: list[Run] | None = None) -> dict:
    """The study as a whole: how many of its runs' iterations are trained of those it will train (runs that can
    still go or are done: their own part, a branch's from where it left its parent), how many runs wait or will
    never start or failed, and the last chunk's iterations per second of training in all (None: no chunk yet)."""
    counts, trained, planned = {}, 0, 0
    for run in study.runs if runs is None else runs:
        kind = status(study, root, run)
        counts[kind] = counts.get(kind, 0) + 1
        if kind in ("done", "started", "fresh", "ready"):
            start = start_iteration(study, root, run)
            trained += max(0, min(latest_iteration(run_folder(root, run)), run.iteration) - start)
            planned += run.iteration - start
    rate, device = last_chunk(root)
    return {"counts": counts, "trained": trained, "planned": planned, "last_chunk_rate": rate,
            "last_chunk_device": device}


def last_chunk(root: Path) -> tuple[float | None, str | None]:
    """The last chunk that trained any: its iterations per second in all (its runs' advances over its wall time,
    starting and stopping included: what a chunk of that kind gets done) and the device it ran on (None where its
    record names none: chunks before records named their machine). (None, None) before any such chunk."""
    for record in reversed(read_jsonl(Path(root) / "chunks.jsonl")):
        try:
            advanced = sum(max(0, int(r.get("to", r["from"])) - int(r["from"])) for r in record["runs"].values())
            seconds = float(record["wall_s"])
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):  # not the runner's: no rate
            continue
        if advanced and seconds > 0:
            return advanced / seconds, chunk_device(record)
    return None, None


def chunk_device(record: dict) -> str | None:
    """The device a chunk's record names, in at most 60 printable characters (None for records from before chunks
    named their machine); the record may come from another machine, and the name goes into one-line messages."""
    machine = record.get("machine")
    device = machine.get("device") if isinstance(machine, dict) else None
    return device[:60] if isinstance(device, str) and device.isprintable() and device else None


def chunk_code(record: dict) -> str | None:
    """The code version a chunk's record names, in a few words ('commit 787d26a'); None where it names none (the
    record may come from another machine: only a commit's hex digits and flags are shown)."""
    return provenance.describe_recorded(record.get("code"))


def progress_table(study: Study, root: Path, runs: list[Run] | None = None) -> list[dict]:
    """Per run (default: all): status, latest snapshot's iteration (a branch yet to start: where it will leave
    its parent, once known), target, first detected collapse."""
    return [{"run": run.name, "status": status(study, root, run), "iteration": latest_iteration(run_folder(root, run))
             or start_iteration(study, root, run) or 0,
             "target": run.iteration, "collapse": first_collapse(run_folder(root, run))}
            for run in (study.runs if runs is None else runs)]
