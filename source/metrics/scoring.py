"""Scores of a generator against a reference, and the protocol record stored with every number.

`evaluation.py` (scoring snapshots) and the `Evaluate` extension (scoring during training) share
these, so a number from either carries the same protocol: backbone and weights, which generator
weights (EMA or raw), how G's BatchNorm normalized (`g_batchnorm`: running, batch or standing
statistics, with the batch size and steps they depend on), sample count, IS splits, KID subsets, the
reference file with its cache key and the reference split, and with repeats their seeds.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .fid import feature_statistics, frechet_distance, intra_fid
from .generate import RUNNING, GBatchNorm, generated_features, sample_inputs
from .groups import GROUPS
from .inception import FID_HELPER, LOGITS_UNAVAILABLE, PROTOCOL, WEIGHTS_FILE, InceptionBackbone, InceptionFeatures
from .inception import URL_INCEPTION_V3, WeightsUnavailable
from .inception_score import inception_score
from .kid import kernel_inception_distance
from .reference import Reference, ReferenceUnavailable, features_path
from .repeats import STD_KIND
from .statistics import FeatureMoments

METRICS = ("is", "fid", "kid")
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults; the size is clipped to both sets
SAMPLING = ("G in eval mode, its BatchNorm as g_batchnorm says, z ~ N(0, I), uniform random labels, uint8 by "
            "truncation (original), fixed seed")
IS_CONVENTION = "softmax of the 1008 logits with bias, columns 1..1000 not renormalised, consecutive splits (SNGAN)"


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
        standard = error
    try:
        backbone = InceptionBackbone(FID_HELPER, device)
    except WeightsUnavailable as error:
        raise WeightsUnavailable(f"{standard}; the offline copy failed too: {error}") from None
    return backbone, (f"Inception weights {WEIGHTS_FILE} unavailable ({standard.reason}); using the offline pool3-only "
                      f"copy '{FID_HELPER}' (FID and KID, no IS; IS needs that file, from {URL_INCEPTION_V3}, in "
                      f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/)")


# --- scores ------------------------------------------------------------------------------------


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
            notes.append(f"KID skipped: the reference {reference.path} holds moments only (no features file "
                         f"{features_path(reference.path)} beside it) and KID needs features; use a dataset reference "
                         "(evaluation.reference_stats: null), which keeps them")
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


def class_features(gen: nn.Module, backbone: InceptionBackbone, label: int, samples: int, batch_size: int,
                   device: torch.device, seed: int) -> np.ndarray:
    """Pool3 of `samples` images of one class; the same latents (from `seed`) for every class."""
    z, labels = sample_inputs(samples, gen.dim_z, gen.n_classes, seed, labels=torch.full((samples,), label))
    return generated_features(gen, backbone, z, labels, batch_size, device).pool3


def intra_fid_score(
    gen: nn.Module, backbone: InceptionBackbone, reference: Reference, classes: list[int], samples_per_class: int,
    batch_size: int, device: torch.device, seed: int,
) -> tuple[float, dict[int, float]]:
    """sngan's intra-FID: mean over classes of FID(class samples, class reference), same latents for every class."""
    missing = sorted(set(classes) - set(reference.stats.per_class))
    if missing:
        raise ReferenceUnavailable(f"the reference {reference.path} has no statistics for classes {missing[:10]} "
                                   f"(it holds fewer than 2 of their images, or came from elsewhere without them: "
                                   f"more reference images, evaluation.reference_images, or other classes)")
    fake = {label: feature_statistics(class_features(gen, backbone, label, samples_per_class, batch_size, device, seed))
            for label in tqdm(classes, desc="intra-FID", unit="class")}
    return intra_fid(fake, reference.stats.per_class)


def group_fid_score(
    gen: nn.Module, backbone: InceptionBackbone, reference: Reference, groups: dict[str, list[int]],
    samples_per_class: int, batch_size: int, device: torch.device, seed: int,
) -> dict[str, float]:
    """FID per non-empty group: samples_per_class images of each of its classes vs the group's real statistics.

    Moments are merged class by class, so a group of many classes never holds all its features at once.
    """
    scores = {}
    for name in GROUPS:
        if not groups.get(name):
            continue
        index = GROUPS.index(name)
        if index not in reference.stats.per_class:
            raise ReferenceUnavailable(f"the reference {reference.path} has no statistics of group '{name}' (it "
                                       f"holds fewer than 2 of its images, or came from elsewhere without them: "
                                       f"more reference images)")
        moments = FeatureMoments()
        for label in tqdm(groups[name], desc=f"group FID ({name})", unit="class"):
            moments.add(class_features(gen, backbone, label, samples_per_class, batch_size, device, seed))
        scores[name] = frechet_distance(*moments.statistics(), *reference.stats.per_class[index])
    return scores


# --- protocol ----------------------------------------------------------------------------------


def protocol_record(
    backbone: InceptionBackbone, metrics: list[str], n_samples: int, splits: int, reference: Reference,
    generator: str = "raw", reference_split: str | None = None, seeds: list[int] | None = None,
    batchnorm: GBatchNorm = RUNNING,
) -> dict:
    """Everything a score depends on besides the model, stored with every number."""
    record = {"backbone": PROTOCOL, "weights": backbone.weights, "n_samples": n_samples, "sampling": SAMPLING,
              "generator": generator, **batchnorm.record(), "reference": reference.path,
              "reference_key": reference.key, "reference_split": reference_split}
    if "is" in metrics:
        record.update(splits=splits, inception_score=IS_CONVENTION)
    if "kid" in metrics:
        subset_size = min(KID_SUBSET_SIZE, n_samples, len(reference.features))
        record.update(kid_subsets=KID_SUBSETS, kid_subset_size=subset_size,
                      kid_reference_features=len(reference.features))
    if seeds is not None and len(seeds) > 1:
        record.update(repeats=len(seeds), seeds=seeds, repeat_std=STD_KIND)
    return record
