"""Evaluation of a generator: weights, reference statistics, scores with their protocol, and the Evaluate extension.

`evaluation.py` (scoring snapshots) and the `Evaluate` extension (scoring during training) share
everything here, so a number from either carries the same protocol record: backbone and weights,
sample count, IS splits, KID subsets, and the reference statistics file with its cache key.

Reference statistics come from a file the user names (`evaluation.reference_stats`, e.g. TTUR's
`fid_stats_imagenet_train.npz`) or are computed from the run's data set over uint8 images as the
loader returns them (no dequantization noise) and cached under a name derived from their key. KID
needs features, not moments, so a dataset reference also keeps the pool3 features of (up to
`KID_REFERENCE_FEATURES` of) its images next to the statistics.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from source.config import Config, ConfigError, EvaluationConfig, config_from_dict, first_line
from source.datasets import DatasetError, build_dataset
from source.metrics import (
    FID_HELPER,
    PROTOCOL,
    InceptionBackbone,
    InceptionFeatures,
    ReferenceStats,
    StatsMismatch,
    WeightsUnavailable,
    compute_reference_stats,
    feature_statistics,
    frechet_distance,
    inception_score,
    intra_fid,
    kernel_inception_distance,
    load_cached_reference,
    load_class_stats,
    load_stats,
    reference_key,
    save_reference,
)
from source.metrics.generate import concatenate_features, generated_features, sample_inputs, shard_bounds
from source.metrics.inception import LOGITS_UNAVAILABLE, WEIGHTS_FILE
from source.metrics.statistics import key_differences
from source.models import build_model
from source.training import checkpoint
from source.training.distributed import World, gather_objects
from source.training.trainer import Extension, Trainer

METRICS = ("is", "fid", "kid")
PUBLISHED_N = 50000  # generated images behind published IS/FID (IS over 10 splits of 5000)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults; the size is clipped to both sets
KID_REFERENCE_FEATURES = 10000  # reference features kept for KID (float32: 80 MB)
SUBSET_SEED = 0  # a reference of n < all images takes the first n of this permutation, whatever the run's seed
BACKBONE_TAG = "tfinception"
REAL_PREPROCESSING = "uint8 CHW as the dataset loads it, no dequantization noise, gray replicated to RGB"
SAMPLING = "G in eval mode, z ~ N(0, I), uniform random labels, uint8 by truncation (original), fixed seed"
IS_CONVENTION = "softmax of the 1008 logits with bias, columns 1..1000 not renormalised, consecutive splits (SNGAN)"
NOT_CONTENT_ARGS = ("split", "size", "download", "dequantize")  # in the key elsewhere, or irrelevant to uint8 images


class ReferenceUnavailable(RuntimeError):
    """A reference statistics file is missing or lacks what a metric needs."""


# --- generator ---------------------------------------------------------------------------------


@dataclass
class LoadedGenerator:
    gen: nn.Module
    config: Config
    iteration: int
    path: str


def load_generator(path: str, device: torch.device, overrides: list[str] = ()) -> LoadedGenerator:
    """G of a `snapshot_iter_N.pt` or `generator_iter_N.pt`, rebuilt from its config, in eval mode on `device`."""
    snapshot = checkpoint.load_snapshot(path)
    if "config" not in snapshot:
        raise ValueError(f"{path} has no 'config'; it was not written by this toolkit")
    config = config_from_dict(copy.deepcopy(snapshot["config"]), list(overrides), source=f"{path} (config)")
    spec = config.models.generator
    gen = build_model(spec.name, spec.args)
    try:
        gen.load_state_dict(snapshot["gen"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the generator weights do not fit {spec.name}({spec.args}): "
                         f"{first_line(error)}") from None
    return LoadedGenerator(gen.to(device).eval(), config, int(snapshot["iteration"]), str(path))


# --- Inception weights -------------------------------------------------------------------------


def load_backbone(weights: str | None, device: torch.device) -> tuple[InceptionBackbone, str | None]:
    """The backbone and a note when it fell back to the pool3-only copy.

    weights None means the standard torch-fidelity file (cache, else download) and, when that fails
    (offline), fid-helper's copy: FID and KID stay exact, only the Inception Score needs the full file.
    Building the network initialises layers from the global RNG before the weights replace them; the
    fork keeps that from shifting the training's random streams.
    """
    with torch.random.fork_rng(devices=[]):
        return _load_backbone(weights, device)


def _load_backbone(weights: str | None, device: torch.device) -> tuple[InceptionBackbone, str | None]:
    if weights is not None:
        return InceptionBackbone(weights, device), None
    try:
        return InceptionBackbone(None, device), None
    except WeightsUnavailable as error:
        standard_problem = str(error)
    try:
        backbone = InceptionBackbone(FID_HELPER, device)
    except WeightsUnavailable as error:
        raise WeightsUnavailable(f"{standard_problem}; the offline copy failed too: {error}") from None
    return backbone, f"{standard_problem}; using the offline pool3-only copy '{FID_HELPER}' (FID and KID, no IS)"


# --- reference statistics ----------------------------------------------------------------------


@dataclass
class Reference:
    path: str
    key: dict  # the cache key; {} for files from elsewhere (TTUR, sngan)
    stats: ReferenceStats
    features: np.ndarray | None  # pool3 of reference images for KID; None when the file has moments only


def dataset_reference_key(config: Config, dataset: Dataset, n_images: int, per_class: bool) -> dict:
    args = dataclasses.asdict(config.dataset.args)
    content = {name: value for name, value in args.items() if name not in NOT_CONTENT_ARGS}
    subset = "all" if n_images == len(dataset) else f"first {n_images} of permutation seed {SUBSET_SEED}"
    extra = {**content, "channels": dataset.channels, "dataset_images": len(dataset), "subset": subset,
             "per_class": per_class}
    return reference_key(dataset=config.dataset.name, split=args.get("split", "all"), resolution=dataset.size,
                         preprocessing=REAL_PREPROCESSING, backbone=PROTOCOL,
                         n_images=n_images, extra=extra)


def reference_cache_path(cache_dir: str, key: dict) -> str:
    suffix = "_perclass" if key["extra"]["per_class"] else ""
    name = f"{key['dataset']}_{key['split']}_{key['resolution']}px_{key['n_images']}_{BACKBONE_TAG}{suffix}.npz"
    return os.path.join(cache_dir, name)


def features_path(stats_path: str) -> str:
    return f"{os.path.splitext(stats_path)[0]}_pool3.pt"


class _KeepFeatures:
    """A backbone that also keeps the first `limit` pool3 rows it computes (KID needs features, not moments)."""

    def __init__(self, backbone: InceptionBackbone, limit: int):
        self.backbone, self.limit = backbone, limit
        self.rows: list[np.ndarray] = []
        self.kept = 0

    def features(self, images: torch.Tensor) -> InceptionFeatures:
        result = self.backbone.features(images)
        wanted = self.limit - self.kept
        if wanted > 0:
            self.rows.append(result.pool3[:wanted].astype(np.float32))
            self.kept += len(self.rows[-1])
        return result


def compute_dataset_reference(
    dataset: Dataset, backbone: InceptionBackbone, n_images: int, per_class: bool, batch_size: int, num_workers: int
) -> tuple[ReferenceStats, np.ndarray]:
    """Statistics of the first n_images of the fixed permutation (all images when n_images = len), and features."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n_images]
    # A private generator: DataLoader would otherwise draw its base seed from the global RNG, and the
    # training streams would depend on whether this run or an earlier one computed the reference.
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator())
    keeper = _KeepFeatures(backbone, KID_REFERENCE_FEATURES)
    stats = compute_reference_stats(loader, keeper, per_class=per_class, total=n_images)
    return stats, np.concatenate(keeper.rows)


def reference_size(dataset: Dataset, n_images: int | None) -> int:
    return len(dataset) if n_images is None else min(n_images, len(dataset))


def require_reference_before_distributed_training(config: Config, dataset: Dataset, world_size: int) -> None:
    """Under torchrun the training-time reference must exist before training starts: computed on rank 0
    at the first evaluation, it would keep the other ranks waiting past their collective timeout."""
    settings = config.evaluation
    evaluates = settings.metrics and config.evaluation_interval <= config.iteration
    if world_size == 1 or not evaluates or settings.reference_stats is not None:
        return
    key = dataset_reference_key(config, dataset, reference_size(dataset, settings.reference_images), per_class=False)
    path = reference_cache_path(settings.cache_dir, key)
    if not os.path.isfile(path):
        raise ConfigError(f"evaluation: the reference statistics {path} do not exist yet; with torchrun compute them "
                          "first: `python evaluation.py ref-stats --config CONFIG` with the same --set options "
                          "(or train without evaluation: evaluation.metrics=[])")


def dataset_reference(
    config: Config,
    dataset: Dataset,
    backbone: InceptionBackbone,
    n_images: int | None = None,
    per_class: bool = False,
    path: str | None = None,
) -> Reference:
    """The cached reference of `dataset` (refused if cached for another setup), computed and cached on first use."""
    n_images = reference_size(dataset, n_images)
    if n_images < 2:
        raise ReferenceUnavailable(f"a reference needs at least 2 images, the dataset offers {n_images}")
    key = dataset_reference_key(config, dataset, n_images, per_class)
    path = path or reference_cache_path(config.evaluation.cache_dir, key)
    cached = load_cached_reference(path, key)
    if cached is not None:
        return Reference(path, key, cached, _load_features(features_path(path), key))
    tqdm.write(f"computing reference statistics of {n_images} {config.dataset.name} images -> {path}")
    stats, features = compute_dataset_reference(dataset, backbone, n_images, per_class,
                                                config.evaluation.batch_size, config.num_workers)
    save_reference(path, stats, key)
    checkpoint.atomic_save({"key": key, "pool3": torch.from_numpy(features)}, features_path(path))
    return Reference(path, key, stats, features)


def _load_features(path: str, key: dict) -> np.ndarray | None:
    if not os.path.isfile(path):
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    differences = key_differences(saved["key"], key)
    if differences:
        raise StatsMismatch(f"reference features {path} belong to another setup ({'; '.join(differences)}); "
                            "delete it and its statistics file to recompute them")
    return saved["pool3"].numpy()


def file_reference(path: str, per_class: bool = False) -> Reference:
    """A statistics file named by the user: ours, TTUR's (mu/sigma) or sngan's (mean/cov); used as given."""
    if not os.path.isfile(path):
        raise ReferenceUnavailable(f"reference statistics {path} do not exist; compute them with "
                                   "`python evaluation.py ref-stats --config CONFIG --out PATH` or fix the path")
    try:
        mu, sigma, meta = load_stats(path)
        classes = load_class_stats(path) if per_class else {}
    except KeyError as error:
        raise ReferenceUnavailable(str(error).strip("'\"")) from None
    except (ValueError, OSError) as error:
        raise ReferenceUnavailable(f"cannot read reference statistics {path} ({first_line(error)})") from None
    features = _load_features(features_path(path), meta) if meta else None
    return Reference(path, meta, ReferenceStats(mu, sigma, int(meta.get("n_images", 0)), classes), features)


def resolve_reference(
    config: Config, backbone: InceptionBackbone, dataset: Dataset | None = None, per_class: bool = False
) -> Reference:
    """`evaluation.reference_stats`, else the cached reference of `dataset` (of the config's when None)."""
    if config.evaluation.reference_stats is not None:
        return file_reference(config.evaluation.reference_stats, per_class)
    if dataset is None:
        dataset = build_dataset(config.dataset.name, config.dataset.args)
    return dataset_reference(config, dataset, backbone, config.evaluation.reference_images, per_class)


# --- scores and their protocol -----------------------------------------------------------------


def available_metrics(
    requested: list[str], backbone: InceptionBackbone, reference: Reference
) -> tuple[list[str], list[str]]:
    """The requested metrics this backbone and reference can give, and a note for each one they cannot."""
    available, notes = [], []
    for metric in requested:
        if metric == "is" and not backbone.has_logits:
            notes.append(f"IS skipped: {LOGITS_UNAVAILABLE}; to get it, pass the full weights file {WEIGHTS_FILE} "
                         "(--inception-weights PATH or evaluation.inception_weights)")
        elif metric == "kid" and reference.features is None:
            notes.append(f"KID skipped: the reference {reference.path} holds moments only and KID needs features; "
                         "use a dataset reference (evaluation.reference_stats: null)")
        else:
            available.append(metric)
    return available, notes


def score(features: InceptionFeatures, metrics: list[str], reference: Reference, splits: int) -> dict[str, float]:
    """{"IS", "IS_std", "FID", "KID", "KID_std"}: the ones asked for, from the generated images' features."""
    scores: dict[str, float] = {}
    if "is" in metrics:
        scores["IS"], scores["IS_std"] = inception_score(features.logits, splits)
    if "fid" in metrics:
        scores["FID"] = frechet_distance(*feature_statistics(features.pool3), reference.stats.mu, reference.stats.sigma)
    if "kid" in metrics:
        scores["KID"], scores["KID_std"] = kernel_inception_distance(
            features.pool3, reference.features, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE)
    return scores


def protocol_record(
    backbone: InceptionBackbone, metrics: list[str], n_samples: int, splits: int, reference: Reference
) -> dict:
    """Everything a score depends on besides the model, stored with every number."""
    record = {"backbone": PROTOCOL, "weights": backbone.weights, "n_samples": n_samples, "sampling": SAMPLING,
              "reference": reference.path, "reference_key": reference.key}
    if "is" in metrics:
        record.update(splits=splits, inception_score=IS_CONVENTION)
    if "kid" in metrics:
        subset_size = min(KID_SUBSET_SIZE, n_samples, len(reference.features))
        record.update(kid_subsets=KID_SUBSETS, kid_subset_size=subset_size)
    return record


def describe(record: dict) -> str:
    """One line: the scores, then the protocol they were computed under and whether published numbers compare."""
    protocol = record["protocol"]
    values = []
    if "IS" in record:
        values.append(f"IS {record['IS']:.3f} ± {record['IS_std']:.3f} over {protocol['splits']} split(s)")
    if "FID" in record:
        values.append(f"FID {record['FID']:.3f}")
    if "KID" in record:
        values.append(f"KID {record['KID']:.5f} ± {record['KID_std']:.5f} "
                      f"({protocol['kid_subsets']} subsets of {protocol['kid_subset_size']})")
    if "intra_FID" in record:
        values.append(f"intra-FID {record['intra_FID']:.3f} over {len(record['intra_FID_per_class'])} classes "
                      f"of {protocol['samples_per_class']} samples")
    return (f"{', '.join(values)} | N={protocol['n_samples']} generated vs {describe_reference(protocol)} | "
            f"TF-Inception, weights {protocol['weights']} | {comparability(protocol)}")


def describe_reference(protocol: dict) -> str:
    key = protocol["reference_key"]
    if not {"dataset", "split", "resolution", "n_images"} <= key.keys():
        return f"{protocol['reference']} (external statistics)"
    return (f"{key['dataset']} {key['split']} {key['resolution']}px, {key['n_images']} images "
            f"({protocol['reference']})")


def comparability(protocol: dict) -> str:
    reasons = []
    if protocol["n_samples"] < PUBLISHED_N:
        reasons.append(f"N={protocol['n_samples']} < {PUBLISHED_N}, FID biased upward")
    if protocol.get("splits", 10) != 10:
        reasons.append(f"IS over {protocol['splits']} split(s), published over 10")
    if reasons:
        return f"not comparable with published numbers ({'; '.join(reasons)})"
    return "published protocol: comparable with published numbers computed against the same reference"


def intra_fid_score(
    gen: nn.Module, backbone: InceptionBackbone, reference: Reference, classes: list[int], samples_per_class: int,
    batch_size: int, device: torch.device, seed: int,
) -> tuple[float, dict[int, float]]:
    """sngan's intra-FID: mean over classes of FID(class samples, class reference), same latents for every class."""
    missing = sorted(set(classes) - set(reference.stats.per_class))
    if missing:
        raise ReferenceUnavailable(f"the reference {reference.path} has no statistics for classes {missing[:10]}")
    fake = {}
    for label in tqdm(classes, desc="intra-FID", unit="class"):
        z, labels = sample_inputs(samples_per_class, gen.dim_z, gen.n_classes, seed,
                                  labels=torch.full((samples_per_class,), label))
        fake[label] = feature_statistics(generated_features(gen, backbone, z, labels, batch_size, device).pool3)
    return intra_fid(fake, reference.stats.per_class)


# --- during training ---------------------------------------------------------------------------

# Problems that switch evaluation off during training instead of ending the run.
EVALUATION_ERRORS = (WeightsUnavailable, StatsMismatch, ReferenceUnavailable, DatasetError, OSError)


def check_settings(settings: EvaluationConfig, world_size: int) -> None:
    """Reject impossible evaluation settings before training starts (one-line ConfigError naming the key)."""
    unknown = sorted(set(settings.metrics) - set(METRICS))
    if unknown:
        raise ConfigError(f"evaluation.metrics: unknown {unknown}; choose from {list(METRICS)} "
                          "([] turns evaluation off)")
    if settings.n_samples < max(2, world_size):
        raise ConfigError(f"evaluation.n_samples: {settings.n_samples} is too few; need at least 2 and one per rank "
                          f"({world_size} ranks)")
    if "is" in settings.metrics and not 1 <= settings.splits <= settings.n_samples:
        raise ConfigError(f"evaluation.splits: {settings.splits} must be between 1 and n_samples={settings.n_samples}")
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


def gather_features(local: InceptionFeatures, world: World) -> InceptionFeatures | None:
    """Every rank's features in rank order on rank 0 (None elsewhere): the single-process evaluation set."""
    if not world.distributed:
        return local
    parts = [None] * world.size if world.is_main else None
    dist.gather_object(local, parts, dst=0)
    return concatenate_features(parts) if world.is_main else None


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

    def __init__(self, interval: int, config: Config, world_size: int):
        check_settings(config.evaluation, world_size)
        self.interval = interval
        self.config = config
        self.settings = config.evaluation
        self._backbone: InceptionBackbone | None = None
        self._reference: Reference | None = None
        self._metrics: list[str] = []
        self._disabled = False

    def __call__(self, trainer: Trainer) -> None:
        if self._disabled or (self._backbone is None and not self._prepare(trainer)):
            return
        started = time.perf_counter()
        world = trainer.world
        features = gather_features(self._local_features(trainer.updater.gen_module, world), world)
        if not world.is_main:
            return
        n_samples, splits = self.settings.n_samples, self.settings.splits
        record = {"iteration": trainer.iteration, **score(features, self._metrics, self._reference, splits),
                  "protocol": protocol_record(self._backbone, self._metrics, n_samples, splits, self._reference)}
        trainer.log.write(record, file="metrics.jsonl")
        tqdm.write(f"evaluation at iteration {trainer.iteration} ({time.perf_counter() - started:.0f} s): "
                   f"{describe(record)}")

    def _local_features(self, gen: nn.Module, world: World) -> InceptionFeatures:
        z, labels = sample_inputs(self.settings.n_samples, gen.dim_z, gen.n_classes, self.config.seed)
        start, end = shard_bounds(self.settings.n_samples, world.rank, world.size)
        shard_labels = None if labels is None else labels[start:end]
        return generated_features(gen, self._backbone, z[start:end], shard_labels, self.settings.batch_size,
                                  world.device)

    def _prepare(self, trainer: Trainer) -> bool:
        """Load weights and reference; all ranks agree on going ahead (no rank may wait on a gather alone)."""
        world, failure, notes = trainer.world, None, []
        try:
            self._backbone, note = load_backbone(self.settings.inception_weights, world.device)
            notes += [note] if note else []
            if world.is_main:
                self._reference = resolve_reference(self.config, self._backbone, trainer.updater.batches.dataset)
                self._metrics, skipped = available_metrics(self.settings.metrics, self._backbone, self._reference)
                notes += skipped
                if not self._metrics:
                    failure = f"none of the requested metrics can be computed ({'; '.join(skipped)})"
        except EVALUATION_ERRORS as error:
            failure = str(error)
        failures = [f for f in gather_objects(failure, world) if f]
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
