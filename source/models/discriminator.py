"""SN ResNet projection discriminator of SNGAN-projection (snresnet_32 / snresnet_64 / snresnet; snresnet_32 also
at 48 px, for STL-10)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from source.links import embedding, linear
from source.models.generator import check_labels
from source.models.resblocks import DiscriminatorBlock, OptimizedBlock

# Blocks after block1 (an OptimizedBlock channels -> ch): (output width in units of ch, downsample).
BLOCK_LAYOUTS: dict[int, tuple[tuple[int, bool], ...]] = {
    32: ((1, True), (1, False), (1, False)),
    48: ((1, True), (1, False), (1, False)),  # STL-10: SRGANs' STL-10 spectra show these 10 convs (layers 0-9)
    64: ((2, True), (4, True), (8, True), (16, True)),
    128: ((2, True), (4, True), (8, True), (16, True), (16, False)),
}


class SNResNetProjectionDiscriminator(nn.Module):
    """Image (and class y) -> one unbounded score per sample, shape (N,).

    Head: ReLU -> global *sum* pooling -> h; score = linear(h) + <l_y(y), h> (projection) when
    ``n_classes > 0``. Every conv, the head linear and ``l_y`` are spectrally normalized.
    ``head_bias=False`` drops the head linear's bias, as SRGANs' CIFAR ``SRDiscriminator`` does.
    Modules are named as in the original: ``block1``..``blockK``, head linear ``l{K+1}``
    (``l7`` at 128 px), class embedding ``l_y``.
    """

    def __init__(self, ch: int = 64, n_classes: int = 0, resolution: int = 128, channels: int = 3,
                 head_bias: bool = True):
        super().__init__()
        check_discriminator_args(ch=ch, n_classes=n_classes, resolution=resolution, channels=channels)
        self.n_classes = n_classes
        self.block1 = OptimizedBlock(channels, ch)
        self.block_names = ["block1"]
        in_channels = ch
        for index, (multiplier, downsample) in enumerate(BLOCK_LAYOUTS[resolution], start=2):
            name = f"block{index}"
            self.add_module(name, DiscriminatorBlock(in_channels, multiplier * ch, downsample))
            self.block_names.append(name)
            in_channels = multiplier * ch
        self.linear_name = f"l{len(self.block_names) + 1}"
        self.add_module(self.linear_name, linear(in_channels, 1, gain=1.0, spectral_norm=True, bias=head_bias))
        if n_classes > 0:
            self.l_y = embedding(n_classes, in_channels, gain=1.0, spectral_norm=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # The original silently drops the projection term when y is missing; here that is an error,
        # because a conditional D scored without labels is always a wiring bug.
        check_labels(self, y)
        h = x
        for name in self.block_names:
            h = getattr(self, name)(h)
        h = F.relu(h).sum(dim=(2, 3))
        score = getattr(self, self.linear_name)(h).squeeze(1)
        if self.n_classes > 0:
            score = score + (self.l_y(y) * h).sum(dim=1)
        return score


def check_discriminator_args(*, ch: int, n_classes: int, resolution: int, channels: int, head_bias: bool = True) -> None:
    """Raise ValueError for arguments SNResNetProjectionDiscriminator cannot be built with (checked without building it)."""
    if ch < 1 or channels < 1:
        raise ValueError(f"SNResNetProjectionDiscriminator: ch and channels must be positive, got ch={ch}, "
                         f"channels={channels}")
    if n_classes < 0:
        raise ValueError(f"SNResNetProjectionDiscriminator: n_classes must be >= 0 (0 = unconditional), "
                         f"got {n_classes}")
    if resolution not in BLOCK_LAYOUTS:
        raise ValueError(f"SNResNetProjectionDiscriminator: resolution must be one of {sorted(BLOCK_LAYOUTS)}, "
                         f"got {resolution}")
