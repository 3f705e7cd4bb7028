"""gSR: group spectral regularization of G's class-conditional BatchNorm (Rangwani et al., ECCV 2022).

For every class-conditional BN layer l of G and every class y, the gain deviation gamma_y - 1 and the
bias beta_y (vectors of C channels) are reshaped row-major into the most nearly square a x b matrix
(a = the largest divisor of C <= sqrt C: 256 -> 16 x 16), and their largest singular values are
penalized, weighted per class by the inverse effective number of training images (tail classes more):

    L_gSR = sum_l sum_y lambda_y (sigma(Gamma_y^l)^2 + sigma(B_y^l)^2) / (L K),   mean_y lambda_y = w

sigma comes from a persistent power iteration (4 steps per G step, 40 on the first call), with gradient
through the fixed-(u, v) surrogate u^T M v, as released. Two differences from the release, both stated in
the README: the bias branch iterates with its own right vector (the release used the gain's, which gives a
lower bound; ``released_beta_estimate`` reproduces it), and a vector is kept instead of normalized to zero
where M is zero. The latter matters here: sngan_projection's conditional BN starts at gamma = 1, beta = 0,
so the matrices start at exactly zero and a plain power iteration would zero its vectors and switch gSR
off for good (docs/reference/gsr_probe.md).
"""
from __future__ import annotations

import math
import zlib
from collections import Counter

import numpy as np
import torch
from torch import nn

FIRST_CALL_FACTOR = 10  # "based on NVAE": the release's 10x iterations when the vectors are fresh
TINY = 1e-12            # below this norm a product carries no direction; the previous vector is kept


# --- pure functions ---------------------------------------------------------------------------------------


def grouping(channels: int) -> tuple[int, int]:
    """(a, b) with a * b = channels, a the largest divisor <= sqrt(channels): the most nearly square shape."""
    a = max(d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0)
    return a, channels // a


def group(vectors: torch.Tensor) -> torch.Tensor:
    """(K, C) per-class vectors -> (K, a, b) matrices, row-major (group i = channels i*b ... i*b + b - 1)."""
    a, b = grouping(vectors.shape[1])
    return vectors.reshape(vectors.shape[0], a, b)


def class_weights(counts: list[int], beta: float, weight: float, balanced: bool = True) -> torch.Tensor:
    """lambda_y: ``weight`` / effective number (1 - beta^n) / (1 - beta), normalized to mean ``weight``.

    Unbalanced (``balanced`` false) gives lambda_y = 1 whatever ``weight``, as the release does.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if not balanced:
        return torch.ones(len(counts), dtype=torch.float64)
    inverse = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return torch.from_numpy(weight * len(counts) * inverse / inverse.sum())


def _normalize(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > TINY, x / norm.clamp_min(TINY), previous)


@torch.no_grad()
def power_iterate(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int,
                  right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` batched power steps on (K, a, b) ``matrices`` from u (K, a), v (K, b): v <- M^T u, u <- M v.

    ``right`` (K, iterations, b), when given, replaces v in the u update: the release's bias branch.
    """
    for step in range(iterations):
        v = _normalize(torch.einsum("kab,ka->kb", matrices, u), v)
        u = _normalize(torch.einsum("kab,kb->ka", matrices, v if right is None else right[:, step]), u)
    return u, v


def sigma(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u^T M v per class: the largest singular value at converged (u, v), with gradient u v^T."""
    return torch.einsum("ka,kab,kb->k", u, matrices, v)


def exact_sigma(vectors: torch.Tensor) -> torch.Tensor:
    """The largest singular value of each class's grouped matrix, by SVD in float64 (measurement, no gradient)."""
    return torch.linalg.matrix_norm(group(vectors.detach().double()), ord=2)


# --- the regularizer ----------------------------------------------------------------------------------


def conditional_layers(gen: nn.Module) -> list[tuple[str, nn.Module]]:
    """G's class-conditional normalization layers: modules offering ``class_gains_and_biases()``."""
    return [(name, module) for name, module in gen.named_modules() if hasattr(module, "class_gains_and_biases")]


def describe_grouping(gen: nn.Module) -> str:
    """How gSR groups G's class-conditional layers, e.g. "6 layers of 256 channels as 16 x 16"; a width without a
    divisor above 1 is said to have no group structure (1 x C: the largest singular value is the vector's norm)."""
    with torch.no_grad():
        widths = Counter(layer.class_gains_and_biases()[0].shape[1] for _, layer in conditional_layers(gen))
    shapes = [f"{count} layer{'s' * (count > 1)} of {width} channels as {' x '.join(map(str, grouping(width)))}"
              for width, count in sorted(widths.items(), reverse=True)]
    flat = [str(width) for width in sorted(widths) if grouping(width)[0] == 1]
    return ", ".join(shapes) + (f"; {' and '.join(flat)} channels have no divisor above 1: no group structure (the "
                                "largest singular value of 1 x C is the vector's norm)" if flat else "")


class GroupSpectralRegularizer:
    """L_gSR of a generator, with its power-iteration vectors as state (snapshots; the same on every rank)."""

    def __init__(self, class_counts: list[int], weight: float = 0.5, beta: float = 0.999, balanced: bool = True,
                 iterations: int = 4, released_beta_estimate: bool = False, seed: int = 0):
        self.lambdas = class_weights(class_counts, beta, weight, balanced)
        self.iterations = iterations
        self.released_beta_estimate = released_beta_estimate
        self.seed = seed
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        self.last_sigmas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lambdas_here: torch.Tensor | None = None

    def __call__(self, gen: nn.Module) -> torch.Tensor:
        layers = conditional_layers(gen)
        if not layers:
            raise ValueError("gSR needs a class-conditional generator (n_classes > 0); set updater.gsr.enabled=false")
        total = 0.0
        for name, module in layers:
            gains, biases = module.class_gains_and_biases()
            sigma_gain, sigma_bias = self._sigmas(name, group(gains.float()), group(biases.float()))
            self._record(name, sigma_gain.detach(), sigma_bias.detach())
            lambdas = self._lambdas_like(sigma_gain)
            total = total + (lambdas * (sigma_gain.square() + sigma_bias.square())).sum()
        return total / (len(layers) * len(self.lambdas))

    def _lambdas_like(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The class weights on the sigmas' device and dtype, converted once (a copy from the host at every call
        would stop a step graph's capture)."""
        if self._lambdas_here is None or self._lambdas_here.device != sigmas.device:  # sigmas are float32
            self._lambdas_here = self.lambdas.to(sigmas)
        return self._lambdas_here

    def _record(self, name: str, sigma_gain: torch.Tensor, sigma_bias: torch.Tensor) -> None:
        """Keep this call's sigmas in tensors of our own, written in place: a step graph's outputs are its
        memory, which other replays may reuse."""
        if name not in self.last_sigmas:  # the first call (eager, before any capture) makes them
            self.last_sigmas[name] = (torch.empty_like(sigma_gain), torch.empty_like(sigma_bias))
        for kept, value in zip(self.last_sigmas[name], (sigma_gain, sigma_bias)):
            kept.copy_(value)

    def _sigmas(self, name: str, gain: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = name not in self.vectors
        if fresh:
            self.vectors[name] = self._initial_vectors(name, gain)
        state = self.vectors[name]
        iterations = self.iterations * (FIRST_CALL_FACTOR if fresh else 1)
        right = None
        if self.released_beta_estimate:  # the release's bias branch steps u with the gain's v of each step
            u_gain, v_gain, right = self._gain_steps(gain, state, iterations)
        else:
            u_gain, v_gain = power_iterate(gain, state["u_gain"], state["v_gain"], iterations)
        u_bias, v_bias = power_iterate(bias, state["u_bias"], state["v_bias"], iterations, right)
        # in place, never rebound: a step graph reads and writes the tensors it was captured with
        for key, value in (("u_gain", u_gain), ("v_gain", v_gain), ("u_bias", u_bias), ("v_bias", v_bias)):
            state[key].copy_(value)
        return sigma(gain, state["u_gain"], state["v_gain"]), sigma(bias, state["u_bias"], state["v_bias"])

    @staticmethod
    def _gain_steps(gain: torch.Tensor, state: dict, iterations: int) -> tuple[torch.Tensor, ...]:
        """The gain's power iteration, also returning its v after each step (K, iterations, b)."""
        u, v, rights = state["u_gain"], state["v_gain"], []
        for _ in range(iterations):
            u, v = power_iterate(gain, u, v, 1)
            rights.append(v)
        return u, v, torch.stack(rights, dim=1)

    def _initial_vectors(self, name: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unit random vectors from (seed, layer name): identical on every rank, on resume and across runs."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        k, a, b = like.shape
        shapes = {"u_gain": (k, a), "v_gain": (k, b), "u_bias": (k, a), "v_bias": (k, b)}
        vectors = {key: torch.randn(shape, generator=generator, dtype=torch.float64) for key, shape in shapes.items()}
        return {key: (x / x.norm(dim=-1, keepdim=True)).to(like) for key, x in vectors.items()}

    def state_dict(self) -> dict:
        return {"vectors": {name: {k: v.clone() for k, v in state.items()} for name, state in self.vectors.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.vectors = {name: {key: vector.to(device) for key, vector in vectors.items()}
                        for name, vectors in state["vectors"].items()}


def class_sigmas(gen: nn.Module) -> dict[str, tuple[list[float], list[float]]]:
    """{layer: (sigma of each class's grouped gain deviation, of its bias)}, exact: for per-class spectra."""
    sigmas = {}
    for name, module in conditional_layers(gen):
        gains, biases = module.class_gains_and_biases()
        sigmas[name] = (exact_sigma(gains).tolist(), exact_sigma(biases).tolist())
    return sigmas
