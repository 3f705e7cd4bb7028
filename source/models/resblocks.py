"""Residual blocks of the SNGAN-projection ResNets (sngan_projection gen_models/dis_models resblocks), shared
with BigGAN, whose blocks have the same structure with other layers (conditional BN, orthogonal init).

Layer names (c1, c2, c_sc, b1, b2) follow the original so that sorted module names reproduce its
layer order. The blocks build their layers with factories: ``make_conv(in, out, kernel)`` and
``make_norm(channels)``. sngan_projection's convs (``glorot_conv``) use Glorot gain sqrt(2) for 3x3 convs
(they feed ReLUs) and gain 1 for 1x1 shortcuts.
"""
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from source.links import batch_norm_2d, conv2d

RESIDUAL_GAIN = math.sqrt(2.0)
SHORTCUT_GAIN = 1.0

ConvFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, kernel_size) -> 'same' conv
NormFactory = Callable[[int], nn.Module]


def glorot_conv(spectral_norm: bool) -> ConvFactory:
    """sngan_projection's convs: Glorot-uniform, gain sqrt(2) for 3x3 and 1 for 1x1, optionally SN."""
    def make(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
        gain = RESIDUAL_GAIN if kernel_size == 3 else SHORTCUT_GAIN
        return conv2d(in_channels, out_channels, kernel_size, gain, spectral_norm)
    return make


def class_norm(n_classes: int) -> NormFactory:
    """sngan_projection's G normalization: class-conditional BN with classes, plain affine BN without."""
    return lambda channels: batch_norm_2d(channels, n_classes)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2, what Chainer's unpooling_2d(x, 2) computes."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


class GeneratorBlock(nn.Module):
    """Up-sampling block: BN -> ReLU -> up x2 -> conv3x3 -> BN -> ReLU -> conv3x3, plus up x2 -> conv1x1.

    The shortcut's conv1x1 runs before the up-sampling: a 1x1 conv (with its bias) commutes exactly with
    nearest up-sampling, and at the low resolution it costs a quarter of the FLOPs.

    Every G block up-samples, so the shortcut is always learnable. The hidden width equals the output
    width. With conditional BNs ``forward`` needs their condition ``y`` (labels, or BigGAN's condition vectors).
    """

    def __init__(self, in_channels: int, out_channels: int, make_norm: NormFactory, make_conv: ConvFactory):
        super().__init__()
        self.b1 = make_norm(in_channels)
        self.c1 = make_conv(in_channels, out_channels, 3)
        self.b2 = make_norm(out_channels)
        self.c2 = make_conv(out_channels, out_channels, 3)
        self.c_sc = make_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.c1(upsample(F.relu(self._normalize(self.b1, x, y))))
        h = self.c2(F.relu(self._normalize(self.b2, h, y)))
        return h + upsample(self.c_sc(x))

    @staticmethod
    def _normalize(bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        # An unconditional G (no labels) has plain BatchNorm2d layers, which take no y.
        return bn(x) if y is None else bn(x, y)


class DiscriminatorBlock(nn.Module):
    """ReLU -> conv3x3 (in -> hidden) -> ReLU -> conv3x3 (hidden -> out) [-> avgpool2], plus a shortcut.

    The hidden width is the *input* width in sngan_projection (the default), the output width in BigGAN.
    The shortcut is conv1x1 [-> avgpool2] when the shape changes, the identity otherwise; it pools first,
    which is exact (both are linear, and the pooled bias is the bias) and a quarter of the conv's FLOPs.
    The default convs are sngan_projection's, spectrally normalized. ``relu_shortcut`` feeds the shortcut
    ReLU(x) instead of x, as StudioGAN's BigGAN D computes (its in-place ReLU overwrites the shortcut's input).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, hidden_channels: int | None = None,
                 make_conv: ConvFactory = glorot_conv(spectral_norm=True), relu_shortcut: bool = False):
        super().__init__()
        self.downsample, self.relu_shortcut = downsample, relu_shortcut
        hidden_channels = hidden_channels or in_channels
        self.c1 = make_conv(in_channels, hidden_channels, 3)
        self.c2 = make_conv(hidden_channels, out_channels, 3)
        self.learnable_sc = in_channels != out_channels or downsample
        if self.learnable_sc:
            self.c_sc = make_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_shortcut:
            x = F.relu(x)  # the residual branch's own ReLU then changes nothing: relu(relu(x)) = relu(x)
        h = self.c2(F.relu(self.c1(F.relu(x))))
        shortcut = downsample(x) if self.downsample else x
        if self.learnable_sc:
            shortcut = self.c_sc(shortcut)
        return (downsample(h) if self.downsample else h) + shortcut


class OptimizedBlock(nn.Module):
    """D's first block: conv3x3 -> ReLU -> conv3x3 -> avgpool2, plus avgpool2 -> conv1x1.

    No leading ReLU, because its input is the image itself.
    """

    def __init__(self, in_channels: int, out_channels: int, make_conv: ConvFactory = glorot_conv(spectral_norm=True)):
        super().__init__()
        self.c1 = make_conv(in_channels, out_channels, 3)
        self.c2 = make_conv(out_channels, out_channels, 3)
        self.c_sc = make_conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = downsample(self.c2(F.relu(self.c1(x))))
        return h + self.c_sc(downsample(x))
