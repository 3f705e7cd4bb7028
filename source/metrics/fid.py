"""Fréchet Inception Distance (Heusel et al., 2017) and its per-class average, intra-FID.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)).
Tr(sqrt(S1 S2)) is the sum of square roots of the eigenvalues of S1 S2, which equal those of the
symmetric PSD matrix F^T S2 F for any factor S1 = F F^T. A pivoted Cholesky factor and one
symmetric eigenvalue solve give it in float64 without the complex arithmetic, eps offsets and
slow Schur iterations of scipy.linalg.sqrtm, exactly also for the rank-deficient covariances of
fewer samples than dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Statistics = tuple[np.ndarray, np.ndarray]  # (mu [D], sigma [D, D])


def feature_statistics(features: np.ndarray) -> Statistics:
    """Mean and unbiased covariance (np.cov, as TTUR and the original) of [N, D] features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs [N >= 2, D] features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _drop_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that are round-off of a zero (numpy.linalg.matrix_rank's threshold).

    sqrt turns a round-off eigenvalue of 1e-16 * max into 1e-8 * sqrt(max); summed over a null
    space that would bias FID, so such eigenvalues count as exactly 0.
    """
    tolerance = max(eigenvalues.max(), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F [D, rank] with F F^T = sigma: LAPACK's rank-revealing pivoted Cholesky (dpstrf).

    It stops at the numerical rank (pivot <= D * eps * max diag), so singular covariances of fewer
    samples than dimensions need no eps offset and cost less than full-rank ones.
    """
    from scipy.linalg import lapack  # here: importing scipy.linalg would add 0.4 s to every train.py's start

    factor, pivots, rank, info = lapack.dpstrf(sigma, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf rejected its argument {-info}")
    result = np.empty((len(sigma), rank))
    result[pivots - 1] = np.tril(factor)[:, :rank]  # undo the symmetric pivoting P^T sigma P = L L^T
    return result


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrt(sigma1 @ sigma2)) for symmetric PSD matrices.

    With sigma1 = F F^T, sigma1 sigma2 has the nonzero eigenvalues of the symmetric PSD F^T sigma2 F.
    """
    factor = _psd_factor(sigma1)
    if factor.shape[1] == 0:
        return 0.0
    eigenvalues = np.linalg.eigvalsh(factor.T @ sigma2 @ factor)
    return float(np.sqrt(_drop_round_off(eigenvalues)).sum())


def _symmetric(sigma: np.ndarray) -> np.ndarray:
    # Covariances summed in different orders are symmetric only up to round-off; eigh reads one triangle.
    sigma = np.asarray(sigma, dtype=np.float64)
    return (sigma + sigma.T) / 2.0


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = _symmetric(sigma1), _symmetric(sigma2)
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance got mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    traces = np.trace(sigma1) + np.trace(sigma2)
    distance = float(diff @ diff + traces - 2.0 * trace_sqrt_product(sigma1, sigma2))
    if not np.isfinite(distance) or distance < -1e-6 * max(traces, 1.0):  # beyond rounding: not covariances
        raise ValueError(f"FID of statistics that are not a mean and covariance came out as {distance:g}")
    return distance


def intra_fid(
    fake_stats_by_class: Mapping[int, Statistics], real_stats_by_class: Mapping[int, Statistics]
) -> tuple[float, dict[int, float]]:
    """Mean over classes of the FID between each class's generated and real statistics (sngan's intra-FID)."""
    missing = sorted(set(fake_stats_by_class) - set(real_stats_by_class))
    if missing:
        raise KeyError(f"intra_fid: no real statistics for classes {missing[:10]}")
    if not fake_stats_by_class:
        raise ValueError("intra_fid: no classes given")
    per_class = {
        label: frechet_distance(*fake, *real_stats_by_class[label]) for label, fake in fake_stats_by_class.items()
    }
    return float(np.mean(list(per_class.values()))), per_class
