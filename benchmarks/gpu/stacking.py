"""K runs of one model as one stacked model (benchmarks/gpu/stacked.py measures whether that trains them faster).

``stack(models)`` turns K models built alike (seeds of one config) into one whose inputs and outputs hold the runs'
features run by run ((batch, K x C, ...): run k's the k-th block): every conv a grouped conv (groups K), every
linear a batched product, every BatchNorm one over K x C channels (its statistics are per channel, hence per run),
spectral norm's power step batched over the runs. The models' own forward code runs on the stacked layers unchanged:
it reshapes only batch and spatial dimensions. The unconditional ResNets only (no class embeddings).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from source.links.conditional_batchnorm import BatchNorm2d
from source.spectral.spectra import raw_weight, spectral_norm_of


def batched_power_step(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's power step (u from v, then v from u) for matrices (K, out, n) at once, u (K, out) and v (K, n)
    updated in place; returns ||W^T u|| (K, 1), the sigma the step gives."""
    product = torch.bmm(matrices, v.unsqueeze(-1)).squeeze(-1)
    torch.div(product, torch.linalg.vector_norm(product, dim=1, keepdim=True).clamp_min_(eps), out=u)
    product = torch.bmm(matrices.mT, u.unsqueeze(-1)).squeeze(-1)
    norm = torch.linalg.vector_norm(product, dim=1, keepdim=True)
    torch.div(product, norm.clamp_min(eps), out=v)
    return norm


class StackedSpectralNorm(nn.Module):
    """Spectral norm of K weight matrices (K, out, n) at once: torch's power step (u from v, then v from u) batched,
    and W / sigma with sigma = u^T W v, u and v held constant: the value ||W^T u|| that the step gives and the
    gradient torch's spectral norm differentiates."""

    def __init__(self, norms: list[_SpectralNorm]):
        super().__init__()
        self.eps = norms[0].eps
        self.register_buffer("u", torch.stack([norm._u for norm in norms]).clone())
        self.register_buffer("v", torch.stack([norm._v for norm in norms]).clone())

    def forward(self, matrices: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                batched_power_step(matrices, self.u, self.v, self.eps)
        sigma = torch.einsum("ko,kon,kn->k", self.u, matrices, self.v)
        return matrices / sigma[:, None, None]


def stacked_parameters(layers: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None,
                                                         StackedSpectralNorm | None]:
    """The layers' (raw) weights and biases stacked along a new first dimension, and their spectral norm's."""
    norms = [spectral_norm_of(layer) for layer in layers]
    weight = torch.stack([(layer.weight if norms[0] is None else raw_weight(layer)).detach() for layer in layers])
    bias = torch.stack([layer.bias.detach() for layer in layers]) if layers[0].bias is not None else None
    return weight, bias, StackedSpectralNorm(norms) if norms[0] is not None else None


class StackedConv2d(nn.Module):
    """K convs as one grouped conv: weight (K x out, in, k, k), input and output channels run by run. The ResNets'
    convs only: stride 1, no dilation or groups, zero padding."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        if (first.stride, first.dilation, first.groups, first.padding_mode) != ((1, 1), (1, 1), 1, "zeros"):
            raise ValueError(f"stack: a conv of stride {first.stride}, dilation {first.dilation}, groups "
                             f"{first.groups}, padding {first.padding_mode}: only the ResNets' plain convs stack")
        self.runs, self.padding = len(convs), first.padding
        weight, bias, self.sn = stacked_parameters(convs)
        self.weight = nn.Parameter(weight.flatten(0, 1))
        self.bias = None if bias is None else nn.Parameter(bias.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sn is not None:
            weight = self.sn(weight.view(self.runs, len(weight) // self.runs, -1)).view_as(weight)
        return F.conv2d(x, weight, self.bias, padding=self.padding, groups=self.runs)


class StackedLinear(nn.Module):
    """K linears as one batched product: weight (K, out, in); features (batch, K x in) -> (batch, K x out)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.runs = len(linears)
        weight, bias, self.sn = stacked_parameters(linears)
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.sn is None else self.sn(self.weight)
        out = torch.bmm(x.view(len(x), self.runs, -1).transpose(0, 1), weight.mT).transpose(0, 1)
        return (out if self.bias is None else out + self.bias).reshape(len(x), -1)


def stacked_batch_norm(norms: list[BatchNorm2d]) -> BatchNorm2d:
    """One BatchNorm over the K runs' channels side by side: statistics per channel are statistics per run."""
    first = norms[0]
    stacked = BatchNorm2d(first.num_features * len(norms), eps=first.eps, momentum=first.momentum,
                          affine=first.affine).to(first.running_mean)  # its device and dtype
    stacked.ghost_batch = first.ghost_batch
    with torch.no_grad():
        for name in ("running_mean", "running_var") + (("weight", "bias") if first.affine else ()):
            getattr(stacked, name).copy_(torch.cat([getattr(norm, name) for norm in norms]))
        stacked.num_batches_tracked.copy_(first.num_batches_tracked)
    return stacked


STACKED = ((nn.Conv2d, StackedConv2d), (nn.Linear, StackedLinear), (BatchNorm2d, stacked_batch_norm))


def stack(models: list[nn.Module]) -> nn.Module:
    """One model that computes the K ``models``' functions side by side (built alike, e.g. seeds of one config):
    inputs and outputs hold the runs' features run by run ((batch, K x C, ...): run k's the k-th block), D's scores
    are (batch, K). Its parameters are copies; the models are left as they were."""
    stacked, done = copy.deepcopy(models[0]), []
    for name, module in models[0].named_modules():
        if any(name.startswith(f"{prefix}.") for prefix in done):
            continue  # inside a stacked layer (its spectral norm's parametrization)
        make = next((make for kind, make in STACKED if isinstance(module, kind)), None)
        if make is None:
            if parametrize.is_parametrized(module) or any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"stack: {name} ({type(module).__name__}) has no stacked form: the unconditional "
                                 "ResNets only (conv, linear, BatchNorm, spectral norm)")
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(stacked.get_submodule(parent), attribute, make([model.get_submodule(name) for model in models]))
        done.append(name)
    return stacked.train(models[0].training)
