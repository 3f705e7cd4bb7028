"""Residual blocks of the SNGAN-projection ResNets (sngan_projection gen_models/dis_models resblocks).

Layer names (c1, c2, c_sc, b1, b2) follow the original so that sorted module names reproduce its
layer order. 3x3 convs use Glorot gain sqrt(2) (they feed ReLUs), 1x1 shortcuts gain 1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from source.links import batch_norm_2d, conv2d

RESIDUAL_GAIN = math.sqrt(2.0)
SHORTCUT_GAIN = 1.0


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
    width. With ``n_classes > 0`` the BNs are class-conditional and ``forward`` needs labels ``y``.
    """

    def __init__(self, in_channels: int, out_channels: int, n_classes: int, spectral_norm: bool):
        super().__init__()
        self.b1 = batch_norm_2d(in_channels, n_classes)
        self.c1 = conv2d(in_channels, out_channels, 3, RESIDUAL_GAIN, spectral_norm)
        self.b2 = batch_norm_2d(out_channels, n_classes)
        self.c2 = conv2d(out_channels, out_channels, 3, RESIDUAL_GAIN, spectral_norm)
        self.c_sc = conv2d(in_channels, out_channels, 1, SHORTCUT_GAIN, spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.c1(upsample(F.relu(self._normalize(self.b1, x, y))))
        h = self.c2(F.relu(self._normalize(self.b2, h, y)))
        return h + upsample(self.c_sc(x))

    @staticmethod
    def _normalize(bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        # An unconditional G (no labels) has plain BatchNorm2d layers, which take no y.
        return bn(x) if y is None else bn(x, y)


class DiscriminatorBlock(nn.Module):
    """ReLU -> conv3x3 (in -> in) -> ReLU -> conv3x3 (in -> out) [-> avgpool2], plus a shortcut.

    The hidden width equals the *input* width, as in the original. The shortcut is conv1x1 [-> avgpool2]
    when the shape changes, the identity otherwise; it pools first, which is exact (both are linear, and
    the pooled bias is the bias) and a quarter of the conv's FLOPs. All convs are spectrally normalized.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.c1 = conv2d(in_channels, in_channels, 3, RESIDUAL_GAIN, spectral_norm=True)
        self.c2 = conv2d(in_channels, out_channels, 3, RESIDUAL_GAIN, spectral_norm=True)
        self.learnable_sc = in_channels != out_channels or downsample
        if self.learnable_sc:
            self.c_sc = conv2d(in_channels, out_channels, 1, SHORTCUT_GAIN, spectral_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        shortcut = downsample(x) if self.downsample else x
        if self.learnable_sc:
            shortcut = self.c_sc(shortcut)
        return (downsample(h) if self.downsample else h) + shortcut


class OptimizedBlock(nn.Module):
    """D's first block: conv3x3 -> ReLU -> conv3x3 -> avgpool2, plus avgpool2 -> conv1x1.

    No leading ReLU, because its input is the image itself.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.c1 = conv2d(in_channels, out_channels, 3, RESIDUAL_GAIN, spectral_norm=True)
        self.c2 = conv2d(out_channels, out_channels, 3, RESIDUAL_GAIN, spectral_norm=True)
        self.c_sc = conv2d(in_channels, out_channels, 1, SHORTCUT_GAIN, spectral_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = downsample(self.c2(F.relu(self.c1(x))))
        return h + self.c_sc(downsample(x))
