"""Layers shared by G and D: spectrally normalized / Glorot-initialised constructors and (conditional) BN."""
from source.links.conditional_batchnorm import (
    BN_EPS,
    BN_MOMENTUM,
    BatchNorm2d,
    CategoricalConditionalBatchNorm2d,
    SharedConditionalBatchNorm2d,
    batch_norm_2d,
    set_ghost_batch,
)
from source.links.attention import SelfAttention
from source.links.spectral_norm import (
    SN_EPS,
    SN_POWER_ITERATIONS,
    conv2d,
    embedding,
    glorot_init_,
    linear,
    no_power_iteration,
    orthogonal_init_,
    power_iteration,
    spectral_normed,
)

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "SelfAttention",
    "BatchNorm2d",
    "CategoricalConditionalBatchNorm2d",
    "SharedConditionalBatchNorm2d",
    "batch_norm_2d",
    "set_ghost_batch",
    "SN_EPS",
    "SN_POWER_ITERATIONS",
    "conv2d",
    "embedding",
    "glorot_init_",
    "linear",
    "no_power_iteration",
    "orthogonal_init_",
    "power_iteration",
    "spectral_normed",
]
