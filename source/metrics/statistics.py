"""Feature statistics files and the reference-statistics cache.

Files are TTUR-compatible `.npz`: arrays `mu` and `sigma` (so TTUR's and our reference files are
interchangeable), plus a JSON `meta` string recording what the statistics were computed from and,
for intra-FID, `class_labels`, `class_mu` [K, D], `class_sigma` [K, D, D].

A cached reference is only reused when its recorded key equals the key of the current setup;
any difference (resolution, split, preprocessing, backbone, sample count, ...) is refused with
the differing fields named, because a stale reference silently shifts every FID computed against it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from source.files import open_npz

from .fid import Statistics
from .inception import InceptionBackbone

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | np.ndarray]


class StatsMismatch(ValueError):
    """Cached statistics were computed for a different setup than the one asking for them."""


class FeatureMoments:
    """Running mean and covariance of features, merged batch by batch (Chan et al.'s pairwise update).

    Keeps one D x D float64 scatter matrix (32 MB for D = 2048) instead of all features, so
    statistics of a full training set fit in memory; the pairwise merge stays exact where the
    naive sum-of-outer-products formula would cancel catastrophically.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        batch_mean = features.mean(axis=0)
        centered = features - batch_mean
        batch_scatter = centered.T @ centered
        if self.n == 0:
            self.n, self.mean, self.scatter = len(features), batch_mean, batch_scatter
            return
        total = self.n + len(features)
        delta = batch_mean - self.mean
        self.scatter += batch_scatter + np.outer(delta, delta) * (self.n * len(features) / total)
        self.mean = self.mean + delta * (len(features) / total)
        self.n = total

    def statistics(self) -> Statistics:
        """(mu, unbiased sigma), equal to `feature_statistics` of all features added."""
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 samples, got {self.n}")
        return self.mean.copy(), self.scatter / (self.n - 1)


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    n_images: int
    per_class: dict[int, Statistics] = field(default_factory=dict)


def _split_batch(batch: Batch) -> tuple[torch.Tensor, np.ndarray | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    images, labels = batch
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return images, labels


def compute_reference_stats(
    batches: Iterable[Batch], backbone: InceptionBackbone, per_class: bool = False, total: int | None = None
) -> ReferenceStats:
    """Pool3 statistics of uint8 NCHW batches (or (images, labels) pairs when per_class).

    Per-class statistics hold one 32 MB scatter matrix per class; for ImageNet's 1000 classes
    compute them a few classes at a time.
    """
    overall = FeatureMoments()
    by_class: dict[int, FeatureMoments] = {}
    with tqdm(total=total, unit="img", desc="reference statistics") as progress:
        for batch in batches:
            images, labels = _split_batch(batch)
            pool3 = backbone.features(images).pool3
            overall.add(pool3)
            if per_class:
                if labels is None:
                    raise ValueError("per-class reference statistics need (images, labels) batches")
                for label in np.unique(labels):
                    by_class.setdefault(int(label), FeatureMoments()).add(pool3[labels == label])
            progress.update(len(pool3))
    mu, sigma = overall.statistics()
    # a class of fewer than 2 images has no covariance: left out, and an intra-FID that asks for it says why
    return ReferenceStats(mu, sigma, overall.n, {label: m.statistics() for label, m in sorted(by_class.items())
                                                 if m.n >= 2})


def save_stats(
    path: str,
    mu: np.ndarray,
    sigma: np.ndarray,
    meta: Mapping[str, Any],
    per_class: Mapping[int, Statistics] | None = None,
) -> None:
    """Write a TTUR-compatible statistics file atomically (temp file, then rename)."""
    arrays = {"mu": mu, "sigma": sigma, "meta": np.array(json.dumps(meta, sort_keys=True))}
    if per_class:
        labels = sorted(per_class)
        arrays["class_labels"] = np.array(labels)
        arrays["class_mu"] = np.stack([per_class[label][0] for label in labels])
        arrays["class_sigma"] = np.stack([per_class[label][1] for label in labels])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as file:
        np.savez(file, **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mu, sigma, meta) of our files, TTUR files (mu/sigma, meta = {}) or sngan files (mean/cov)."""
    with open_npz(path) as data:
        for mean_key, cov_key in (("mu", "sigma"), ("mean", "cov")):
            if mean_key in data and cov_key in data:
                try:
                    meta = json.loads(str(data["meta"])) if "meta" in data else {}
                except RecursionError:
                    raise ValueError(f"{path}: its meta is nested too deeply") from None
                if not isinstance(meta, dict):
                    raise ValueError(f"{path}: its meta is not a mapping")
                return checked_moments(data[mean_key], data[cov_key], path) + (meta,)
    raise KeyError(f"{path} has neither mu/sigma (TTUR) nor mean/cov (sngan) arrays")


def checked_moments(mu: np.ndarray, sigma: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (D,) and ``sigma`` (D, D) as float64, refused unless they can be a mean and a covariance: finite,
    sigma symmetric (to rounding) with a diagonal of variances >= 0. Anything else would be scored: a negative
    definite sigma gave an FID of -2e6, an infinite mu an FID of inf."""
    try:
        mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: mean and covariance are not numeric arrays ({error})") from None
    dim = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (dim, dim):
        raise ValueError(f"{where}: mean {mu.shape} and covariance {sigma.shape} are not (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: mean or covariance holds NaN or infinite values")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale or (np.diag(sigma) < 0).any():
        raise ValueError(f"{where}: the covariance is not symmetric with variances >= 0")
    return mu, sigma


def _class_stats(data: np.lib.npyio.NpzFile, path: str) -> dict[int, Statistics]:
    if "class_labels" not in data:
        return {}
    arrays = zip(data["class_labels"], data["class_mu"], data["class_sigma"])
    return {int(label): checked_moments(mu, sigma, f"{path}, class {label}") for label, mu, sigma in arrays}


def load_class_stats(path: str) -> dict[int, Statistics]:
    """Per-class statistics of a file written with `per_class`, for intra-FID."""
    with open_npz(path) as data:
        if "class_labels" not in data:
            raise KeyError(f"{path} has no per-class statistics; recompute the reference with per_class=True")
        return _class_stats(data, path)


def reference_key(
    dataset: str,
    split: str,
    resolution: int,
    preprocessing: str,
    backbone: str,
    n_images: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a reference depends on; `extra` holds setup-specific fields (e.g. a long-tail imbalance)."""
    key = {
        "dataset": dataset,
        "split": split,
        "resolution": resolution,
        "preprocessing": preprocessing,
        "backbone": backbone,
        "n_images": n_images,
        "extra": dict(extra or {}),
    }
    return json.loads(json.dumps(key, sort_keys=True))  # the form it takes after a save/load round trip


MOST_KEY_FIELDS = 1000  # a key has some 20
SHOWN_DIFFERENCES = 5


def _flatten(key: Mapping[str, Any]) -> dict[str, Any] | None:
    """"a.b": value for every field of a nested key; None for one that is no tree of at most MOST_KEY_FIELDS fields
    (a file's key can share one mapping at every level, which a walk of every path would visit 2^depth times)."""
    flat, pending, seen = {}, [("", key)], set()
    while pending:
        prefix, mapping = pending.pop()
        if id(mapping) in seen:
            return None
        seen.add(id(mapping))
        for name, value in mapping.items():
            if isinstance(value, Mapping):
                pending.append((f"{prefix}{name}.", value))
            else:
                flat[f"{prefix}{name}"] = value
            if len(flat) + len(pending) > MOST_KEY_FIELDS:
                return None
    return flat


def key_differences(cached: Mapping[str, Any], expected: Mapping[str, Any], ignored: tuple[str, ...] = ()) -> list[str]:
    """'field: cached X, expected Y' for the first fields where two keys differ (fields named in ``ignored`` aside,
    e.g. ``extra.root``), and how many more."""
    cached, expected = _flatten(cached), _flatten(json.loads(json.dumps(expected)))
    if cached is None:
        return ["its key is not a record of fields as this toolkit writes"]
    missing = "<missing>"
    differences = [
        f"{name}: cached {cached.get(name, missing)!r:.200}, expected {expected.get(name, missing)!r:.200}"
        for name in sorted(set(cached) | set(expected))
        if name not in ignored and cached.get(name, missing) != expected.get(name, missing)
    ]
    more = len(differences) - SHOWN_DIFFERENCES
    return differences[:SHOWN_DIFFERENCES] + ([f"{more} more"] if more > 0 else [])


def save_reference(path: str, reference: ReferenceStats, key: Mapping[str, Any]) -> None:
    if key["n_images"] != reference.n_images:
        raise ValueError(f"reference key says n_images={key['n_images']} but {reference.n_images} images were seen")
    save_stats(path, reference.mu, reference.sigma, key, reference.per_class)


def load_cached_reference(path: str, expected_key: Mapping[str, Any],
                          ignored: tuple[str, ...] = ()) -> ReferenceStats | None:
    """The cached reference at `path`, None when there is none, StatsMismatch when it is for another setup (the key
    fields in ``ignored`` aside)."""
    if not os.path.exists(path):
        return None
    try:
        mu, sigma, meta = load_stats(path)
    except (ValueError, KeyError, OSError) as error:
        raise StatsMismatch(f"cached reference statistics {path} are not readable ({str(error).strip(chr(39))}); "
                            "delete the file to recompute it") from None
    differences = key_differences(meta, expected_key, ignored)
    if differences:
        raise StatsMismatch(
            f"cached reference statistics {path} were computed for another setup ({'; '.join(differences)}); "
            "delete the file to recompute it, or keep both: --set evaluation.cache_dir=ANOTHER_FOLDER for this setup "
            "(or `evaluation.py ref-stats --out FILE`, then --reference FILE / evaluation.reference_stats)"
        )
    try:
        with open_npz(path) as data:
            per_class = _class_stats(data, path)
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise StatsMismatch(f"cached reference statistics {path}: per-class statistics not readable ({error}); "
                            "delete the file to recompute it") from None
    return ReferenceStats(mu, sigma, meta["n_images"], per_class)
