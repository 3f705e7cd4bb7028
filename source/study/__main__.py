"""python -m source.study: run a study (many train.py runs) in resumable chunks, here or on a lent GPU machine.

  run STUDY [--budget S] [--parallel N] [--setting NAME]   one chunk here (no --budget: until every run is done);
      [--per-process K]                                    K runs per process, one CUDA stream each
      [--seed N] [--arm NAME]                              --setting, --seed, --arm choose runs (repeatable)
      [--set performance.KEY=VALUE]                        how this chunk's runs do the arithmetic (run, device;
                                                           the study base's performance block where not given)
  status STUDY [--setting NAME] [--arm NAME] [--seed N]   each run's progress (of the chosen runs)
  carry STUDY --to DIR [--setting NAME] [--arm NAME]      what a device call needs, in DIR (git-ignored); the
                                                           chosen runs' state, or with saved_state all of it, saved
                                                           (it travels in the working tree)
  device STUDY --carry DIR --out DIR --budget S            on the GPU machine: unpack, one chunk, pack results
                                                           (--budget required: a call's limit would kill packing)
  take-back STUDY FILES_DIR                                unpack what a device call returned, then prune

Runs live in --root (default results/<study name>); a study file's saved_state keeps the default folder's state
with the code (written after run and take-back, unpacked into a checkout that lacks it: source/study/saved.py).
See docs/collapse.md for the collapse study.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
import subprocess
import sys
import time
from pathlib import Path

import torch

from source import arguments, provenance
from source.config import ConfigError, load_config
from source.console import survive_readers_leaving
from source.study import continuation, processes, runner, saved, state, transfer
from source.study.spec import Run, Study, load_study
from source.training.runlog import DamagedLog

CARRY_CODE = "code.json"  # in a carry: the code version here and the digest of the tree that travels with it


def default_parallel() -> int:
    """A GPU overlaps many small runs; on a CPU, runs beyond the cores only contend for them (and their memory)."""
    return 16 if torch.cuda.is_available() else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m source.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "status", "carry", "device", "take-back"):
        command = sub.add_parser(name)
        command.add_argument("study", help="study YAML, e.g. configs/collapse/gpu_study.yaml")
        command.add_argument("--root", help="the study's runs (default results/<study name>)")
        if name in ("run", "device", "carry", "status"):
            command.add_argument("--setting", action="append", help="only this setting's runs (repeatable)")
            command.add_argument("--seed", action="append", type=arguments.seed, help="only this seed's runs (repeatable)")
            command.add_argument("--arm", action="append",
                                 help="only this arm's runs (repeatable); e.g. the baseline first, so that the "
                                      "branches waiting for its collapse can start sooner")
        if name in ("run", "device"):
            command.add_argument("--budget", type=arguments.positive_float(), required=name == "device",  # a call's limit kills packing
                                 help="seconds before every run is stopped, counted from the "
                                 "chunk's start: the runs' start-up (seconds each) is in it")
            command.add_argument("--parallel", type=arguments.positive_int, default=default_parallel(),
                                 help="runs at a time (default: 16 where CUDA is available, else one per CPU core)")
            command.add_argument("--per-process", type=arguments.positive_int, default=1,
                                 help="runs sharing one process at most, each on its own CUDA stream, the groups "
                                      "as equal as can be (default 1): on one GPU, separate processes' kernels "
                                      "never run at the same time")
            command.add_argument("--grace", type=arguments.positive_float(), default=120.0,
                                 help="seconds a stopped run has to write its snapshot (default 120)")
            command.add_argument("--set", dest="performance", action="append", default=[],
                                 metavar="performance.KEY=VALUE",
                                 help="for every run of this chunk, e.g. performance.compile=true (repeatable; "
                                      "the rest as the study's base sets them); only performance.*: the recipe "
                                      "is the study file's")
    sub.choices["carry"].add_argument("--to", required=True, type=Path, help="folder to fill (git-ignored); the "
                                      "wheels the GPU image lacks are downloaded with pip (a package index must be "
                                      "reachable)")
    sub.choices["device"].add_argument("--carry", required=True, type=Path, help="the folder `carry` filled")
    sub.choices["device"].add_argument("--out", required=True, type=Path, help="where the results go ($OUT)")
    sub.choices["device"].add_argument("--parts", type=int, choices=range(1, 5), metavar="1-4",
                                       help="at most this many 15 MiB parts (default 4; fewer where other files "
                                            "share the call's 8)")
    sub.choices["take-back"].add_argument("files", type=Path, help="the folder the device call's files came back in")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.study)
        root = Path(args.root or Path("results") / study.name)
        runs = study.select(getattr(args, "setting", None), getattr(args, "seed", None), getattr(args, "arm", None))
        if hasattr(args, "performance"):
            args.performance, args.compiled = chunk_performance(study, args.performance)
            if args.compiled and args.per_process > 1:
                raise ConfigError("--per-process above 1 runs uncompiled (train.py --group refuses compile): "
                                  "give performance.step_graphs=true instead, or one run per process")
        if args.root is not None and args.command in ("status", "take-back") and not root.is_dir():
            raise ConfigError(f"--root {root}: no such study folder")  # a typo read as a study of fresh runs
        if args.command == "device" and not args.carry.is_dir():
            raise ConfigError(f"--carry {args.carry}: no such folder (make it with `python -m source.study carry`)")
        processes.check_root(root, study.name, claim=False)
        kept = study.saved_folder() if args.root is None and args.command != "device" else None
        due = kept and (saved.newer(root, kept, study) or saved.behind(root, kept, study))
        if args.command == "status" and not due:
            return show_status(args, study, root, runs)  # no lock: status reads a chunk under way
        with processes.root_lock(root):
            processes.check_root(root, study.name, claim=True)
            # train.py runs a killed command left writing here stop before anything here changes
            processes.stop_leftovers(root, getattr(args, "grace", 120.0), print)
            if kept:
                restore_kept(study, root, kept)
            try:
                code = COMMANDS[args.command](args, study, root, runs)
            except runner.ChunkInterrupted:
                save_kept(args, study, root, kept)  # the runs' stop snapshots are the state to continue
                raise
            save_kept(args, study, root, kept)
            return code
    except (ConfigError, transfer.TransferError, DamagedLog, processes.StudyFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except runner.ChunkInterrupted as error:
        print(f"stopped by {error}: every run stopped and continues in the next chunk from its latest snapshot",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a save or restore cut short is done again by the next command
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 130


def restore_kept(study: Study, root: Path, folder: Path) -> None:
    """A fresh checkout (or one whose pull brought a newer saved state) continues the study where it was saved; a
    folder ahead of the saved state (a save that failed or was cut short) is saved now."""
    added = saved.restore(study, root, folder)
    if added:
        removed = state.prune(study, root)
        print(f"{root}: the study's saved state unpacked from {folder} ({added} chunks more than here; "
              f"{len(removed)} snapshot files no later chunk needs removed)")
    elif saved.behind(root, folder, study):
        size = saved.save(study, root, folder)
        print(f"{folder}: the study's state saved ({size / 2**20:.1f} MiB), which an earlier save did not finish; "
              "commit it")


def save_kept(args, study: Study, root: Path, folder: Path | None) -> None:
    """After a command that changed the study's state: write it into the saved folder (to commit)."""
    if folder is not None and args.command in ("run", "take-back"):
        size = saved.save(study, root, folder)
        print(f"{folder}: the study's state saved ({size / 2**20:.1f} MiB); commit it, or the next checkout starts "
              "from the state saved before")


def chunk_performance(study: Study, sets: list[str]) -> tuple[list[str], bool]:
    """Every ``performance.*`` value of this chunk: the study base's, changed by its --set items (checked: only
    ``performance.*``, valid values). All of them go to every run, so a run continued from a snapshot of a chunk
    with other settings takes this chunk's, not those its snapshot recorded. Also: whether the runs compile."""
    for item in sets:
        if not item.startswith("performance.") or "=" not in item:
            raise ConfigError(f"--set {item}: a chunk may change only performance.KEY=VALUE (how the arithmetic "
                              "runs); the recipe is the study file's")
    settings = load_config(study.spec.base, sets).performance
    return [f"performance.{key}={json.dumps(value)}" for key, value in asdict(settings).items()], settings.compile


def run_chunk(args, study: Study, root: Path, runs: list[Run]) -> runner.Chunk:
    return runner.run_chunk(study, root, args.parallel, runs, runner.budget(args.budget), grace=args.grace,
                            performance=tuple(args.performance), compiled=args.compiled, per_process=args.per_process,
                            data_root=getattr(args, "data_root", None) or study.data_root())


def run(args, study: Study, root: Path, runs: list[Run]) -> int:
    """One chunk; exit status 1 where a chosen run has failed (its marker says how), for scripts."""
    run_chunk(args, study, root, runs)
    state.prune(study, root)
    show_status(args, study, root, runs)
    return 1 if any(state.status(study, root, run) == "failed" for run in runs) else 0


def show_status(args, study: Study, root: Path, runs: list[Run]) -> int:
    for row in state.progress_table(study, root, runs):
        collapse = f"collapse at {row['collapse']}" if row["collapse"] is not None else ""
        print(f"{row['run']:<32} {row['status']:<8} {row['iteration']:>7} / {row['target']:<7} {collapse}")
    print(outlook_line(state.outlook(study, root, runs)))
    return 0


def outlook_line(outlook: dict) -> str:
    """One line on the whole: the iterations trained of those planned, the runs that cannot go now, and at the
    last chunk's rate how long the rest would take (runs still waiting for their parent's collapse not counted)."""
    counts, trained, planned = outlook["counts"], outlook["trained"], outlook["planned"]
    share = f" ({100 * trained / planned:.0f} %)" if planned else ""
    line = f"{trained} of {planned} iterations trained{share}"
    others = [f"{counts[kind]} {kind}" for kind in ("waiting", "never", "failed") if counts.get(kind)]
    if others:
        line += f"; runs {', '.join(others)}"
        line += " (a waiting branch's iterations count once it can start)" if counts.get("waiting") else ""
    rate = outlook["last_chunk_rate"]
    if rate and planned > trained:
        device = f" on {outlook['last_chunk_device']}" if outlook.get("last_chunk_device") else ""
        line += (f"; at the last chunk's {rate:.1f} iterations/s in all{device}, the rest takes about "
                 f"{duration((planned - trained) / rate)} of chunks")
    return line


def duration(seconds: float) -> str:
    """40 s, 18 min, 3.6 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def carry(args, study: Study, root: Path, runs: list[Run]) -> int:
    """Fill --to with the state of the chosen runs, the data files and the wheels; check the size. A study whose
    state is kept with the code (saved_state, the default root) travels in the working tree instead: the whole
    study's state, saved now, and nothing of it twice."""
    transfer.reset(args.to)  # first: a --to that is no carry folder changes nothing
    state.prune(study, root)
    kept = study.saved_folder() if args.root is None else None
    (args.to / transfer.CARRY_STUDY).write_text(json.dumps({"study": study.name, "saved_state": kept is not None}))
    if kept is not None:
        saved.save(study, root, kept)
    else:
        folders = [path for run in runs for path in state.run_paths(root, run)]
        transfer.write_archive(transfer.state_files(root, folders), root, args.to / transfer.STATE)
    if study.data_root() is not None:
        print(f"{args.to}: compressing the data files of {study.data_root()} (xz; a minute the first time, then kept)")
        transfer.pack_data(study.data_root(), args.to)
    print(f"{args.to}: downloading the wheels the GPU image lacks ({', '.join(transfer.WHEELS)})")
    transfer.download_wheels(args.to)
    # last: the saved state above travels in the working tree, and the record's digest covers the tree as it goes
    (args.to / CARRY_CODE).write_text(json.dumps(provenance.carry_record()))
    tree = subprocess.run("git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1", shell=True,
                          capture_output=True, text=True).stdout.split()
    advice = (f"the working tree holds the whole study's saved state ({saved.size(kept) / 2**20:.1f} MiB in {kept}): "
              "fewer runs under way at once (a done run's last snapshot stays out of it)" if kept else None)
    total = transfer.carry_size(args.to, int(tree[0]) if tree else 0, advice)
    what = f"the study's state in {kept} (in the working tree)" if kept else f"{len(runs)} runs"
    print(f"{args.to}: {what}; the call carries {total / 2**20:.1f} MiB of {transfer.CARRY_LIMIT // 2**20}")
    return 0


def device(args, study: Study, root: Path, runs: list[Run]) -> int:
    """On the lent machine: install wheels, restore data and state, run one chunk, pack what changed into --out."""
    started = time.time()
    transfer.check_carry_study(args.carry, study.name)
    code = provenance.verify_carried(args.carry / CARRY_CODE)
    if code is not None:  # a copy here has no .git: its runs record the commit the carry names, checked against it
        os.environ[provenance.CODE_ENV] = json.dumps(code)
    transfer.install_wheels(args.carry)
    if study.data_root() is not None:
        args.data_root = transfer.unpack_data(args.carry, study.data_root())
    since = continuation.restore(args.carry, root, study)
    if since.continued:
        print("study: this machine's earlier chunk with this carry continues (its state is newer than the carry's); "
              "take each call's files back in order", file=sys.stderr)
    unpacked = time.time()
    try:
        run_chunk(args, study, root, runs)
    finally:  # also when a signal stopped the chunk: its runs' snapshots are what the call must return
        chunk_end = time.time()
        state.prune(study, root)
        origin = {"study": study.name, "since_chunks": since.chunks}
        parts = transfer.pack_changed(root, since.listing, args.out, origin, args.parts)
        continuation.packed(root, args.out)
        table = state.progress_table(study, root, runs)
        (args.out / "progress.json").write_text(json.dumps(table, indent=1))
        show_status(args, study, root, runs)
        # the phases apart: what a call must keep for unpacking, stopping and packing (measure_then_study.sh)
        print(f"{len(parts)} part(s) in {args.out}; {time.time() - started:.0f} s in all: unpacking "
              f"{unpacked - started:.0f} s, the chunk {chunk_end - unpacked:.0f} s, packing {time.time() - chunk_end:.0f} s")
    return 0


def take_back(args, study: Study, root: Path, runs: list[Run]) -> int:
    names = transfer.take_back(args.files, root, study.name, study)
    removed = state.prune(study, root)
    print(f"{len(names)} files into {root}; {len(removed)} snapshot files no later chunk needs removed")
    return show_status(args, study, root, runs)


COMMANDS = {"run": run, "status": show_status, "carry": carry, "device": device, "take-back": take_back}

if __name__ == "__main__":
    survive_readers_leaving()
    sys.exit(main())
