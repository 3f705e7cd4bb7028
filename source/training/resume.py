"""What a resume reads and changes: the run's own settings with ``--set`` on top, whether the resume continues its
run in place or branches into a new folder, the original's resume artefact, and the trainer's restored state
(logs cut back to the snapshot's iteration).
"""
from __future__ import annotations

import argparse
import math

from source.config import Config, ConfigError, config_from_dict, load_config
from source.datasets import STANDARD_FILES
from source.training import build, checkpoint
from source.training.checkpoint import SnapshotError
from source.training.distributed import World, rank_from_env, world_size_from_env
from source.training.evaluate import for_this_machine
from source.training.extensions import ClassSpectra
from source.training.modes import Modes
from source.training.resume_artefact import ResumeArtefact
from source.training.runlog import DamagedLog, events, truncate_after
from source.training.trainer import Trainer
from source.typed import config_differences


def settings(args: argparse.Namespace, snapshot: dict) -> Config:
    """The run's own settings with ``--set`` on top; a ``--config`` file given too is only compared, not used."""
    config = config_from_dict(snapshot["config"], args.overrides, source=f"{args.resume} (its config)",
                              world_size=world_size_from_env())
    note = for_this_machine(config, args.overrides)
    if note and config.evaluation.metrics and rank_from_env() == 0:
        print(f"note: {note}")
    if args.config:
        file_differs = config_differences(snapshot_config(snapshot), load_config(args.config).to_dict())
        if file_differs and rank_from_env() == 0:
            print(f"note: resuming with the run's own settings, not those of {args.config} ({len(file_differs)} "
                  f"differ, e.g. {file_differs[0]}); change settings with --set KEY=VALUE")
    return config


def snapshot_config(snapshot: dict) -> dict:
    """The snapshot's config with today's defaults filled in: keys added to the format since are no change."""
    try:
        return config_from_dict(snapshot["config"], source="snapshot").to_dict()
    except ConfigError:  # a config this version no longer accepts: compare it as written
        return snapshot["config"]


def config_changes(snapshot: dict, config: Config) -> list[str]:
    """What the resume changes of the snapshot's settings, one ``key: old -> new`` line each."""
    return config_differences(snapshot_config(snapshot), config.to_dict())


def check_networks(snapshot: dict, config: Config, path: str) -> None:
    """The snapshot's G and D weights fit the configured models (checked on shapes alone, before the models are
    built): a resume may change training settings, not the networks."""
    for key, spec in (("gen", config.models.generator), ("dis", config.models.discriminator)):
        misfit = checkpoint.weights_misfit(key, spec, snapshot[key])
        if misfit:
            raise ConfigError(f"{path} does not fit the configured models ({misfit}); a resume may change "
                              "training settings, not the networks")


def artefact(config: Config, models: build.Models, branch: bool) -> ResumeArtefact | None:
    """The original's first-iteration-after-a-resume artefact, when ``updater.resume_artefact`` asks for it here."""
    setting = config.updater.resume_artefact
    if setting == "every" or (setting == "branch" and branch):
        return ResumeArtefact(models.gen, models.dis, config.updater.resume_artefact_devices, config.bn_batch)
    return None


# how often a run reports, evaluates, draws its grid and keeps a snapshot: what it records, not what it trains (none
# draws from the training's random streams). spectra_interval is not among them: the collapse detector, which may
# switch SR on, checks at its iterations.
RECORDING = ("display_interval", "evaluation_interval", "preview_interval", "snapshot_interval")


def recipe_changes(changes: list[str], dataset: str) -> list[str]:
    """The changes that make a resume a branch: all but ``performance.*``, which changes how the arithmetic runs,
    ``RECORDING``'s intervals and, for a standard data set (``STANDARD_FILES``: its name fixes its images),
    ``dataset.args.root``, where its files lie: a run may continue in place with compile or TF32 switched, evaluated
    less often, or moved to a machine that keeps the files elsewhere (the log's resume event lists every change). A
    folder of images' root says which images: a branch. ``dataset.args.download`` only says whether to fetch the
    files: a resume leaves it off unless --set asks; ``evaluation.cache_dir`` only where references are cached
    (each checked against its key when read)."""
    kept = (*RECORDING, "dataset.args.root" if dataset in STANDARD_FILES else None, "dataset.args.download",
            "evaluation.cache_dir")
    return [line for line in changes if not line.startswith("performance.") and line.partition(":")[0] not in kept]


def change_lines(changes: list[str]) -> list[str]:
    """How a resume lists the settings that differ from its snapshot's (the run and its --dry-run)."""
    return [f"  config change: {line}" for line in changes]


def restore(trainer: Trainer, snapshot: dict, path: str, changes: list[str], world: World) -> None:
    """The snapshot's state into ``trainer``, and the run folder's logs cut back to its iteration: in place, what ran
    after the snapshot is trained again (its stop's elapsed time kept, generator exports of that timeline removed);
    a branch's folder is new."""
    try:
        trainer.load_state_dict(snapshot)
    except checkpoint.SnapshotMismatch as error:
        raise ConfigError(f"{path} does not fit the configured models ({error}); a resume may change "
                          "training settings, not the networks") from None
    except SnapshotError as error:
        raise SnapshotError(f"{path}: {error}") from None
    if world.is_main:
        print(f"resumed from {path} at iteration {trainer.iteration}")
        for line in change_lines(changes):
            print(line)
        for name in ("log.jsonl", "metrics.jsonl", ClassSpectra.FILE, Modes.FILE):
            try:
                truncate_after(trainer.out / name, trainer.iteration)
            except DamagedLog as error:
                raise SnapshotError(f"{error}; the run's log is damaged (delete or mend that line)") from None
        trainer.log.purge_after(trainer.iteration)
        stops = [e["elapsed"] for e in events(trainer.out, "interrupted") if e.get("iteration") == trainer.iteration
                 and type(e.get("elapsed")) in (int, float) and 0 <= e["elapsed"] < math.inf]
        trainer.elapsed_before = max([trainer.elapsed_before, *stops[-1:]])  # with what ran after its snapshot
        for orphan in checkpoint.exports_after(trainer.out, trainer.iteration):  # of the timeline this one replaces
            orphan.unlink(missing_ok=True)
    trainer.log.event(trainer.iteration, "resumed", snapshot=str(path), changes=changes)
