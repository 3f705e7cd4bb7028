"""Batch normalization with the original's constants and ghost batches, and its class-conditional variant for G."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from source.links.spectral_norm import no_power_iteration

# Chainer BatchNormalization defaults: eps 2e-5 (torch: 1e-5), decay 0.9 (= torch momentum 0.1).
# Running variance starts at 1 here (Chainer's CBN starts it at 0); this only matters for eval-mode
# samples in the first few dozen updates.
BN_EPS = 2e-5
BN_MOMENTUM = 0.1


class BatchNorm2d(nn.BatchNorm2d):
    """torch's BatchNorm2d, with statistics over groups of ``ghost_batch`` samples in training mode.

    The original normalizes G over micro-batches of 32 on each GPU. With ``ghost_batch`` 32, a forward
    of 256 samples normalizes each group of 32 by its own statistics and updates the running statistics
    once per group, in order: the same function, gradients and running statistics (to float rounding)
    as eight forwards of 32, at the speed of one large batch. None (or the whole batch) is plain BN.
    """

    ghost_batch: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.shape[0] // self.ghost_batch if self.training and self.ghost_batch else 1
        if groups <= 1:
            return super().forward(x)
        if x.shape[0] % self.ghost_batch:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into BatchNorm groups of {self.ghost_batch}")
        return self._ghost_forward(x, groups)

    def _ghost_forward(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        grouped = x.float().view(groups, -1, *x.shape[1:])  # statistics in fp32 also under autocast
        mean = grouped.mean(dim=(1, 3, 4), keepdim=True)
        var = grouped.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
        out = ((grouped - mean) * torch.rsqrt(var + self.eps)).view_as(x)
        if self.affine:
            out = out * self.weight[:, None, None] + self.bias[:, None, None]
        if self.track_running_stats:
            count = grouped[0, :, 0].numel()  # samples x pixels per channel in one group
            self._update_running_statistics(mean.view(groups, -1), var.view(groups, -1) * count / max(count - 1, 1))
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_statistics(self, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
        for mean, var in zip(means, unbiased_vars):  # as the group-sized forwards would, one after another
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.num_batches_tracked += len(means)


class CategoricalConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine part, followed by a per-class scale ``gamma[y]`` and shift ``beta[y]``.

    ``gamma`` and ``beta`` are (n_classes, num_features) embedding tables, so per-class vectors are
    rows of ``gamma.weight`` / ``beta.weight`` (gSR reads them there).
    """

    def __init__(self, num_features: int, n_classes: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM):
        super().__init__()
        self.bn = BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(n_classes, num_features)
        self.beta = nn.Embedding(n_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma(y)[:, :, None, None]
        beta = self.beta(y)[:, :, None, None]
        return gamma * self.bn(x) + beta

    def class_gains_and_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, C) per-class gain deviations gamma_y - 1 and biases beta_y: what gSR regularizes."""
        return self.gamma.weight - 1.0, self.beta.weight


class SharedConditionalBatchNorm2d(nn.Module):
    """BigGAN's conditional BN: BatchNorm without affine part, then gain ``1 + W_g c`` and bias ``W_b c`` from the
    condition c = [shared class embedding of y; this block's z chunk], through bias-free linear maps (spectrally
    normalized in the released BigGAN).

    The class-only part, which gSR regularizes, is the maps applied to each class's embedding with the z slot zero
    (the release's ``F.pad(embed, (0, noise_len))``): gamma_y - 1 = W_g[:, :E] e_y, beta_y = W_b[:, :E] e_y.
    The shared embedding belongs to G; this layer only refers to it (not a submodule: stored and counted once).
    """

    def __init__(self, num_features: int, shared: nn.Embedding, latent_dim: int,
                 make_linear: Callable[[int, int], nn.Module], eps: float = BN_EPS, momentum: float = BN_MOMENTUM):
        super().__init__()
        self.bn = BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gain = make_linear(shared.embedding_dim + latent_dim, num_features)
        self.bias = make_linear(shared.embedding_dim + latent_dim, num_features)
        object.__setattr__(self, "shared", shared)  # a reference, not registered (deepcopy of G keeps it G's own)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gain = 1.0 + self.gain(condition)[:, :, None, None]
        return gain * self.bn(x) + self.bias(condition)[:, :, None, None]

    def class_gains_and_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, C) class-only gain deviations and biases of every class. Spectral norm takes no power step here,
        so reading them (gSR, per-class spectra) never changes G's state."""
        classes = self.shared.weight
        with no_power_iteration(self):
            w_gain, w_bias = self.gain.weight, self.bias.weight
        width = classes.shape[1]
        return classes @ w_gain[:, :width].T, classes @ w_bias[:, :width].T


def batch_norm_2d(num_features: int, n_classes: int) -> nn.Module:
    """G's normalization: class-conditional when there are classes, plain affine BatchNorm otherwise."""
    if n_classes > 0:
        return CategoricalConditionalBatchNorm2d(num_features, n_classes)
    return BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)


def set_ghost_batch(model: nn.Module, size: int | None) -> None:
    """BatchNorm statistics of ``model`` over groups of ``size`` samples (None: over each whole batch)."""
    for module in model.modules():
        if isinstance(module, BatchNorm2d):
            module.ghost_batch = size
