"""Spectral Regularization (Liu et al., ICCV 2019): compensation of D's singular values (srgan.md §2).

SR is not a loss. After the D optimizer step, every `interval` iterations, it rewrites the raw weight
of each spectrally normalized conv of D through its thin SVD, W <- U diag(s') V^T (computed as
U diag(s'/s) U^T W from the eigendecomposition of a Gram matrix: ``Factors``):
    dynamic (ImageNet): s' = s_1 * R with R = max(R, s / s_1), R being the running envelope of the
                        normalized spectrum; the first call only records R. s_1 and the singular
                        vectors are kept, lower singular values can only be raised.
    static (CIFAR):     s' = s / s_1 with its top floor(r/2) entries set to 1; this also rescales W
                        to spectral norm 1, as the original does.
    rescale (a control, not in the paper): s' = s / s_1, W <- W / s_1: static SR's rescale to spectral
                        norm 1 without its reshaping of the spectrum. The CPU pilot
                        (docs/reference/collapse_probe.md) found this alone reproduces part of static SR's
                        benefit; the collapse study runs it as an arm.
The edit is written into the same Parameter in place, outside autograd; Adam's moments and SN's
u/v are left alone, so SN keeps dividing by its own estimate of s_1. Degenerate weights, which training does not
produce, are kept finite where the original's 0/0 was not: a direction W lacks (s_i = 0) stays at 0, and an all-zero
W is left as it is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from source.spectral.spectra import (
    from_gram_eigenvalues,
    raw_weight,
    singular_values,
    spectral_norm_layers,
    stack_by_shape,
    weight_matrix,
    write_weight_matrix,
)

MODES = ("dynamic", "static", "rescale")

# In float32 an edit of a well-conditioned W is off by ~1e-6 (tests/test_spectral.py measures both against
# numpy float64), the size of a genuine per-step change of W, and far more where the spectrum falls (by the Gram
# matrix, 5e-3 with values down to 1e-3 s_1); float32 gesdd once failed to converge on the near-degenerate spectra
# that SR itself creates (benchmark run). float64 makes the edit exact up to the float32 storage of W for ~2x the
# CPU time (2.8 s against 1.4 s for the ImageNet D's 17 convs on one core, benchmarks/results/spectral_cpu.json),
# paid once per 5 iterations.
SOLVE_DTYPE = torch.float64


# SR's edits need U and s of each weight W, not V: U diag(s') V^T = U diag(s'/s) U^T W, where U and s^2 are the
# eigenvectors and eigenvalues of the Gram matrix of W's short side (m x m, m = min of W's shape). One eigh of that
# and two products replace W's SVD, with no check of ours that waits for the device (torch's eigh, like its SVD,
# checks its own result on CUDA and waits for that): the same W' to float64 rounding where the spectrum is well
# resolved (tests/test_spectral.py: numpy's SVD edit to 1e-12), 2.1x faster on one CPU core (2.8 s against
# 6.0 s for the ImageNet D's 17 convs, benchmarks/results/spectral_cpu.json); section (b) of the GPU benchmark times
# both solvers on a GPU. Squaring W resolves a singular value s_i to a relative error of about
# eps64 (s_1 / s_i)^2: 1e-6 at s_i = 1e-5 s_1, which is what a value raised from there is off by. The original's
# float32 SVD was off by eps32 s_1 / s_i (1e-2 there), and below 1e-7 s_1 the float32 storage of W holds noise.
class Factors:
    """s (descending) and what rebuilding W with another spectrum needs, for a batch of matrices (..., m, n)."""

    def __init__(self, matrices: torch.Tensor, solver: str = "gram"):
        self.wide = matrices.shape[-2] <= matrices.shape[-1]
        self.short = matrices if self.wide else matrices.mT  # (..., min, max)
        self.vh = None
        if solver == "gram":
            eigenvalues, u = torch.linalg.eigh(self.short @ self.short.mT)
            self.s, self.u = from_gram_eigenvalues(eigenvalues.flip(-1)), u.flip(-1)
        else:
            self.u, self.s, self.vh = thin_svd(self.short)

    def rebuild(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The matrices with singular values ``spectrum`` (descending positions as ``s``) and the same vectors."""
        # a zero singular value has no direction in W to scale: its ratio is 0, not 0/0, so an exactly rank-deficient
        # W keeps its zeros where an SVD would raise them along an arbitrary null direction (and the envelope still
        # records the raise)
        if self.vh is None:
            ratio = torch.where(self.s > 0, spectrum / self.s, 0)  # 0/0 is computed, then not taken
            rebuilt = (self.u * ratio.unsqueeze(-2)) @ (self.u.mT @ self.short)
        else:
            rebuilt = (self.u * spectrum.unsqueeze(-2)) @ self.vh
        return rebuilt if self.wide else rebuilt.mT


def thin_svd(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(full_matrices=False), always run on the tall orientation.

    MKL's SVD of a wide (m < n) matrix is ~4x slower than of its transpose (1024 x 9216 float64:
    8.6 s against 2.0 s on one core), and all but the shortcut convs of D are wide.
    """
    if matrices.shape[-2] >= matrices.shape[-1]:
        return torch.linalg.svd(matrices, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrices.mT, full_matrices=False)
    return uh.mT, s, v.mT


def normalized_spectrum(matrices: torch.Tensor) -> torch.Tensor:
    """s / s_1 for a batch of matrices (..., m, n), from the short side's Gram matrix as the edits' spectra are."""
    return _over_top(singular_values(matrices))


def _over_top(s: torch.Tensor) -> torch.Tensor:
    """s / s_1; 0 for an all-zero W (s_1 = 0)."""
    return _divided(s, s[..., :1], 0)


def _divided(values: torch.Tensor, top: torch.Tensor, otherwise) -> torch.Tensor:
    """values / top where top > 0, else ``otherwise``: an all-zero W's 0 / 0 would put NaN into the envelope for
    good (torch.maximum keeps NaN) and into the weights. Such a W is left as it is by every mode: it has no spectrum
    to edit."""
    return torch.where(top > 0, values / torch.where(top > 0, top, 1), otherwise)


def dynamic_compensation(matrices: torch.Tensor, envelope: torch.Tensor,
                         solver: str = "gram") -> tuple[torch.Tensor, torch.Tensor]:
    """One dynamic SR step on a batch: returns the rebuilt matrices and the raised envelope.

    Works in the dtype it is given, so the precision choice stays with the caller.
    """
    factors = Factors(matrices, solver)
    s = factors.s
    envelope = torch.maximum(envelope, _over_top(s))
    return factors.rebuild(s[..., :1] * envelope), envelope


def static_compensation(matrices: torch.Tensor, solver: str = "gram") -> torch.Tensor:
    """One static SR step on a batch: normalized spectrum with its top half set to 1 (index 0 included)."""
    factors = Factors(matrices, solver)
    compensated = _over_top(factors.s)
    compensated[..., : compensated.shape[-1] // 2] = 1
    return factors.rebuild(torch.where(factors.s[..., :1] > 0, compensated, 0))


def rescale_compensation(matrices: torch.Tensor) -> torch.Tensor:
    """The rescale-only control on a batch: W / s_1, the normalized spectrum and singular vectors unchanged."""
    top = singular_values(matrices)[..., :1].unsqueeze(-1)  # s_1 from the Gram matrix, as the edits'
    return _divided(matrices, top, matrices)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SpectralRegularizer:
    """Callable SR hook: `sr(dis, iteration)` right after each D optimizer step.

    `iteration` counts completed iterations, as Chainer's updater did: a run resumed from
    snapshot_iter_40000 calls at 40000, 40005, ... Static mode acts on every call whose iteration
    qualifies, so with n_dis > 1 it fires after each D sub-step of that iteration, as the CIFAR code.

    Under torch.distributed every rank computes the same edit and rank 0's result (weights and
    envelope) is then broadcast, so ranks stay bit-identical even where SVDs are not deterministic.
    Pass the D itself or its DDP wrapper; layer names are those of the unwrapped module.

    ``solve_on``: where the SVDs run (None: on the weights' device). On a GPU the solver's launches and checks may
    cost more than the arithmetic of the 32 px models' small matrices, which the development CPU solves in 1 to 6 ms
    per call (the GPU benchmark's section (d) times both). The envelope stays on the weights' device either way.
    """

    def __init__(
        self,
        mode: str = "dynamic",
        interval: int = 5,
        include_linear: bool = False,
        rebase_on_resume: bool = False,
        solve_on: str | torch.device | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"SR mode must be one of {MODES}, got {mode!r}")
        if interval < 1:
            raise ValueError(f"SR interval must be a positive number of iterations, got {interval}")
        self.mode = mode
        self.interval = interval
        self.kinds = ("conv", "linear", "embedding") if include_linear else ("conv",)
        self.rebase_on_resume = rebase_on_resume
        self.solve_on = None if solve_on is None else torch.device(solve_on)
        self.ratios: dict[str, torch.Tensor] = {}  # dynamic envelope R per layer, float64, on the weights' device

    @property
    def recorded(self) -> bool:
        """Whether a dynamic envelope exists, i.e. whether the next acting call edits weights."""
        return bool(self.ratios)

    @torch.no_grad()
    def __call__(self, dis: nn.Module, iteration: int) -> bool:
        """Apply SR if `iteration` is due; True when it ran (the dynamic recording-only call included)."""
        if iteration % self.interval != 0:
            return False
        layers = spectral_norm_layers(dis, self.kinds)
        matrices = {name: weight_matrix(layer).to(self.solve_on or raw_weight(layer).device)
                    for name, layer in layers.items()}
        home = {name: raw_weight(layer).device for name, layer in layers.items()}
        edited = self._dynamic(matrices, home) if self.mode == "dynamic" else self._stateless(matrices)
        for name, matrix in edited.items():
            write_weight_matrix(layers[name], matrix)  # copied back to the weight's device
        if _distributed():
            self._broadcast_from_rank0(layers, edited)
        return True

    def _dynamic(self, matrices: dict[str, torch.Tensor], home: dict[str, torch.device]) -> dict[str, torch.Tensor]:
        # Layers without an envelope (fresh start, rebase, or newly included) only record this time.
        fresh = {name: matrix for name, matrix in matrices.items() if name not in self.ratios}
        for names, stack in stack_by_shape(fresh, SOLVE_DTYPE):
            self._keep(names, normalized_spectrum(stack), home)
        known = {name: matrix for name, matrix in matrices.items() if name not in fresh}
        edited = {}
        for names, stack in stack_by_shape(known, SOLVE_DTYPE):
            envelope = torch.stack([self._envelope(name, stack) for name in names])
            rebuilt, envelope = dynamic_compensation(stack, envelope)
            self._keep(names, envelope, home)
            edited.update(zip(names, rebuilt))
        return edited

    def _keep(self, names: list[str], envelopes: torch.Tensor, home: dict[str, torch.device]) -> None:
        self.ratios.update((name, envelope.to(home[name])) for name, envelope in zip(names, envelopes))

    def _envelope(self, name: str, stack: torch.Tensor) -> torch.Tensor:
        envelope = self.ratios[name]
        _check_rank(name, envelope, min(stack.shape[-2:]))
        return envelope.to(device=stack.device, dtype=stack.dtype)

    def check_envelopes(self, dis: nn.Module) -> None:
        """ValueError when a restored envelope does not fit its layer of ``dis`` (another model's SR state): at the
        resume, not at the first SR call."""
        layers = spectral_norm_layers(dis, self.kinds)
        for name, envelope in self.ratios.items():
            if name in layers:
                _check_rank(name, envelope, min(weight_matrix(layers[name]).shape))

    def _stateless(self, matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Static SR or the rescale control: each call acts on its own, with no envelope."""
        compensation = static_compensation if self.mode == "static" else rescale_compensation
        edited = {}
        for names, stack in stack_by_shape(matrices, SOLVE_DTYPE):
            edited.update(zip(names, compensation(stack)))
        return edited

    def _broadcast_from_rank0(self, layers: dict[str, nn.Module], edited: dict[str, torch.Tensor]) -> None:
        tensors = [raw_weight(layers[name]).detach() for name in edited]
        tensors += [self.ratios[name] for name in layers if name in self.ratios]
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "interval": self.interval,
            "ratios": {name: ratios.detach().cpu().clone() for name, ratios in self.ratios.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the envelope; mode and interval come from the constructor (the config wins).

        With rebase_on_resume the envelope is dropped, as the original (which never saved it) did:
        the first call after a resume records again.
        """
        if "ratios" not in state:
            raise ValueError(f"SR state has no 'ratios' entry (keys: {sorted(state)}); it is not a SpectralRegularizer state")
        if self.rebase_on_resume:
            self.ratios = {}
        else:
            self.ratios = {name: torch.as_tensor(r, dtype=SOLVE_DTYPE).clone() for name, r in state["ratios"].items()}


def _check_rank(name: str, envelope: torch.Tensor, rank: int) -> None:
    if envelope.shape != (rank,):
        raise ValueError(
            f"SR envelope of layer {name!r} has {envelope.numel()} values but the layer has {rank} singular "
            "values; the SR state belongs to another model (set rebase_on_resume to start a new envelope)"
        )
