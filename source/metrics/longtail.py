"""Scoring a generator the way long-tailed GANs are reported (gSR, docs/reference/gsr_studiogan.md A6).

- repeats: N evaluations whose latents come from seeds seed, seed+1, ...; every number is reported as
  mean ± sample standard deviation (gSR's final protocol: 3 runs of 50k samples);
- intra-FID per class ("classes", sngan's) or per many/medium/few group ("groups", gSR's coarse one),
  with group membership from the *training* data's class counts.

The reference (balanced split or training data) is resolved by the caller and the same for every repeat.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from source.config import Config, EvaluationConfig
from source.datasets import build_dataset, class_counts

from .generate import GBatchNorm, check_classes, g_batchnorm, generated_features, generation_mode, sample_inputs
from .groups import GROUPS, class_groups
from .inception import InceptionBackbone
from .reference import Reference
from .repeats import summarize
from .scoring import group_fid_score, intra_fid_score, score

INTRA_FID_MODES = ("classes", "groups")


def training_class_counts(config: Config) -> list[int]:
    """Training images per class of the data set as configured (long tail included)."""
    return class_counts(build_dataset(config.dataset.name, config.dataset.args))


def training_groups(config: Config) -> dict[str, list[int]]:
    settings = config.evaluation
    return class_groups(training_class_counts(config), settings.many_above, settings.few_at_most)


def group_notes(groups: dict[str, list[int]], settings: EvaluationConfig) -> list[str]:
    """A note for each empty group: it is skipped, not scored as 0 or NaN."""
    bounds = {"many": f"> {settings.many_above}", "medium": f"{settings.few_at_most + 1}..{settings.many_above}",
              "few": f"<= {settings.few_at_most}"}
    return [f"group '{name}' skipped: no class has {bounds[name]} training images" for name in GROUPS
            if not groups[name]]


def group_description(settings: EvaluationConfig) -> str:
    return (f"many > {settings.many_above}, medium {settings.few_at_most + 1}..{settings.many_above}, "
            f"few <= {settings.few_at_most} training images per class (membership from the training data)")


@dataclass
class ScoreRequest:
    """What to compute in each repeat."""
    metrics: list[str]                       # of "is", "fid", "kid" (over n_samples uniform-label samples)
    n_samples: int
    splits: int
    batch_size: int
    intra_fid: str | None = None             # None, "classes" or "groups"
    classes: list[int] | None = None         # intra-FID classes
    groups: dict[str, list[int]] | None = None
    samples_per_class: int = 5000
    batchnorm: GBatchNorm = GBatchNorm()        # how G's BatchNorm normalizes while generating


def score_once(gen: nn.Module, backbone: InceptionBackbone, reference: Reference, request: ScoreRequest,
               seed: int, device: torch.device) -> dict:
    """One evaluation's numbers, every sample drawn from `seed`."""
    record: dict = {}
    if request.metrics:
        z, labels = sample_inputs(request.n_samples, gen.dim_z, gen.n_classes, seed)
        features = generated_features(gen, backbone, z, labels, request.batch_size, device)
        record.update(score(features, request.metrics, reference, request.splits))
    if request.intra_fid == "classes":
        record["intra_FID"], per_class = intra_fid_score(gen, backbone, reference, request.classes,
                                                         request.samples_per_class, request.batch_size, device, seed)
        record["intra_FID_per_class"] = {str(label): value for label, value in per_class.items()}
    if request.intra_fid == "groups":
        record["group_FID"] = group_fid_score(gen, backbone, reference, request.groups, request.samples_per_class,
                                              request.batch_size, device, seed)
        # gSR's coarse intra-FID: the mean over the (non-empty) groups
        record["group_FID_mean"] = float(np.mean(list(record["group_FID"].values())))
    return record


def score_repeats(gen: nn.Module, backbone: InceptionBackbone, reference: Reference, request: ScoreRequest,
                  seeds: list[int], device: torch.device) -> dict:
    """Means over the seeds, with `repeat_std` (sample std) and `repeats` when there are several; G generates
    in `request.batchnorm`'s mode (standing statistics accumulated once, the same for every repeat)."""
    with generation_mode(gen, request.batchnorm, device):
        return summarize([score_once(gen, backbone, reference, request, seed, device) for seed in seeds], seeds)


def score_request(config: Config, n_classes: int, intra_fid: str | None, classes: list[int] | None,
                  samples_per_class: int) -> ScoreRequest:
    """What each repeat computes under `config.evaluation`; intra-FID classes checked, groups from training counts."""
    settings = config.evaluation
    batchnorm = g_batchnorm(settings).for_images(settings.n_samples if settings.metrics else samples_per_class)
    request = ScoreRequest(settings.metrics, settings.n_samples, settings.splits, settings.batch_size, intra_fid,
                           samples_per_class=samples_per_class, batchnorm=batchnorm)
    if classes and intra_fid != "classes":
        raise ValueError("--classes selects intra-FID classes; it needs --intra-fid classes")
    if intra_fid and n_classes == 0:
        raise ValueError(f"--intra-fid {intra_fid}: this generator is unconditional (n_classes=0): it has no classes "
                         "to score one by one or in groups")
    if intra_fid == "classes":
        request.classes = classes or list(range(n_classes))
        check_classes(request.classes, n_classes)
    if intra_fid == "groups":
        request.groups = training_groups(config)
    return request


def intra_fid_protocol(request: ScoreRequest, settings: EvaluationConfig, n_classes: int) -> dict:
    """The intra-FID part of the protocol record: mode, samples per class, group membership and thresholds."""
    if request.intra_fid is None:
        return {}
    protocol = {"intra_fid": request.intra_fid, "samples_per_class": request.samples_per_class}
    if request.intra_fid == "groups":
        protocol.update(groups=request.groups, group_thresholds=group_description(settings))
    if not request.metrics:
        classes = request.classes if request.intra_fid == "classes" else range(n_classes)
        protocol["n_samples"] = len(classes) * request.samples_per_class
    elif request.batchnorm.mode == "batch":  # the record's batch is the metrics'; each class's images are batched alone
        protocol["intra_fid_g_batchnorm_batch_size"] = min(request.batch_size, request.samples_per_class)
    return protocol
