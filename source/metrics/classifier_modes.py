"""Mode coverage of a Fashion-MNIST generator, conditional or not, read by the small classifier.

The collapse study's measures over iterations (docs/collapse.md; the `Modes` extension writes them to
``classifier_modes.jsonl``). From ``n`` samples at fixed latents (the same every time, so records compare):
- ``class_counts``: samples per class the classifier predicts; ``modes``: classes holding at least
  ``min_share`` of them; ``entropy`` of that histogram (ln 10 = 2.30 when uniform);
- ``diversity``: per group of samples (the class asked for when G is conditional, else the predicted
  class) with at least 2 members, the mean pairwise distance of the classifier's penultimate features
  over the same among that class's real images; the groups' mean weighted by their sizes, so a class G
  draws twice weighs little (1 = as diverse as the data, -> 0 under mode collapse);
- ``accuracy`` (conditional G only): share of samples predicted as the class asked for;
- ``classifier_FID`` / ``classifier_KID``: between the samples' and the real images' features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .classifier import ClassifierUnavailable, SmallClassifier, classify, dataset_features, mean_pairwise_distance
from .fid import feature_statistics, frechet_distance
from .generate import generate_uint8, sample_inputs
from .kid import kernel_inception_distance

MIN_SHARE = 0.02
KID_SUBSETS = 20


@dataclass(frozen=True)
class RealReference:
    features: np.ndarray          # [N, 128] classifier features of the real images
    labels: np.ndarray            # [N]
    spread: dict[int, float]      # class -> mean pairwise feature distance among its real images

    @classmethod
    def of(cls, classifier: SmallClassifier, dataset: Dataset) -> "RealReference":
        features, labels = dataset_features(classifier, dataset)
        n_classes = classifier.head.out_features
        few = [c for c in range(n_classes) if (labels == c).sum() < 2]
        if few:
            raise ClassifierUnavailable(f"the real images hold fewer than 2 images of classes {few[:10]}")
        return cls(features, labels, {c: mean_pairwise_distance(features[labels == c]) for c in range(n_classes)})


def mode_measures(features: np.ndarray, predicted: np.ndarray, reference: RealReference,
                  requested: np.ndarray | None = None, min_share: float = MIN_SHARE,
                  kid_subsets: int = KID_SUBSETS) -> dict:
    """The measures of the module docstring from samples' features and predicted classes (pure)."""
    n_classes = len(reference.spread)
    counts = np.bincount(predicted, minlength=n_classes)
    share = counts / counts.sum()
    nonzero = share[share > 0]
    groups = predicted if requested is None else requested
    sizes, spreads = [], []
    for c in np.unique(groups):
        members = features[groups == c]
        if len(members) >= 2:
            sizes.append(len(members))
            spreads.append(mean_pairwise_distance(members) / reference.spread[int(c)])
    record = {"modes": int((share >= min_share).sum()), "entropy": float(-(nonzero * np.log(nonzero)).sum()),
              "diversity": float(np.average(spreads, weights=sizes)) if sizes else 0.0,
              "class_counts": counts.tolist()}
    if requested is not None:
        record["accuracy"] = float((predicted == requested).mean())
    record["classifier_FID"] = frechet_distance(*feature_statistics(features), *feature_statistics(reference.features))
    record["classifier_KID"], _ = kernel_inception_distance(features, reference.features, subsets=kid_subsets,
                                                            subset_size=min(1000, len(features)))
    return record


def generator_modes(gen: nn.Module, classifier: SmallClassifier, reference: RealReference, n_samples: int,
                    seed: int, batch_size: int, device: torch.device) -> dict:
    """The measures of ``n_samples`` images of G (equal numbers per class when conditional), latents from ``seed``.

    G is used as it is (its BatchNorm mode is the caller's, e.g. a ``generation_mode`` around this call).
    """
    labels = None
    if gen.n_classes:
        labels = torch.arange(n_samples) % gen.n_classes
    z, labels = sample_inputs(n_samples, gen.dim_z, gen.n_classes, seed, labels)
    parts = [classify(classifier, images) for images in generate_uint8(gen, z, labels, batch_size, device)]
    features = np.concatenate([p[0] for p in parts])
    predicted = np.concatenate([p[1] for p in parts])
    return mode_measures(features, predicted, reference, None if labels is None else labels.numpy())
