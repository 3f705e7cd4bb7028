"""BigGAN (Brock et al., 2019) as StudioGAN's ``big_resnet``, the BigGAN of gSR (docs/reference/gsr_studiogan.md A2, A3).

G: z is split into (blocks + 1) equal chunks (hierarchical latents): the first feeds the linear layer, chunk i
block i's conditional BNs together with the shared class embedding, c_i = [shared(y); z_i] (both BNs of a block
see the same c_i). Self-attention follows the configured block; an affine BN, ReLU, conv and tanh end it.
D: a projection discriminator whose hidden widths equal the output widths, self-attention after the configured
block, ReLU, global sum pooling, linear + <embed(y), h>. Every conv, linear and embedding starts orthogonal and,
as released, G and D are spectrally normalized (SN eps 1e-6, BN eps 1e-4: StudioGAN's constants).

The release's D blocks after the first compute F(x) + shortcut(ReLU(x)), not F(x) + shortcut(x): the shortcut's
input is the tensor that the residual branch's in-place ReLU overwrites. Every published BigGAN number of
StudioGAN and gSR comes from that function, so it is the default; ``relu_shortcut: false`` gives the textbook
block. Differences from the release: BatchNorm keeps running statistics (the release's have none, so G always
normalizes by the batch; ``evaluation.g_batchnorm: batch`` evaluates that way), and the release's D also holds a
shared class embedding that no forward reads (K x 128 parameters), which is left out here. With the weights
copied over, G, D and the class-only gains match the release's code to float rounding
(docs/gsr/check_biggan_against_release.py, its output in docs/gsr/data/biggan_vs_release.txt).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from source.links import (BN_MOMENTUM, BatchNorm2d, SelfAttention, SharedConditionalBatchNorm2d, orthogonal_init_,
                          spectral_normed)
from source.models.generator import LatentSampler, check_labels
from source.models.resblocks import ConvFactory, DiscriminatorBlock, GeneratorBlock, OptimizedBlock

BIGGAN_BN_EPS = 1e-4
BIGGAN_SN_EPS = 1e-6
BOTTOM_WIDTH = 4

# G: the linear layer's output width, then each block's output width, in units of ch (2**blocks = resolution / 4).
GENERATOR_WIDTHS: dict[int, tuple[int, ...]] = {
    32: (4, 4, 4, 4),
    64: (16, 8, 4, 2, 1),
    128: (16, 16, 8, 4, 2, 1),
}
# D: the first block's width, then (width, downsample) of each further block, in units of ch.
DISCRIMINATOR_LAYOUTS: dict[int, tuple[int, tuple[tuple[int, bool], ...]]] = {
    32: (2, ((2, True), (2, False), (2, False))),
    64: (1, ((2, True), (4, True), (8, True), (16, False))),
    128: (1, ((2, True), (4, True), (8, True), (16, True), (16, False))),
}


def _orthogonal(module: nn.Module, spectral_norm: bool) -> nn.Module:
    orthogonal_init_(module)  # before SN is registered, so SN's first u is that of the initial weight
    return spectral_normed(module, eps=BIGGAN_SN_EPS) if spectral_norm else module


def ortho_conv(spectral_norm: bool, bias: bool = True) -> ConvFactory:
    return lambda i, o, k: _orthogonal(nn.Conv2d(i, o, k, padding=k // 2, bias=bias), spectral_norm)


def ortho_linear(spectral_norm: bool, bias: bool = True) -> Callable[[int, int], nn.Module]:
    return lambda i, o: _orthogonal(nn.Linear(i, o, bias=bias), spectral_norm)


def attention(channels: int, spectral_norm: bool) -> SelfAttention:
    conv = ortho_conv(spectral_norm, bias=False)
    return SelfAttention(channels, lambda i, o: conv(i, o, 1))


class BigGANGenerator(LatentSampler, nn.Module):
    """(z, y) -> image in [-1, 1]. ``attention_after`` n puts self-attention after block n (0: none)."""

    def __init__(self, dim_z: int = 80, shared_dim: int = 128, ch: int = 96, n_classes: int = 10,
                 resolution: int = 32, channels: int = 3, attention_after: int = 2, spectral_norm: bool = True):
        super().__init__()
        check_biggan_generator_args(dim_z=dim_z, shared_dim=shared_dim, ch=ch, n_classes=n_classes,
                                    resolution=resolution, channels=channels, attention_after=attention_after)
        self.dim_z, self.n_classes, self.attention_after = dim_z, n_classes, attention_after
        widths = [multiplier * ch for multiplier in GENERATOR_WIDTHS[resolution]]
        self.chunk = dim_z // len(widths)  # one chunk for the linear layer, one per block
        self.shared = _orthogonal(nn.Embedding(n_classes, shared_dim), spectral_norm=False)
        self.linear = ortho_linear(spectral_norm)(self.chunk, BOTTOM_WIDTH * BOTTOM_WIDTH * widths[0])

        def norm(width: int) -> nn.Module:
            return SharedConditionalBatchNorm2d(width, self.shared, self.chunk, ortho_linear(spectral_norm, bias=False),
                                                eps=BIGGAN_BN_EPS)
        conv = ortho_conv(spectral_norm)
        self.blocks = nn.ModuleList(GeneratorBlock(i, o, norm, conv) for i, o in zip(widths[:-1], widths[1:]))
        if attention_after:
            self.attention = attention(widths[attention_after], spectral_norm)
        self.bn = BatchNorm2d(widths[-1], eps=BIGGAN_BN_EPS, momentum=BN_MOMENTUM)
        self.conv_out = conv(widths[-1], channels, 3)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(self, y, hint=" (draw them with sample_y)")
        latents = torch.split(z, self.chunk, dim=1)
        shared = self.shared(y)
        h = self.linear(latents[0]).view(z.shape[0], -1, BOTTOM_WIDTH, BOTTOM_WIDTH)
        for index, (block, latent) in enumerate(zip(self.blocks, latents[1:]), start=1):
            h = block(h, torch.cat([shared, latent], dim=1))
            if index == self.attention_after:
                h = self.attention(h)
        return torch.tanh(self.conv_out(F.relu(self.bn(h))))


class BigGANDiscriminator(nn.Module):
    """(image, y) -> one unbounded score per sample, shape (N,). ``attention_after`` as in G (0: none)."""

    def __init__(self, ch: int = 96, n_classes: int = 10, resolution: int = 32, channels: int = 3,
                 attention_after: int = 1, relu_shortcut: bool = True):
        super().__init__()
        check_biggan_discriminator_args(ch=ch, n_classes=n_classes, resolution=resolution, channels=channels,
                                        attention_after=attention_after)
        self.n_classes, self.attention_after = n_classes, attention_after
        first, layout = DISCRIMINATOR_LAYOUTS[resolution]
        conv = ortho_conv(spectral_norm=True)
        widths = [first * ch] + [multiplier * ch for multiplier, _ in layout]
        self.blocks = nn.ModuleList([OptimizedBlock(channels, widths[0], conv)])
        for in_width, out_width, (_, downsample) in zip(widths, widths[1:], layout):
            self.blocks.append(DiscriminatorBlock(in_width, out_width, downsample, out_width, conv, relu_shortcut))
        if attention_after:
            self.attention = attention(widths[attention_after - 1], spectral_norm=True)
        self.linear = ortho_linear(spectral_norm=True)(widths[-1], 1)
        self.embedding = _orthogonal(nn.Embedding(n_classes, widths[-1]), spectral_norm=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(self, y)
        h = x
        for index, block in enumerate(self.blocks, start=1):
            h = block(h)
            if index == self.attention_after:
                h = self.attention(h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embedding(y) * h).sum(dim=1)


def _check_common(owner: str, ch: int, n_classes: int, resolution: int, channels: int, attention_after: int,
                  n_blocks: int) -> None:
    for key, value in (("ch", ch), ("n_classes", n_classes), ("channels", channels)):
        if value < 1:
            raise ValueError(f"{owner}: {key} must be a positive integer, got {value} (BigGAN is class-conditional)")
    if resolution not in GENERATOR_WIDTHS:
        raise ValueError(f"{owner}: resolution must be one of {sorted(GENERATOR_WIDTHS)}, got {resolution}")
    if not 0 <= attention_after <= n_blocks:
        raise ValueError(f"{owner}: attention_after must be between 0 (no attention) and {n_blocks} (the number of "
                         f"blocks at {resolution} px), got {attention_after}")


def check_biggan_generator_args(*, dim_z: int, shared_dim: int, ch: int, n_classes: int, resolution: int,
                                channels: int, attention_after: int, spectral_norm: bool = True) -> None:
    """Raise ValueError for arguments BigGANGenerator cannot be built with (checked without building it)."""
    n_blocks = len(GENERATOR_WIDTHS.get(resolution, ())) - 1
    _check_common("BigGANGenerator", ch, n_classes, resolution, channels, attention_after, n_blocks)
    if shared_dim < 1:
        raise ValueError(f"BigGANGenerator: shared_dim must be a positive integer, got {shared_dim}")
    if dim_z < n_blocks + 1 or dim_z % (n_blocks + 1):
        raise ValueError(f"BigGANGenerator: dim_z must be a positive multiple of {n_blocks + 1} (one chunk for the "
                         f"linear layer and one per block at {resolution} px), got {dim_z}")
    if attention_after and GENERATOR_WIDTHS[resolution][attention_after] * ch % 8:
        raise ValueError(f"BigGANGenerator: self-attention needs a width divisible by 8 after block {attention_after}; "
                         f"choose ch so that {GENERATOR_WIDTHS[resolution][attention_after]} * ch is")


def check_biggan_discriminator_args(*, ch: int, n_classes: int, resolution: int, channels: int,
                                    attention_after: int, relu_shortcut: bool = True) -> None:
    """Raise ValueError for arguments BigGANDiscriminator cannot be built with (checked without building it)."""
    first, layout = DISCRIMINATOR_LAYOUTS.get(resolution, (1, ()))
    _check_common("BigGANDiscriminator", ch, n_classes, resolution, channels, attention_after, len(layout) + 1)
    widths = [first] + [multiplier for multiplier, _ in layout]
    if attention_after and widths[attention_after - 1] * ch % 8:
        raise ValueError(f"BigGANDiscriminator: self-attention needs a width divisible by 8 after block "
                         f"{attention_after}; choose ch so that {widths[attention_after - 1]} * ch is")
