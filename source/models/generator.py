"""ResNet generator of SNGAN-projection (resnet_32 / resnet_64 / resnet, and resnet_32 at 48 px for STL-10),
optionally with SN as in SRGANs."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from source.links import batch_norm_2d, conv2d, linear
from source.models.resblocks import GeneratorBlock, class_norm, glorot_conv

# Feature widths in units of ch: the first entry is l1's output, each next one a block's output.
# The number of blocks (len - 1) fixes the upsampling factor 2**blocks.
CHANNEL_MULTIPLIERS: dict[int, tuple[int, ...]] = {
    32: (1, 1, 1, 1),
    48: (1, 1, 1, 1),  # STL-10: the 32 px layout from a 6 x 6 start (SRGANs' STL-10 D, too, is the CIFAR one)
    64: (16, 8, 4, 2, 1),
    128: (16, 16, 8, 4, 2, 1),
}


def check_labels(model: nn.Module, y: torch.Tensor | None, hint: str = "") -> None:
    """Labels are required exactly when ``model.n_classes > 0``: a mismatch is always a wiring bug."""
    name, n_classes = type(model).__name__, model.n_classes
    if n_classes > 0 and y is None:
        raise ValueError(f"{name} has n_classes={n_classes} and needs labels y{hint}")
    if n_classes == 0 and y is not None:
        raise ValueError(f"{name} has n_classes=0 and takes no labels; pass y=None or build it with n_classes > 0")


class LatentSampler:
    """What the updater and evaluation draw G's inputs with: z (``dim_z``) and labels (``n_classes``)."""
    dim_z: int
    n_classes: int

    def sample_z(self, n: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I), shape (n, dim_z); ``generator`` must live on ``device``."""
        return torch.randn(n, self.dim_z, device=device, generator=generator)

    def sample_y(self, n: int, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels ~ Uniform{0..n_classes-1}, as the original G draws them when none are given."""
        if self.n_classes == 0:
            raise ValueError("sample_y: this generator is unconditional (n_classes=0); call it without labels")
        return torch.randint(self.n_classes, (n,), device=device, generator=generator)


class ResNetGenerator(LatentSampler, nn.Module):
    """z (and class y) -> image in [-1, 1] of shape (channels, resolution, resolution).

    Modules are named as in the original: ``l1``, ``block2``..``blockK``, then ``b{K+1}`` (BN) and
    ``l{K+1}`` (output conv), e.g. ``b7``/``l7`` at 128 px, ``b5``/``l5`` at 32 px.
    ``spectral_norm=True`` (SRGANs) puts SN on l1, every block conv and the output conv;
    ``False`` gives sngan_projection's plain G.
    """

    def __init__(
        self,
        dim_z: int = 128,
        bottom_width: int = 4,
        ch: int = 64,
        n_classes: int = 0,
        resolution: int = 128,
        channels: int = 3,
        spectral_norm: bool = False,
    ):
        super().__init__()
        check_generator_args(dim_z=dim_z, bottom_width=bottom_width, ch=ch, n_classes=n_classes, resolution=resolution,
                             channels=channels)
        self.dim_z = dim_z
        self.bottom_width = bottom_width
        self.n_classes = n_classes
        widths = [multiplier * ch for multiplier in CHANNEL_MULTIPLIERS[resolution]]

        self.l1 = linear(dim_z, bottom_width * bottom_width * widths[0], gain=1.0, spectral_norm=spectral_norm)
        self.block_names = [f"block{index}" for index in range(2, len(widths) + 1)]
        norm, conv = class_norm(n_classes), glorot_conv(spectral_norm)
        for name, in_channels, out_channels in zip(self.block_names, widths[:-1], widths[1:]):
            self.add_module(name, GeneratorBlock(in_channels, out_channels, norm, conv))
        head_index = len(widths) + 1
        self.bn_name, self.conv_name = f"b{head_index}", f"l{head_index}"
        self.add_module(self.bn_name, batch_norm_2d(widths[-1], n_classes=0))  # plain affine BN, as the original
        self.add_module(self.conv_name, conv2d(widths[-1], channels, 3, gain=1.0, spectral_norm=spectral_norm))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(self, y, hint=" (draw them with sample_y)")
        h = self.l1(z).view(z.shape[0], -1, self.bottom_width, self.bottom_width)
        for name in self.block_names:
            h = getattr(self, name)(h, y)
        h = F.relu(getattr(self, self.bn_name)(h))
        return torch.tanh(getattr(self, self.conv_name)(h))


def check_generator_args(*, dim_z: int, bottom_width: int, ch: int, n_classes: int, resolution: int, channels: int,
                         spectral_norm: bool = False) -> None:
    """Raise ValueError for arguments ResNetGenerator cannot be built with (checked without building it)."""
    for key, value in (("dim_z", dim_z), ("bottom_width", bottom_width), ("ch", ch), ("channels", channels)):
        if value < 1:
            raise ValueError(f"ResNetGenerator: {key} must be a positive integer, got {value}")
    if n_classes < 0:
        raise ValueError(f"ResNetGenerator: n_classes must be >= 0 (0 = unconditional), got {n_classes}")
    if resolution not in CHANNEL_MULTIPLIERS:
        raise ValueError(f"ResNetGenerator: resolution must be one of {sorted(CHANNEL_MULTIPLIERS)}, got {resolution}")
    n_blocks = len(CHANNEL_MULTIPLIERS[resolution]) - 1
    if bottom_width * 2 ** n_blocks != resolution:
        raise ValueError(f"ResNetGenerator: resolution {resolution} has {n_blocks} x2 up-blocks, so bottom_width "
                         f"must be {resolution // 2 ** n_blocks}, got {bottom_width}")
