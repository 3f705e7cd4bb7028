"""Batch normalization with the original's constants, and its class-conditional variant for G."""
import torch
import torch.nn as nn

# Chainer BatchNormalization defaults: eps 2e-5 (torch: 1e-5), decay 0.9 (= torch momentum 0.1).
# Running variance starts at 1 here (Chainer's CBN starts it at 0); this only matters for eval-mode
# samples in the first few dozen updates.
BN_EPS = 2e-5
BN_MOMENTUM = 0.1


class CategoricalConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine part, followed by a per-class scale ``gamma[y]`` and shift ``beta[y]``.

    ``gamma`` and ``beta`` are (n_classes, num_features) embedding tables, so per-class vectors are
    rows of ``gamma.weight`` / ``beta.weight`` (gSR reads them there).
    """

    def __init__(self, num_features: int, n_classes: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(n_classes, num_features)
        self.beta = nn.Embedding(n_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma(y)[:, :, None, None]
        beta = self.beta(y)[:, :, None, None]
        return gamma * self.bn(x) + beta


def batch_norm_2d(num_features: int, n_classes: int) -> nn.Module:
    """G's normalization: class-conditional when there are classes, plain affine BatchNorm otherwise."""
    if n_classes > 0:
        return CategoricalConditionalBatchNorm2d(num_features, n_classes)
    return nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)
