"""Scalar measures of spectral collapse and a detector that watches them over training.

The authors judged collapse by eye from spectrum plots (srgan.md §10.2): "a large number of
singular values drop dramatically". The score here turns that into a number per layer, the mean of
s_i / s_1 over i >= 2: a random init gives ~0.75, a healthy D flattens towards 0.9
(the CPU pilot behind docs/collapse.md), and the README's fig3 goes from ~0.55 at 40k to ~0.15 at 70k while the SN
run mode-collapses.

Default threshold 0.5 (flag when a layer's score falls below half of its running maximum), as
proposed in srgan.md §10.2: fig3's collapse is a fall to ~0.3 of the peak, while the gradual declines
of the CPU probe's high-lr settings (0.75 -> 0.5-0.6, i.e. to ~0.7 of the peak; B had no mode
collapse, D's mode collapse came before the decline) and the noise of a stable run stay above it.
"""

from __future__ import annotations

import re

import numpy as np

from source.spectral.spectra import LayerSpectrum


def collapse_score(normalized: np.ndarray) -> float:
    """Mean of s_i / s_1 over i >= 2 of a normalized spectrum (s_1 first)."""
    values = np.asarray(normalized, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"collapse score needs a 1-d spectrum with at least 2 values, got shape {values.shape}")
    return float(values[1:].mean())


def effective_rank(singular_values: np.ndarray) -> float:
    """exp of the entropy of s / sum(s) (Roy & Vetterli, 2007): between 1 (rank one) and len(s) (flat)."""
    values = np.asarray(singular_values, dtype=np.float64)
    p = values[values > 0] / values.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def layer_scores(spectra: dict[str, LayerSpectrum]) -> dict[str, float]:
    """Collapse score of every layer that has one (a layer with a single singular value, like D's l7, has none)."""
    return {
        name: collapse_score(spectrum.normalized)
        for name, spectrum in spectra.items()
        if spectrum.singular_values.size >= 2
    }


class CollapseDetector:
    """Flags layers whose collapse score fell below `threshold` times its running maximum.

    `layers` is a regular expression searched in layer names (None watches all); `min_layers` is how
    many layers must be collapsed at once before an update reports anything.
    """

    def __init__(self, threshold: float = 0.5, min_layers: int = 1, layers: str | None = None) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"collapse threshold must be in (0, 1), got {threshold}")
        if min_layers < 1:
            raise ValueError(f"collapse min_layers must be at least 1, got {min_layers}")
        self.threshold = threshold
        self.min_layers = min_layers
        self.layers = layers
        self._pattern = re.compile(layers) if layers is not None else None
        self.peaks: dict[str, tuple[float, int]] = {}  # layer -> (highest score, its iteration)

    def update(self, iteration: int, scores: dict[str, float]) -> list[str]:
        """Feed this iteration's scores; returns the layers collapsed now (empty if fewer than min_layers)."""
        watched = {name: score for name, score in scores.items() if self._watches(name)}
        collapsed = [
            name for name, score in watched.items()
            if name in self.peaks and score < self.threshold * self.peaks[name][0]
        ]
        for name, score in watched.items():
            if name not in self.peaks or score > self.peaks[name][0]:
                self.peaks[name] = (score, iteration)
        return collapsed if len(collapsed) >= self.min_layers else []

    def _watches(self, name: str) -> bool:
        return self._pattern is None or self._pattern.search(name) is not None

    def state_dict(self) -> dict:
        return {"peaks": {name: list(peak) for name, peak in self.peaks.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the running maxima; threshold, min_layers and layers come from the constructor. A score is a mean
        of s_i / s_1, in [0, 1]: a received snapshot's peak of 1e300 faked a collapse of every layer, and NaN stopped
        every detection."""
        peaks = {name: (float(score), int(at)) for name, (score, at) in state["peaks"].items()}
        for name, (score, at) in peaks.items():
            if not (0 <= score <= 1 and at >= 0):
                raise ValueError(f"the collapse detector's peak of {name} is {score} at iteration {at}, not a score of "
                                 "[0, 1] at an iteration")
        self.peaks = peaks
