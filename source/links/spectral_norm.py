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
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

SN_POWER_ITERATIONS = 1
SN_EPS = 1e-12


class _DividedBySigma(torch.autograd.Function):
    """``weight / sigma`` where sigma = u^T W v with u, v held constant, as torch's SN differentiates it: the
    gradient (g - <g, W / sigma> u v^T) / sigma in four kernels, where autograd's graph of torch's expression
    launches about eleven (the 32 px models are launch-bound on a GPU, and SN was over half of their kernels).

    u and v are saved without copies: a power step before this backward (which our updater never makes) bumps
    their version and autograd then refuses the backward, rather than using the new vectors. The gradient holds
    sigma constant, so it cannot be differentiated again (nothing here needs second derivatives through D's
    weights): once_differentiable refuses, rather than returning wrong ones."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        normalized = weight / sigma
        ctx.save_for_backward(normalized, sigma, u, v)
        return normalized

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        normalized, sigma, u, v = ctx.saved_tensors
        along = torch.vdot(grad.reshape(-1), normalized.reshape(-1))  # <g, W> / sigma
        grad_matrix = torch.addr(grad.reshape(len(u), -1), u, v * along, alpha=-1)
        return (grad_matrix / sigma).view(grad.shape), None, None, None


class FP32SpectralNorm(_SpectralNorm):
    """torch's spectral norm (same buffers, power step and values), in fewer kernels, and kept in fp32 under
    mixed-precision autocast: a bf16 power iteration would estimate sigma to 2-3 digits, and every forward divides
    the weight by it.

    torch computes sigma = u^T W v by a further product after the power step; that equals ||W^T u||, the norm the
    step has just divided v by (v = W^T u / ||W^T u||), so it is taken from there (equal up to rounding while that
    norm is above ``eps``), and the stored u, v are not copied (see ``_DividedBySigma``). Output dimension 0 only
    (what ``spectral_normed`` registers): the gradient is formed in that layout."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        if dim != 0:
            raise ValueError(f"spectral norm: output dimension 0 only, not {dim}")
        super().__init__(weight, n_power_iterations, dim, eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.device.type == "meta":  # shapes only (a file's model checked before it is built): no autocast there
            return super().forward(weight)
        with torch.autocast(weight.device.type, enabled=False):
            if weight.ndim == 1:  # torch's case for a vector: normalized, no power step
                return super().forward(weight)
            matrix = self._reshape_weight_to_matrix(weight)
            with torch.no_grad():
                if self.training:
                    sigma = self._power_step(matrix)
                else:
                    sigma = torch.vdot(self._u, torch.mv(matrix, self._v))
            return _DividedBySigma.apply(weight, sigma, self._u, self._v)

    def _power_step(self, matrix: torch.Tensor) -> torch.Tensor:
        """torch's power iteration (u from v, then v from u, in place); returns ||W^T u||."""
        for _ in range(self.n_power_iterations):
            u = torch.mv(matrix, self._v)
            torch.div(u, torch.linalg.vector_norm(u).clamp_min_(self.eps), out=self._u)
            v = torch.mv(matrix.H, self._u)
            norm = torch.linalg.vector_norm(v)
            torch.div(v, norm.clamp_min(self.eps), out=self._v)
        return norm


def spectral_normed(module: nn.Module, eps: float = SN_EPS) -> nn.Module:
    """Registers spectral normalization on ``module.weight`` with the Chainer SN settings (what
    ``torch.nn.utils.parametrizations.spectral_norm`` registers, as its fp32 variant); StudioGAN's models use
    ``eps`` 1e-6."""
    sn = FP32SpectralNorm(module.weight, n_power_iterations=SN_POWER_ITERATIONS, dim=0, eps=eps)
    parametrize.register_parametrization(module, "weight", sn)
    return module


@contextmanager
def no_power_iteration(*models: nn.Module, kinds: tuple[type, ...] = (_SpectralNorm,)) -> Iterator[None]:
    """Spectral norm of ``models`` (its modules of ``kinds``) uses its stored (u, v) without a power step while
    inside (as in eval mode), still differentiable through sigma = u^T W v."""
    layers = [m for model in models for m in model.modules() if isinstance(m, kinds)]
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode


def power_iteration(models: tuple[nn.Module, ...], enabled: bool):
    """Let spectral norm of ``models`` advance its power iteration only when ``enabled``.

    The updater enables it on the first micro-batch of each phase only, so one optimizer step does
    one power step whatever the accumulation and world size: the same global batch then gives the
    same update on 1 or N processes (sngan_projection, 1 forward per step, did one per step too).
    """
    return nullcontext() if enabled else no_power_iteration(*models)


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
