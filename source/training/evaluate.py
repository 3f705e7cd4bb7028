"""Evaluation of a generator: its weights from a snapshot, and the Evaluate extension scoring during training.

The scores, references and protocol records live in `source.metrics` (`scoring`, `reference`,
`describe`), shared with `evaluation.py`, so a number from either carries the same protocol.
Where a run keeps an EMA of G (`updater.ema`), evaluation scores the EMA, as BigGAN and gSR do;
the protocol record says which weights were scored (`"generator": "ema"` or `"raw"`) and how G's
BatchNorm normalized while generating (`"g_batchnorm"`, `evaluation.g_batchnorm`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from source.config import Config, ConfigError, EvaluationConfig, config_from_dict, first_line
from source.datasets import DatasetError, reference_args
from source.metrics import FID_HELPER, InceptionBackbone, InceptionFeatures, StatsMismatch, WeightsUnavailable
from source.metrics.describe import describe
from source.metrics.generate import (concatenate_features, g_batchnorm, generated_features, generation_mode,
                                     sample_inputs, shard_bounds)
from source.metrics.inception import WEIGHTS_FILE
from source.metrics.reference import (BACKBONE_TAG, Reference, ReferenceUnavailable,
                                      require_reference_before_distributed_training, resolve_reference)
from source.metrics.scoring import METRICS, available_metrics, load_backbone, protocol_record, score
from source.overrides import overridden
from source.models import build_model
from source.training import checkpoint
from source.training.distributed import World, gather_objects
from source.training.extension import Extension
from source.training.trainer import Trainer

__all__ = ["EVALUATION_ERRORS", "Evaluate", "LoadedGenerator", "check_evaluation", "check_reference_split",
           "check_settings",
           "gather_features", "generator_weights", "load_generator",
           "require_reference_before_distributed_training"]  # the last one: train.py imports it from here

# --- generator ---------------------------------------------------------------------------------


@dataclass
class LoadedGenerator:
    gen: nn.Module
    config: Config
    iteration: int
    path: str
    weights: str = "raw"  # "ema": G's exponential moving average; "raw": the trained weights
    cache_note: str | None = None  # for_this_machine's, for a command that caches references


def generator_weights(snapshot: dict, path: str, raw: bool) -> tuple[str, str]:
    """(entry holding the weights to score, "ema" or "raw"): the EMA when the file has one, unless raw."""
    if snapshot.get("gen_is_ema"):  # a generator export of an EMA run: "gen" is the average, the raw G is not there
        if raw:
            raise ValueError(f"{path} holds only G's EMA (a generator export of a run with updater.ema); "
                             "for the raw weights use the snapshot_iter_N.pt of the same iteration")
        return "gen", "ema"
    if "gen_ema" in snapshot and not raw:
        return "gen_ema", "ema"
    return "gen", "raw"


def load_generator(path: str, device: torch.device, overrides: list[str] = (), raw: bool = False) -> LoadedGenerator:
    """G of a `snapshot_iter_N.pt` or `generator_iter_N.pt`, rebuilt from its config, in eval mode on `device`.

    Its EMA weights when the file has them (`gen_ema`, or an export marked `gen_is_ema`), unless `raw`.
    """
    snapshot = checkpoint.load_snapshot(path)
    if "config" not in snapshot:
        raise ValueError(f"{path} has no 'config'; it was not written by this toolkit")
    config = config_from_dict(snapshot["config"], list(overrides), source=f"{path} (config)")
    note = for_this_machine(config, overrides)
    entry, weights = generator_weights(snapshot, str(path), raw)
    spec = config.models.generator
    misfit = checkpoint.weights_misfit(entry, spec, snapshot[entry])  # before G's memory is allocated
    if misfit:
        raise ValueError(f"{path}: the generator weights '{entry}' do not fit {spec.name}({spec.args}): {misfit}")
    broken = checkpoint.non_finite(snapshot[entry])
    if broken:  # its images would be NaN, quantized to black, and scored as if G had drawn them
        raise ValueError(f"{path}: the generator weights '{entry}' hold NaN or infinite values ({', '.join(broken[:3])}"
                         f"{', ...' if len(broken) > 3 else ''})")
    gen = build_model(spec.name, spec.args)
    gen.load_state_dict(snapshot[entry])
    return LoadedGenerator(gen.to(device).eval(), config, int(snapshot["iteration"]), str(path), weights, note)


def for_this_machine(config: Config, overrides: list[str]) -> str | None:
    """A snapshot may come from someone else. Its config's `download: true` (CIFAR-10's default) does not make this
    machine download a data set into the folder it names (evaluating or resuming it), and its evaluation.cache_dir,
    a folder of the machine it was trained on, is used only where it holds reference statistics here; else
    references are cached in the default folder, never in a folder a file chose (such as ~/.config/autostart; a note
    says so: returned). The user's own --set (of the key or a mapping above it) decides both."""
    if hasattr(config.dataset.args, "download") and not overridden(overrides, "dataset.args.download"):
        config.dataset.args.download = False
    default, cache_dir = EvaluationConfig.cache_dir, config.evaluation.cache_dir
    if overridden(overrides, "evaluation.cache_dir") or cache_dir == default or (
            os.path.isdir(cache_dir) and any(Path(cache_dir).glob(f"*_{BACKBONE_TAG}*.npz"))):
        return None
    config.evaluation.cache_dir = default
    return (f"the snapshot's evaluation.cache_dir {cache_dir} holds no reference statistics here: they are cached "
            f"in {default} (--set evaluation.cache_dir=DIR to choose)")


# --- during training ---------------------------------------------------------------------------

# Problems that switch evaluation off during training instead of ending the run.
EVALUATION_ERRORS = (WeightsUnavailable, StatsMismatch, ReferenceUnavailable, DatasetError, OSError)


MOST_SAMPLES = 10**6


def check_settings(settings: EvaluationConfig, world_size: int) -> None:
    """Reject impossible evaluation settings before training starts (one-line ConfigError naming the key)."""
    unknown = sorted(set(settings.metrics) - set(METRICS))
    if unknown:
        raise ConfigError(f"evaluation.metrics: unknown {unknown}; choose from {list(METRICS)} "
                          "([] turns evaluation off)")
    if settings.n_samples < max(2, world_size):
        raise ConfigError(f"evaluation.n_samples: {settings.n_samples} is too few; need at least 2 and one per rank "
                          f"({world_size} ranks)")
    if settings.n_samples > MOST_SAMPLES:  # latents are drawn at once; a received snapshot's 10^12 was 512 TB
        raise ConfigError(f"evaluation.n_samples: {settings.n_samples} is over {MOST_SAMPLES:,} (the protocols use "
                          "50,000); give fewer (evaluation.py: --n-samples)")
    if "is" in settings.metrics and not 1 <= settings.splits <= settings.n_samples:
        raise ConfigError(f"evaluation.splits: {settings.splits} must be between 1 and n_samples={settings.n_samples}")
    if settings.few_at_most >= settings.many_above:
        raise ConfigError(f"evaluation.few_at_most: {settings.few_at_most} must be below evaluation.many_above "
                          f"({settings.many_above}); gSR: few <= 40 < medium <= 100 < many")
    if settings.batch_size < 1:
        raise ConfigError(f"evaluation.batch_size: must be positive, got {settings.batch_size}")
    if settings.reference_images is not None and settings.reference_images < 2:
        raise ConfigError(f"evaluation.reference_images: need at least 2, got {settings.reference_images}")
    weights = settings.inception_weights
    if weights not in (None, FID_HELPER) and not os.path.isfile(weights):
        raise ConfigError(f"evaluation.inception_weights (--inception-weights): no file at {weights}; give the "
                          f"path of {WEIGHTS_FILE}, '{FID_HELPER}' (offline, FID/KID only) or null")
    if settings.reference_stats is not None and not os.path.isfile(settings.reference_stats):
        raise ConfigError(f"evaluation.reference_stats (--reference): no file at {settings.reference_stats}; "
                          "compute one with `python evaluation.py ref-stats` or set null for the dataset's cached one")


def check_evaluation(config: Config, world_size: int) -> None:
    """What a run's evaluation checks before training (also a dry run's): its settings and its reference split."""
    check_settings(config.evaluation, world_size)
    check_reference_split(config)


def check_reference_split(config: Config) -> None:
    """A reference split the data set does not have is a config error, found before training starts."""
    split = config.evaluation.reference_split
    if split is None:
        return
    if config.evaluation.reference_stats is not None:
        raise ConfigError("evaluation.reference_split: set it or evaluation.reference_stats, not both "
                          "(a statistics file is used as given, whatever its split)")
    try:
        reference_args(config.dataset.name, config.dataset.args, split)
    except DatasetError as error:
        raise ConfigError(f"evaluation.reference_split: {first_line(error)}") from None


def gather_features(local: InceptionFeatures, world: World) -> InceptionFeatures | None:
    """Every rank's features in rank order on rank 0 (None elsewhere): the single-process evaluation set."""
    if not world.distributed:
        return local
    parts = [None] * world.size if world.is_main else None
    dist.gather_object(local, parts, dst=0)
    return concatenate_features(parts) if world.is_main else None


def weights_identity(backbone: InceptionBackbone | None, world: World) -> tuple[str, str] | None:
    """What a rank's Inception network is (its file and a digest of its weights), compared between ranks."""
    if backbone is None or not world.distributed:  # one process: nothing to compare, no digest to compute
        return None
    return backbone.weights, backbone.fingerprint()


def weights_disagreement(identities: list[tuple[str, str] | None]) -> list[str]:
    """A failure when the ranks' Inception networks differ (a rank's own download or fallback, another machine's
    file): features gathered from them would be scored as one set. Their digests decide: one file under two paths
    (each node's own cache) is the same network. One process: [None]."""
    if len({identity and identity[1] for identity in identities}) <= 1:
        return []
    listed = "; ".join(f"rank {rank}: {weights} (weights {digest})"
                       for rank, (weights, digest) in enumerate(identities))
    return [f"the ranks loaded different Inception weights ({listed}); give every rank the same file "
            f"(evaluation.inception_weights)"]


class Evaluate(Extension):
    """IS / FID / KID of `evaluation.n_samples` generated images -> metrics.jsonl, tensorboardX and the console.

    Each rank generates and scores its shard of the fixed evaluation set; rank 0 gathers the
    features, scores them and writes. The first call loads the Inception weights (every rank) and
    the reference (rank 0, computing and caching it when needed; precompute it with
    `evaluation.py ref-stats` on large data, or the other ranks may time out waiting). A problem
    there (no weights, a mismatching cache) is reported loudly and turns evaluation off instead of
    ending the run: snapshots can still be scored with `evaluation.py metrics`. Not fired at the end
    of a run (as the original's trigger): the Trainer's tests and short runs stay cheap.
    """

    takes_long = "the evaluation"
    record_file = "metrics.jsonl"

    def __init__(self, interval: int, config: Config, world_size: int):
        check_evaluation(config, world_size)
        self.interval = interval
        self.config = config
        self.settings = config.evaluation
        self._backbone: InceptionBackbone | None = None
        self._reference: Reference | None = None
        self._metrics: list[str] = []
        self._disabled = False
        self._weights = "ema" if config.updater.ema.enabled else "raw"
        # a rank's shard (the smallest: shards differ by one image) is one batch when smaller than the batch size
        self._batchnorm = g_batchnorm(self.settings).for_images(self.settings.n_samples // world_size)

    def __call__(self, trainer: Trainer) -> None:
        started = time.perf_counter()
        if self._disabled or (self._backbone is None and not self._prepare(trainer)):
            return
        prepared = time.perf_counter() - started  # the first call's network and reference statistics (minutes)
        world = trainer.world
        features = gather_features(self._local_features(self._generator(trainer), world), world)
        if not world.is_main:
            return
        n_samples, splits = self.settings.n_samples, self.settings.splits
        record = {"iteration": trainer.iteration, **score(features, self._metrics, self._reference, splits),
                  "protocol": protocol_record(self._backbone, self._metrics, n_samples, splits, self._reference,
                                              self._weights, self.settings.reference_split,
                                              batchnorm=self._batchnorm)}
        trainer.log.write(record, file=self.record_file)
        once = f", {prepared:.0f} s of it loading the network and reference statistics, once" if prepared >= 1 else ""
        tqdm.write(f"evaluation at iteration {trainer.iteration} ({time.perf_counter() - started:.0f} s{once}): "
                   f"{describe(record)}")

    @staticmethod
    def _generator(trainer: Trainer) -> nn.Module:
        """G's EMA when the run keeps one (the updater's eval_generator), else G."""
        return getattr(trainer.updater, "eval_generator", trainer.updater.gen_module)

    def _local_features(self, gen: nn.Module, world: World) -> InceptionFeatures:
        z, labels = sample_inputs(self.settings.n_samples, gen.dim_z, gen.n_classes, self.config.seed)
        start, end = shard_bounds(self.settings.n_samples, world.rank, world.size)
        shard_labels = None if labels is None else labels[start:end]
        with generation_mode(gen, self._batchnorm, world.device):  # the model comes back unchanged
            return generated_features(gen, self._backbone, z[start:end], shard_labels, self.settings.batch_size,
                                      world.device)

    def _prepare(self, trainer: Trainer) -> bool:
        """Load weights and reference; all ranks agree on going ahead (no rank may wait on a gather alone)."""
        world, failure, notes = trainer.world, None, []
        try:
            self._backbone, note = load_backbone(self.settings.inception_weights, world.device)
            notes += [note] if note else []
            if world.is_main:
                # the training data set is reused as the reference data unless evaluation.reference_split is set
                self._reference = resolve_reference(self.config, self._backbone, trainer.updater.batches.dataset,
                                                    compute=not world.distributed)  # the others would wait an hour
                self._metrics, skipped = available_metrics(self.settings.metrics, self._backbone, self._reference)
                notes += skipped
                if not self._metrics:
                    failure = f"none of the requested metrics can be computed ({'; '.join(skipped)})"
        except EVALUATION_ERRORS as error:
            failure = str(error)
        reported = gather_objects((failure, weights_identity(self._backbone, world)), world)
        failures = [f for f, _ in reported if f] or weights_disagreement([identity for _, identity in reported])
        if world.is_main:
            for note in notes:
                tqdm.write(f"evaluation: {note}")
        if failures:
            self._disable(trainer, failures[0])
        return not failures

    def _disable(self, trainer: Trainer, reason: str) -> None:
        self._disabled, self._backbone = True, None
        trainer.log.event(trainer.iteration, "evaluation_disabled", reason=reason)
        if trainer.world.is_main:
            tqdm.write(f"\n{'!' * 80}\nEVALUATION OFF from iteration {trainer.iteration}: {reason}\n"
                       f"Training goes on; score snapshots later with `python evaluation.py metrics --snapshot ...`."
                       f"\n{'!' * 80}")


def resolve_device(name: str) -> torch.device:
    """A device named on the command line (``auto``: cuda when there is one); a ValueError for one not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; cpu, cuda, cuda:1, ... or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda devices generate here")
    return device
