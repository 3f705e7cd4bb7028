"""Kernel Inception Distance (Bińkowski et al., 2018): unbiased MMD^2 with a polynomial kernel.

Defaults are torch-fidelity's (100 subsets of 1000, k(x, y) = (gamma x.y + coef0)^degree with
gamma = 1/D); with the same seed the subsets are drawn in torch-fidelity's order (one
RandomState, first set then second set per subset), so results match it exactly. Unlike
torch-fidelity, a subset size larger than a set is clipped to the smaller set, so small
CPU-scale sample counts still give a number (then every subset is a permutation of the whole).
"""

from __future__ import annotations

from functools import partial

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def unbiased_mmd2(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples: within-set kernel means without the diagonal."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between two [N, D] feature sets: (mean, population std) of MMD^2 over random subsets."""
    features1 = np.asarray(features1, dtype=np.float64)
    features2 = np.asarray(features2, dtype=np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"KID needs two [N, D] feature sets of equal D, got {features1.shape} and {features2.shape}")
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(features1)} and {len(features2)}")
    gamma = 1.0 / features1.shape[1] if gamma is None else gamma
    kernel = partial(polynomial_kernel, degree=degree, gamma=gamma, coef0=coef0)
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        mmds.append(unbiased_mmd2(kernel(x, x), kernel(x, y), kernel(y, y)))
    return float(np.mean(mmds)), float(np.std(mmds))
