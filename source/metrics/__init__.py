"""IS, FID, KID and intra-FID under the TF-Inception protocol, and the reference-statistics cache.

The package exports the numerics; the modules above them are imported by name:
`reference` (data set references and their cache), `scoring` (scores and protocol records),
`describe` (the printed line), `longtail` (repeats, per-class and per-group intra-FID), `groups`,
`repeats`, `classifier` (the small Fashion-MNIST classifier and `class_report`), `modes`.
"""

from .fid import Statistics, feature_statistics, frechet_distance, intra_fid, trace_sqrt_product
from .inception import (
    FID_HELPER,
    PROTOCOL,
    InceptionBackbone,
    InceptionFeatures,
    WeightsUnavailable,
    convert_fid_helper_weights,
    load_fid_helper_torchscript,
    to_uint8,
)
from .inception_score import inception_score
from .kid import kernel_inception_distance
from .statistics import (
    FeatureMoments,
    ReferenceStats,
    StatsMismatch,
    compute_reference_stats,
    load_cached_reference,
    load_class_stats,
    load_stats,
    reference_key,
    save_reference,
    save_stats,
)

__all__ = [
    "FID_HELPER",
    "PROTOCOL",
    "FeatureMoments",
    "InceptionBackbone",
    "InceptionFeatures",
    "ReferenceStats",
    "Statistics",
    "StatsMismatch",
    "WeightsUnavailable",
    "compute_reference_stats",
    "convert_fid_helper_weights",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "intra_fid",
    "kernel_inception_distance",
    "load_cached_reference",
    "load_class_stats",
    "load_fid_helper_torchscript",
    "load_stats",
    "reference_key",
    "save_reference",
    "save_stats",
    "to_uint8",
    "trace_sqrt_product",
]
