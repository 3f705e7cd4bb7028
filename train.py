"""Train a (spectrally regularized) SNGAN projection model.

    python train.py --config configs/demo.yaml
    python train.py --config configs/sr_imagenet.yaml --set dataset.args.root=/data/imagenet/train
    torchrun --nproc_per_node 4 train.py --config configs/sr_imagenet.yaml --set ...
    python train.py --resume RUN/snapshots/snapshot_iter_40000.pt --set updater.apply_SR=true

A resume starts from the run's own settings (the snapshot's config); ``--set`` changes them, and every
change is printed. ``--config`` is not needed then.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from source import provenance
from source.config import Config, ConfigError, load_config, save_config
from source.console import survive_readers_leaving
from source.datasets import DatasetError
from source.overrides import leftover_arguments
from source.typed import out_of_memory
from source.training import build, checkpoint, group, performance, resume, runfolder
from source.training.summary import batch_summary, describe_dataset, describe_terms, dry_run
from source.training.checkpoint import SnapshotError
from source.training.distributed import (World, broadcast_object, init_world, main_first, rank_from_env,
                                         record_for_launcher, shutdown_world, world_size_from_env)
from source.spectral.collapse import CollapseDetector
from source.training.evaluate import Evaluate, check_evaluation, require_reference_before_distributed_training
from source.training.extensions import (ClassSpectra, LogReport, Preview, ProgressBar, Snapshot, Spectra,
                                         WatchWeights)
from source.training.modes import Modes
from source.training.step_graphs import StepGraphError
from source.training.trainer import SnapshotWriteError, Trainer, TrainingDiverged


class FailedOnRankZero(Exception):
    """Rank 0 met an error it reports itself; the other ranks stop without repeating it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment file (not needed with --resume: the run's own settings "
                                         "are used, changed by --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. updater.apply_SR=true (repeatable)")
    parser.add_argument("--resume", metavar="SNAPSHOT", help="snapshot_iter_N.pt to continue from")
    parser.add_argument("--out", help="run folder, new or empty (default: results/<config name>, or the next free "
                                      "results/<config name>-N; a resume from a run's latest snapshot with unchanged "
                                      "settings (performance.* aside) continues that run, any other resume "
                                      "branches into RUN-resumeN)")
    parser.add_argument("--dry-run", action="store_true", help="build everything, print a summary, train nothing")
    parser.add_argument("--group", metavar="FILE", help="run the runs FILE lists (JSON) in this one process, "
                                                        "interleaved, each on its own CUDA stream "
                                                        "(source/training/group.py); nothing else with it")
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(leftover_arguments(args.overrides, extra))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: the run's log records it
    if args.group and (args.config or args.resume or args.overrides or args.out or args.dry_run):
        parser.error("--group FILE takes no other argument: each run's are in FILE")
    if not args.config and not args.resume and not args.group:
        parser.error("give --config FILE (a new run) or --resume SNAPSHOT")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.group:
        return group.main(args.group, open_run, failure_status)
    try:
        snapshot, config = read_settings(args)
        world = init_world(config.device)
    except (ConfigError, SnapshotError) as error:
        report(f"error: {error}")
        return 2
    except KeyboardInterrupt:
        return stopped_at_once(None)
    finished, trainer = False, None
    try:
        with ExitStack() as stack:
            trainer = start(args, config, snapshot, world, stack)
            if trainer is not None:
                trainer.run()
        finished = True
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM (the first stops after the iteration, with a snapshot)
        return stopped_at_once(trainer)
    except Exception as error:
        status = failure_status(error, world)
        if status is None:
            raise
        return status
    finally:
        shutdown_world(finished)


def stopped_at_once(trainer: Trainer | None) -> int:
    """Said in one line when a stop signal ends the run at once (nothing written): where it can resume from."""
    if trainer is None:
        report("stopped before training began; no iteration was trained")
        return 128 + signal.SIGINT
    latest = checkpoint.snapshots_of(trainer.out)[-1:]
    where = f"resume with --resume {latest[0]}" if latest else f"{trainer.out} holds no snapshot to resume from"
    report(f"stopped at once with {trainer.iteration} iterations done, without writing a snapshot; {where}")
    return 128 + (trainer.stop_signal or signal.SIGINT)


def read_settings(args: argparse.Namespace) -> tuple[dict | None, Config]:
    """The snapshot to resume (None for a new run) and the run's config."""
    snapshot = checkpoint.load_snapshot(args.resume, training_state=True) if args.resume else None
    config = resume.settings(args, snapshot) if snapshot else \
        load_config(args.config, args.overrides, world_size=world_size_from_env())
    return snapshot, config


def failure_status(error: Exception, world: World) -> int | None:
    """train.py's exit status for an error it expects (said in one line first): 2 bad input, 1 a run that cannot
    go on; None for any other (a bug: its traceback says more)."""
    if isinstance(error, FailedOnRankZero):
        return 2
    if isinstance(error, (ConfigError, DatasetError, SnapshotError, runfolder.RunFolderError)):
        report(f"error: {error}", world)
        return 2
    if isinstance(error, (TrainingDiverged, SnapshotWriteError, StepGraphError)):
        report(f"error: {'training diverged: ' if isinstance(error, TrainingDiverged) else ''}{error}", world)
        return 1
    if message := out_of_memory(error):
        report(f"error: {message}", world)
        return 1
    return None


def open_run(argv: list[str], stack: ExitStack, shared: dict) -> Trainer:
    """One run of a group (``--group``): its trainer, ready to advance; its run folder's lock on ``stack``.
    ``shared``: the group's backend settings, set by its first run, which every other run must match."""
    try:
        args = parse_args(argv)
    except SystemExit:  # argparse said why above (in the run's log); the group's other runs go on
        raise ConfigError(f"the run's arguments are not train.py's: {argv!r}") from None
    if args.group or args.dry_run:
        raise ConfigError("a run of a group takes --config/--resume, --set and --out only")
    args.group = shared.get("group")  # for its log's started event: the arguments came from that file
    snapshot, config = read_settings(args)
    if config.performance.compile:  # D's SN parametrizations make each instance a class of its own: every run
        # would recompile D, and past dynamo's recompile limit run it eagerly without a word (reduce-overhead's
        # graph trees would also share one memory pool across the runs' streams)
        raise ConfigError("performance.compile: a group's runs run uncompiled (step graphs are the fast path here)")
    backends = {key: config.to_dict()[key] for key in ("performance", "deterministic")}
    if shared.setdefault("backends", backends) != backends:
        raise ConfigError(f"the runs of a group share the process's backends: their performance.* and deterministic "
                          f"settings must agree (this run's {backends}, the first run's {shared['backends']})")
    world = init_world(config.device)
    if world.device.type == "cuda" and world.device.index != torch.cuda.current_device():
        raise ConfigError(f"device: {config.device}: a group's runs use the process's CUDA device, "
                          f"cuda:{torch.cuda.current_device()}")
    return start(args, config, snapshot, world, stack)


def report(message: str, world: World | None = None) -> None:
    """One line on stderr. Before the process group exists every rank reads the same files, so rank 0
    speaks for all; afterwards an error may be one rank's own (its data, its disk), so each rank speaks. Line breaks
    in what a message quotes (a file name, a group file's arguments) are shown escaped: one line whatever it holds."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    record_for_launcher(message)
    if world is None:
        if rank_from_env() == 0:
            print(message, file=sys.stderr)
    else:
        print(f"[rank {world.rank}] {message}" if world.distributed else message, file=sys.stderr)


def start(args: argparse.Namespace, config: Config, snapshot: dict | None, world: World,
          stack: ExitStack) -> Trainer | None:
    """Everything up to the first iteration: the models, the run folder (locked until ``stack`` closes), the data,
    the trainer, the resumed state. None after a dry run, which only prints what would run, and for a finished
    run."""
    changes = resume.config_changes(snapshot, config) if snapshot else []
    plan = plan_run_folder(args, snapshot, bool(resume.recipe_changes(changes, config.dataset.name)))
    performance.configure_backends(config.performance, config.deterministic)
    if config.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; read when its first handle is made (first matmul).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if snapshot:
        resume.check_networks(snapshot, config, args.resume)  # before the models' memory is taken
    if snapshot and not plan.in_place and snapshot["iteration"] >= config.iteration:  # before a folder is made
        raise ConfigError(f"iteration: {config.iteration}, but {args.resume} is at iteration {snapshot['iteration']}: "
                          f"a branch from it would train nothing (--set iteration=N with N > {snapshot['iteration']})")
    models = build.build_models(config, world.device)  # the same on every rank: seeded from config.seed
    checkpoint.seed_everything(config.seed + world.rank)
    if args.dry_run:
        if config.evaluation.metrics:  # what the evaluation checks when the run starts
            check_evaluation(config, world.size)
        dry_run(config, models, world, plan, args.config or args.resume, resumed_lines(args, snapshot, config, changes))
        return None
    out, folder = claim_run_folder(plan, world)
    if folder is not None:
        stack.callback(folder.release)
    if snapshot and snapshot["iteration"] >= config.iteration:  # in place (a branch was refused above); no log line
        if world.is_main:
            print(f"{args.resume}: the run has trained its {config.iteration} iterations: nothing to do (to train "
                  "longer: --set iteration=N, which continues in a folder of its own)")
        return None
    if world.is_main:  # a folder of a million images takes a while to list, STL-10 to shrink
        print(f"reading the training data ({config.dataset.name})", flush=True)
    with main_first(world):  # a data set download happens once, on rank 0
        batches = build.build_batches(config, world, source=args.config or args.resume)
    require_reference_before_distributed_training(config, batches.dataset, world.size)
    counts = build.generator_class_counts(config, batches.dataset) if models.gen.n_classes else []
    trainer = Trainer(build.build_updater(config, world, models, batches), stop=config.iteration, out=out,
                      world=world, config_dict=config.to_dict(), extensions=make_extensions(config, world, counts))
    stack.callback(trainer.close)  # also when the resume below fails: its log and event writer are closed
    if snapshot:
        # the original's replicas were copied before the snapshot was loaded: they hold the initial models
        branch = Path(out).resolve() != checkpoint.run_folder_of(args.resume)
        trainer.updater.artefact = resume.artefact(config, models, branch)
        resume.restore(trainer, snapshot, args.resume, changes, world)
        if trainer.updater.artefact is not None:
            trainer.log.event(trainer.iteration, "resume_artefact", devices=config.updater.resume_artefact_devices)
    if world.is_main:
        command = ["train.py", *args.argv]  # a group's run: its own arguments, as its group file gives them
        trainer.log.event(trainer.iteration, "started", **provenance.started(command, world.device, world.size),
                          **({"group": str(args.group)} if args.group else {}))
        save_config(config, out / "config.yaml")
        print(f"run folder: {out}  (global batch {batch_summary(config, world)})", flush=True)
        print(f"data: {describe_dataset(config, batches.dataset)}", flush=True)
        print(f"terms: {describe_terms(config, models.gen)}", flush=True)  # LeCam, DiffAugment, gSR, EMA, as set
        if config.performance.compile:  # dynamo compiles on the first steps, silently
            print(f"compiling G and D on their first steps (torch.compile, mode {config.performance.compile_mode}): "
                  "minutes on a CPU, a minute or more on a GPU, before the first iteration line", flush=True)
    if trainer.updater.apply_SR:
        trainer.log.event(trainer.iteration, "sr_start", mode=config.updater.sr.mode)
    if snapshot and not branch:
        trainer.catch_up()  # an evaluation that a stop or crash interrupted at the snapshot's iteration, first
    return trainer


def resumed_lines(args: argparse.Namespace, snapshot: dict | None, config: Config, changes: list[str]) -> list[str]:
    """What a resume would say first (a dry run's last lines): where it starts, whether anything is left to train,
    and every setting that differs from the snapshot's."""
    if snapshot is None:
        return []
    done = snapshot["iteration"] >= config.iteration  # in place: a branch with nothing to train was refused above
    return [f"resumes {args.resume} at iteration {snapshot['iteration']}"
            + (f": the run has trained its {config.iteration} iterations, nothing to do" if done else "")] + \
        resume.change_lines(changes)


def plan_run_folder(args: argparse.Namespace, snapshot: dict | None, changed: bool) -> runfolder.Plan:
    """A new run gets a new (or empty) folder; a resume continues its run in place only from the run's latest
    snapshot with unchanged settings, otherwise it branches (the SN run whose 40k snapshot is resumed with SR is kept)."""
    default = Path("results") / Path(args.config or "resumed").stem
    if snapshot is None:
        return runfolder.plan_fresh(args.out, default)
    return runfolder.plan_resume(args.out, args.resume, snapshot["iteration"], changed, default)


def claim_run_folder(plan: runfolder.Plan, world: World) -> tuple[Path, runfolder.RunFolder | None]:
    """Rank 0 locks the folder (the only rank that writes there) and tells the others where it is."""
    folder, error = None, None
    if world.is_main:
        try:
            folder = runfolder.claim(plan)
        except runfolder.RunFolderError as failure:
            error = str(failure)
    path, error = broadcast_object((folder.path if folder else None, error), world)
    if error:
        raise runfolder.RunFolderError(error) if world.is_main else FailedOnRankZero()
    if world.is_main and path != plan.first:
        print(f"{plan.first} is taken (another run's folder, or in use); this run writes to {path}")
    return path, folder


def make_extensions(config: Config, world: World, class_counts: list[int]) -> list:
    """``class_counts``: training images per class of G's classes ([] for an unconditional G)."""
    collapse = config.updater.collapse
    detector = CollapseDetector(threshold=collapse.threshold, min_layers=collapse.min_layers)
    return [ProgressBar(enabled=world.is_main and sys.stderr.isatty()), LogReport(config.display_interval),
            WatchWeights(config.display_interval),
            Preview(config.preview_interval, seed=config.seed),
            Spectra(config.spectra_interval, detector, auto_sr=config.updater.apply_SR == "auto"),
            *([ClassSpectra(config.spectra_interval, class_counts)] if class_counts else []),
            # before the evaluations, which may take minutes: a crash or a second Ctrl-C in one loses no training
            Snapshot(config.snapshot_interval),
            *([Evaluate(config.evaluation_interval, config, world.size)] if config.evaluation.metrics else []),
            *([Modes(config.evaluation.modes_interval, config)] if config.evaluation.modes_interval else [])]


if __name__ == "__main__":
    survive_readers_leaving()
    sys.exit(main())
