"""Reference statistics that generated images are scored against: a named file, or a data set's, cached.

A named file (`evaluation.reference_stats`, e.g. TTUR's `fid_stats_imagenet_train.npz`) is used as
given. Otherwise the statistics come from a data set over uint8 images as the loader returns them
(no dequantization noise) and are cached under a name derived from their key. Which data set:
the training data as configured (`evaluation.reference_split: null`), or, for long-tailed training
data, the same data set's balanced `reference_split` (`source.datasets.reference_args`: that split,
long tail off), as gSR scores CIFAR-10-LT against the balanced CIFAR-10 test split.

The cache key holds everything the statistics depend on: data set and its arguments (the long tail
when it is on), split, resolution, images and how they were chosen, preprocessing, backbone, and
whether the statistics are per class or per class group. KID needs features, not moments, so a
data set reference also keeps the pool3 features of (up to `KID_REFERENCE_FEATURES` of) its images.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from source.config import Config, ConfigError, first_line
from source.datasets import STANDARD_FILES, build_dataset, reference_args
from source.datasets.iterator import leave_stops_to_the_trainer, usable_workers
from source.files import load_refusal, torch_load
from source.training import checkpoint

from .groups import GROUPS, label_to_group
from .inception import PROTOCOL, InceptionBackbone, InceptionFeatures
from .statistics import (ReferenceStats, StatsMismatch, compute_reference_stats, key_differences,
                         load_cached_reference, load_class_stats, load_stats, reference_key, save_reference)

KID_REFERENCE_FEATURES = 10000  # reference features kept for KID (float32: 80 MB)
SUBSET_SEED = 0  # a reference of n < all images takes the first n of this permutation, whatever the run's seed
BACKBONE_TAG = "tfinception"
REAL_PREPROCESSING = "uint8 CHW as the dataset loads it, no dequantization noise, gray replicated to RGB"
NOT_CONTENT_ARGS = ("split", "size", "download", "dequantize")  # in the key elsewhere, or irrelevant to uint8 images
# where a standard data set's files lie says nothing of its images (STANDARD_FILES): a run that moved keeps its
# cache, also one written when the key still held it
LOCATION = ("root",)


def location_args(dataset: str) -> tuple[str, ...]:
    """The args of ``dataset`` that say only where its files lie: left out of its key, and of old keys compared."""
    return LOCATION if dataset in STANDARD_FILES else ()


class ReferenceUnavailable(RuntimeError):
    """A reference statistics file is missing or lacks what a metric needs."""


@dataclass
class Reference:
    path: str
    key: dict  # the cache key; {} for files from elsewhere (TTUR, sngan)
    stats: ReferenceStats  # per_class holds classes, or group indices (GROUPS order) for a group reference
    features: np.ndarray | None  # pool3 of reference images for KID; None when the file has moments only


@dataclass
class ReferenceData:
    """The data set a reference is computed from, with the name and args that built it."""
    name: str
    args: Any
    dataset: Dataset
    split: str | None  # evaluation.reference_split; None: the training data as configured


def reference_data(config: Config, training: Dataset | None = None) -> ReferenceData:
    """The configured reference data: `training` (built when None) or the balanced `reference_split`."""
    split, name = config.evaluation.reference_split, config.dataset.name
    if split is None:
        dataset = training if training is not None else build_dataset(name, config.dataset.args)
        return ReferenceData(name, config.dataset.args, dataset, None)
    args = reference_args(name, config.dataset.args, split)
    return ReferenceData(name, args, build_dataset(name, args), split)


def _long_tail(content: dict) -> dict | None:
    """The long-tail args when the subset is on, else None (then they stay out of the key, which keeps
    the keys, and caches, of data without a long tail as they were before long tails existed)."""
    long_tail = content.get("long_tail")
    if isinstance(long_tail, dict) and (long_tail.get("ratio", 1) != 1 or long_tail.get("n_max") is not None):
        return long_tail
    return None


def dataset_reference_key(data: ReferenceData, n_images: int, per_class: bool,
                          groups: dict[str, list[int]] | None = None) -> dict:
    args = dataclasses.asdict(data.args)
    content = {name: value for name, value in args.items() if name not in NOT_CONTENT_ARGS + location_args(data.name)}
    if _long_tail(content) is None:
        content.pop("long_tail", None)
    dataset = data.dataset
    subset = "all" if n_images == len(dataset) else f"first {n_images} of permutation seed {SUBSET_SEED}"
    extra = {**content, "channels": dataset.channels, "dataset_images": len(dataset), "subset": subset,
             "per_class": per_class}
    if groups is not None:
        extra["groups"] = {name: groups[name] for name in GROUPS}
    return reference_key(dataset=data.name, split=args.get("split", "all"), resolution=dataset.size,
                         preprocessing=REAL_PREPROCESSING, backbone=PROTOCOL, n_images=n_images, extra=extra)


def reference_cache_path(cache_dir: str, key: dict) -> str:
    """{dataset}_{split}_{size}px_{N}[_lt{ratio}[_max{n}]]_tfinception[_perclass|_groups].npz"""
    extra = key["extra"]
    long_tail = _long_tail(extra)
    tail = "" if long_tail is None else f"_lt{long_tail['ratio']:g}" + (
        "" if long_tail.get("n_max") is None else f"_max{long_tail['n_max']}")
    suffix = "_groups" if "groups" in extra else "_perclass" if extra["per_class"] else ""
    name = f"{key['dataset']}_{key['split']}_{key['resolution']}px_{key['n_images']}{tail}_{BACKBONE_TAG}{suffix}.npz"
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


class _Relabelled(Dataset):
    """Items of `dataset` with their label mapped (class -> group index), for per-group statistics."""

    def __init__(self, dataset: Dataset, mapping: dict[int, int]):
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, self.mapping[int(label)]


def compute_dataset_reference(
    dataset: Dataset, backbone: InceptionBackbone, n_images: int, per_class: bool, batch_size: int, num_workers: int
) -> tuple[ReferenceStats, np.ndarray]:
    """Statistics of the first n_images of the fixed permutation (all images when n_images = len), and features."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n_images]
    # A private generator: DataLoader would otherwise draw its base seed from the global RNG, and the
    # training streams would depend on whether this run or an earlier one computed the reference.
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=usable_workers(num_workers),
                        generator=torch.Generator(), worker_init_fn=leave_stops_to_the_trainer)
    keeper = _KeepFeatures(backbone, KID_REFERENCE_FEATURES)
    stats = compute_reference_stats(loader, keeper, per_class=per_class, total=n_images)
    return stats, np.concatenate(keeper.rows)


def reference_size(dataset: Dataset, n_images: int | None) -> int:
    return len(dataset) if n_images is None else min(n_images, len(dataset))


def dataset_reference(
    config: Config,
    data: ReferenceData,
    backbone: InceptionBackbone,
    n_images: int | None = None,
    per_class: bool = False,
    path: str | None = None,
    groups: dict[str, list[int]] | None = None,
    compute: bool = True,
) -> Reference:
    """The cached reference of `data` (refused if cached for another setup), computed and cached on first use.

    per_class: statistics of every class too (intra-FID); groups: of every class group instead (keyed
    by the group's index in GROUPS). compute=False: a missing one is ReferenceUnavailable (under torchrun: rank 0
    computing it for an hour would leave the other ranks waiting past their collective timeout).
    """
    n_images = reference_size(data.dataset, n_images)
    if n_images < 2:
        raise ReferenceUnavailable(f"a reference needs at least 2 images, the dataset offers {n_images}")
    key = dataset_reference_key(data, n_images, per_class, groups)
    path = path or reference_cache_path(config.evaluation.cache_dir, key)
    moved = tuple(f"extra.{name}" for name in location_args(data.name))
    cached = load_cached_reference(path, key, moved)
    features = _load_features(features_path(path), key, moved) if cached is not None else None
    if features is not None:
        return Reference(path, key, cached, features)
    what = f"{data.name} {'training' if data.split is None else data.split}"
    again = f" again: its features file {features_path(path)} is missing (KID needs it)" if cached is not None else ""
    if not compute:
        raise ReferenceUnavailable(f"the reference of {n_images} {what} images is not cached at {path}{again}; "
                                   "compute it first: `python evaluation.py ref-stats --config CONFIG` with the same "
                                   "--set options")
    tqdm.write(f"computing reference statistics of {n_images} {what} images -> {path}{again} (once, then cached; "
               f"evaluation.reference_images, or ref-stats --n-images, sets how many: a CPU's Inception does a few "
               f"images per second)")
    dataset = data.dataset if groups is None else _Relabelled(data.dataset, label_to_group(groups))
    stats, features = compute_dataset_reference(dataset, backbone, n_images, per_class or groups is not None,
                                                config.evaluation.batch_size, config.num_workers)
    save_reference(path, stats, key)
    checkpoint.atomic_save({"key": key, "pool3": torch.from_numpy(features)}, features_path(path))
    return Reference(path, key, stats, features)


def _load_features(path: str, key: dict, ignored: tuple[str, ...] = ()) -> np.ndarray | None:
    if not os.path.isfile(path):
        return None
    try:
        saved = torch_load(path)
        recorded, pool3 = saved["key"], saved["pool3"].numpy()
        if pool3.ndim != 2 or not np.isfinite(pool3).all():
            raise ValueError(f"{pool3.shape} features, NaN or infinite values among them" if pool3.ndim == 2
                             else f"features of shape {pool3.shape}, not (N, D)")
    except Exception as error:  # noqa: BLE001: damaged or not ours, in whatever way: one message
        raise StatsMismatch(f"reference features {path} are not readable ({load_refusal(error)}); delete it and its "
                            f"statistics file to recompute them") from None
    differences = key_differences(recorded, key, ignored) if isinstance(recorded, dict) else ["the key is not a mapping"]
    if differences:
        raise StatsMismatch(f"reference features {path} belong to another setup ({'; '.join(differences)}); "
                            "delete it and its statistics file to recompute them")
    return pool3


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
    n_images = meta.get("n_images", 0)
    if type(n_images) is not int or n_images < 0:
        raise ReferenceUnavailable(f"reference statistics {path}: its meta's n_images {n_images!r} is not a count")
    features = _load_features(features_path(path), meta) if meta else None
    return Reference(path, meta, ReferenceStats(mu, sigma, n_images, classes), features)


def check_reference_resolution(config: Config, real: int | None, what: str) -> None:
    """Inception resizes every image to 299 px, so fakes and reals of two sizes would give numbers without a word."""
    made = config.models.generator.arg("resolution")
    if real not in (None, made):
        raise ReferenceUnavailable(f"{what} are of {real} px images and the generator makes {made} px ones; give a "
                                   f"reference of {made} px images (dataset.args.size, --reference)")


def resolve_reference(config: Config, backbone: InceptionBackbone, training: Dataset | None = None,
                      per_class: bool = False, groups: dict[str, list[int]] | None = None,
                      compute: bool = True) -> Reference:
    """`evaluation.reference_stats`, else the cached reference of the configured reference data (computed if
    missing, unless not ``compute``: ``dataset_reference``).

    `training` is the training data set when it is already built (used only without a reference_split).
    """
    if config.evaluation.reference_stats is not None:
        if groups is not None:
            raise ReferenceUnavailable("group FIDs need a data set reference (per-group statistics); "
                                       "leave evaluation.reference_stats / --reference unset")
        return file_reference(config.evaluation.reference_stats, per_class)
    return dataset_reference(config, reference_data(config, training), backbone, config.evaluation.reference_images,
                             per_class, groups=groups, compute=compute)


def require_reference_before_distributed_training(config: Config, dataset: Dataset, world_size: int) -> None:
    """Under torchrun the training-time reference must exist before training starts: computed on rank 0
    at the first evaluation, it would keep the other ranks waiting past their collective timeout."""
    settings = config.evaluation
    evaluates = settings.metrics and config.evaluation_interval <= config.iteration
    if world_size == 1 or not evaluates or settings.reference_stats is not None:
        return
    data = reference_data(config, dataset)
    key = dataset_reference_key(data, reference_size(data.dataset, settings.reference_images), per_class=False)
    path = reference_cache_path(settings.cache_dir, key)
    missing = [name for name in (path, features_path(path)) if not os.path.isfile(name)]  # KID reads the second
    if missing:
        raise ConfigError(f"evaluation: the reference {' and '.join(missing)} do not exist yet; with torchrun compute "
                          "them first: `python evaluation.py ref-stats --config CONFIG` with the same --set options "
                          "(or train without evaluation: evaluation.metrics=[])")
