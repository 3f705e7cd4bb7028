"""Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

Conventions differ between implementations, and each one changes the number:

* SNGAN / SRGANs (Chainer, the original here): softmax over the TF graph's 1008 logits *with*
  the bias, then columns 1..1000 are kept *without renormalising* (column 0 is TF's unused
  background class, 1001..1007 are padding). Splits are consecutive chunks, no shuffling.
  -> `inception_score(logits_with_bias, n_classes=1000)`.
* OpenAI improved-gan (TF) and torch-fidelity: softmax over all 1008 logits computed *without*
  the bias (`pool3 @ W`, torch-fidelity's `logits_unbiased`); torch-fidelity also shuffles
  the samples (seed 2020) before splitting.
  -> `inception_score(logits_without_bias, n_classes=None)` on the same sample order.

The bias is chosen in `InceptionBackbone(logits_with_bias=...)`; this function takes the logits.
Dropping columns without renormalising means the rows no longer sum to 1; we keep it because the
published SRGANs numbers were computed that way. Report the split count with every IS.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp

TF_LOGITS = 1008


def _split_score(log_p: np.ndarray) -> float:
    # The marginal in log space: a class no image predicts would otherwise give 0 * log(0) = nan.
    log_marginal = logsumexp(log_p, axis=0, keepdims=True) - np.log(len(log_p))
    return float(np.exp((np.exp(log_p) * (log_p - log_marginal)).sum(axis=1).mean()))


def inception_score(logits: np.ndarray, splits: int = 10, n_classes: int | None = 1000) -> tuple[float, float]:
    """IS of [N, 1008] Inception logits: (mean, population std) over `splits` consecutive chunks.

    n_classes=1000 keeps softmax columns 1..1000 unrenormalised (the original); None keeps all 1008.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != TF_LOGITS:
        raise ValueError(f"inception_score expects [N, {TF_LOGITS}] TF-Inception logits, got {logits.shape}")
    if not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"inception_score: splits={splits} must be between 1 and the number of samples {len(logits)}")
    if n_classes not in (None, 1000):
        raise ValueError(f"inception_score: n_classes must be 1000 (original) or None (all 1008), got {n_classes}")
    log_p = log_softmax(logits, axis=1)
    if n_classes is not None:
        log_p = log_p[:, 1 : 1 + n_classes]
    n = len(log_p)
    scores = [_split_score(log_p[i * n // splits : (i + 1) * n // splits]) for i in range(splits)]
    return float(np.mean(scores)), float(np.std(scores))
