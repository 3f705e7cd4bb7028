"""Spectral tools: SR (spectral regularization), singular-value spectra, spectral-collapse detection."""

from source.spectral.collapse import CollapseDetector, collapse_score, effective_rank, layer_scores
from source.spectral.spectra import (
    LayerSpectrum,
    SpectraRecord,
    compute_spectra,
    layer_index_map,
    list_spectra,
    load_spectra,
    save_spectra,
)
from source.spectral.sr import SpectralRegularizer

__all__ = [
    "CollapseDetector",
    "LayerSpectrum",
    "SpectraRecord",
    "SpectralRegularizer",
    "collapse_score",
    "compute_spectra",
    "effective_rank",
    "layer_index_map",
    "layer_scores",
    "list_spectra",
    "load_spectra",
    "save_spectra",
]
