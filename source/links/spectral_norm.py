"""Layer constructors with the original's Glorot initialisation and optional spectral normalization.

Spectral normalization is torch's parametrization (raw weight at
``<module>.parametrizations.weight.original``), configured like Chainer's SN links: one power
iteration per training-mode forward, eps 1e-12, output dimension 0. The Glorot init is applied to the
raw weight *before* the parametrization is registered, so the raw weight is exactly the Chainer
``GlorotUniform(scale)`` draw and SR later edits that tensor.

Known deviations from Chainer (reference §11.8): torch draws ``u`` normalized and warms it up with 15
power iterations at registration, and never updates ``u`` in eval mode, whereas Chainer's
SNLinear/SNEmbedID also update it in eval mode.
"""
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

SN_POWER_ITERATIONS = 1
SN_EPS = 1e-12


class FP32SpectralNorm(_SpectralNorm):
    """torch's spectral norm, kept in fp32 under mixed-precision autocast: a bf16 power iteration would
    estimate sigma to 2-3 digits, and every forward divides the weight by it."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.device.type == "meta":  # shapes only (a file's model checked before it is built): no autocast there
            return super().forward(weight)
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight)


def spectral_normed(module: nn.Module, eps: float = SN_EPS) -> nn.Module:
    """Registers spectral normalization on ``module.weight`` with the Chainer SN settings (what
    ``torch.nn.utils.parametrizations.spectral_norm`` registers, as its fp32 variant); StudioGAN's models use
    ``eps`` 1e-6."""
    sn = FP32SpectralNorm(module.weight, n_power_iterations=SN_POWER_ITERATIONS, dim=0, eps=eps)
    parametrize.register_parametrization(module, "weight", sn)
    return module


@contextmanager
def no_power_iteration(*models: nn.Module) -> Iterator[None]:
    """Spectral norm of ``models`` uses its stored (u, v) without a power step while inside (as in eval mode),
    still differentiable through sigma = u^T W v."""
    layers = [m for model in models for m in model.modules() if isinstance(m, _SpectralNorm)]
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode


def glorot_init_(module: nn.Module, gain: float) -> nn.Module:
    """Chainer GlorotUniform(scale=gain) on the weight; biases start at 0 as in Chainer."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def orthogonal_init_(module: nn.Module) -> nn.Module:
    """Orthogonal weight, zero bias: BigGAN/StudioGAN's ``ortho`` initialisation (convs, linears, embeddings)."""
    nn.init.orthogonal_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def _finish(module: nn.Module, gain: float, spectral_norm: bool) -> nn.Module:
    glorot_init_(module, gain)
    return spectral_normed(module) if spectral_norm else module


def conv2d(in_channels: int, out_channels: int, kernel_size: int, gain: float, spectral_norm: bool) -> nn.Conv2d:
    """Stride-1 'same' convolution (padding kernel_size // 2), the only kind the ResNet blocks use."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    return _finish(conv, gain, spectral_norm)


def linear(in_features: int, out_features: int, gain: float, spectral_norm: bool, bias: bool = True) -> nn.Linear:
    return _finish(nn.Linear(in_features, out_features, bias=bias), gain, spectral_norm)


def embedding(num_embeddings: int, embedding_dim: int, gain: float, spectral_norm: bool) -> nn.Embedding:
    """Class embedding; with SN the whole (num_embeddings, embedding_dim) table is normalized, as SNEmbedID does."""
    return _finish(nn.Embedding(num_embeddings, embedding_dim), gain, spectral_norm)
