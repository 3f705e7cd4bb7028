"""Mode-coverage measures that need no Inception network: cheap enough for CPU-scale collapse studies.

Each generated image takes the class of its nearest real image in pixel space (a 1-NN classifier,
81 % accurate on Fashion-MNIST test images in the CPU pilot behind docs/collapse.md). From that:
- ``class_counts``: how many samples each class got (a dropped class shows here first);
- ``modes``: classes holding at least ``min_share`` of the samples;
- ``entropy``: of the nearest-class histogram (ln 10 = 2.30 for a uniform 10-class histogram);
- ``label_agreement``: share of samples whose nearest class is the class they were generated for;
- ``diversity``: mean pairwise L2 distance within each generated class over the same for real
  images of that class (1 = as diverse as the data, -> 0 under mode collapse).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ModeReport:
    modes: int
    entropy: float
    label_agreement: float
    diversity: float
    class_counts: tuple[int, ...]  # samples per nearest class

    def to_dict(self) -> dict:
        return asdict(self)


def nearest_labels(samples: np.ndarray, real: np.ndarray, real_labels: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Label of the nearest real image (squared L2 on flattened pixels) for every sample."""
    flat_real = real.reshape(len(real), -1).astype(np.float32)
    real_norms = (flat_real ** 2).sum(1)
    labels = []
    for start in range(0, len(samples), chunk):
        flat = samples[start:start + chunk].reshape(-1, flat_real.shape[1]).astype(np.float32)
        distances = real_norms[None, :] - 2 * flat @ flat_real.T  # |x|^2 is constant per row
        labels.append(real_labels[distances.argmin(1)])
    return np.concatenate(labels)


def mean_pairwise_distance(images: np.ndarray) -> float:
    flat = images.reshape(len(images), -1).astype(np.float64)
    squared = (flat ** 2).sum(1)
    distances = np.sqrt(np.clip(squared[:, None] + squared[None, :] - 2 * flat @ flat.T, 0, None))
    n = len(images)
    return float(distances.sum() / (n * (n - 1)))


def mode_report(samples: np.ndarray, sample_labels: np.ndarray | None, real: np.ndarray, real_labels: np.ndarray,
                min_share: float = 0.02) -> ModeReport:
    """All four measures (images in the same value range as ``real``).

    ``sample_labels`` are the classes the samples were generated for; None for an unconditional G,
    whose diversity is then compared with the whole real set and whose label agreement is NaN.
    """
    n_classes = int(real_labels.max()) + 1
    nearest = nearest_labels(samples, real, real_labels)
    counts = np.bincount(nearest, minlength=n_classes)
    histogram = counts / len(nearest)
    nonzero = histogram[histogram > 0]
    if sample_labels is None:
        diversity = mean_pairwise_distance(samples) / mean_pairwise_distance(real[:len(samples)])
        agreement = float("nan")
    else:
        diversity = np.mean([mean_pairwise_distance(samples[sample_labels == c]) /
                             mean_pairwise_distance(real[real_labels == c]) for c in np.unique(sample_labels)])
        agreement = float((nearest == sample_labels).mean())
    return ModeReport(modes=int((histogram >= min_share).sum()), entropy=float(-(nonzero * np.log(nonzero)).sum()),
                      label_agreement=agreement, diversity=float(diversity),
                      class_counts=tuple(int(count) for count in counts))
