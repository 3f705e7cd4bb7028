"""Singular-value spectra of spectrally normalized weights: the data behind the SRGANs fig3/fig4.

Also home of the layer discovery that SR shares: which modules carry a spectrally normalized weight,
in the original's `sorted(namedlinks())` order, and how their raw weight is seen as a matrix.

A snapshot is one file per iteration, `RUN/spectra/spectra_iter_{N:08d}.npz`, with the keys
    "iteration"                   int
    "{net}/conv_index"            conv layer names in index order (srgan.md §6.4 for the ImageNet D)
    "{net}/{layer}/s"             all singular values of the raw weight, descending (float64)
    "{net}/{layer}/sigma_hat"     SN's current estimate u^T W v of the top singular value
    "{net}/{layer}/kind"          "conv", "linear" or "embedding"
where net is "gen" or "dis" and layer a module name such as "block6.c2".
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from source.files import open_npz
from source.typed import first_line

SPECTRA_DIR = "spectra"
NETS = ("gen", "dis")
_FILE_NAME = re.compile(r"^spectra_iter_(\d+)\.npz$")


# ---------------------------------------------------------------------------------------------
# Layer discovery


def layer_kind(module: nn.Module) -> str:
    """"conv", "linear", "embedding" (the three SN link types of the original) or the class name."""
    for kind, cls in (("conv", nn.Conv2d), ("linear", nn.Linear), ("embedding", nn.Embedding)):
        if isinstance(module, cls):
            return kind
    return type(module).__name__.lower()


def spectral_norm_of(module: nn.Module) -> _SpectralNorm | None:
    """The SN parametrization of `module.weight`, or None when the weight is not spectrally normalized."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, _SpectralNorm)), None)


def spectral_norm_layers(module: nn.Module, kinds: Collection[str] | None = None) -> dict[str, nn.Module]:
    """SN layers (optionally only those of the given kinds) by module name, in sorted-name order.

    A DDP wrapper is looked through so that names (and SR state keyed by them) do not depend on
    whether the model happened to be wrapped.
    """
    if isinstance(module, DistributedDataParallel):
        module = module.module
    layers = {
        name: layer
        for name, layer in module.named_modules()
        if spectral_norm_of(layer) is not None and (kinds is None or layer_kind(layer) in kinds)
    }
    return dict(sorted(layers.items()))


def layer_index_map(module: nn.Module) -> dict[str, int]:
    """Sorted SN conv names -> index; for the ImageNet D this is srgan.md §6.4's 0..16."""
    return {name: index for index, name in enumerate(spectral_norm_layers(module, kinds=("conv",)))}


def raw_weight(layer: nn.Module) -> nn.Parameter:
    """The trained parameter behind SN (`parametrizations.weight.original`), not the normalized weight."""
    return layer.parametrizations.weight.original


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The raw weight as SN sees it: SN's dim first, the rest flattened ((C_out, C_in*kh*kw) for a conv)."""
    return raw_weight(layer).movedim(spectral_norm_of(layer).dim, 0).flatten(1)


def write_weight_matrix(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Copy `matrix` into the raw parameter in place, so optimizer state keyed by it stays valid."""
    target = raw_weight(layer).detach().movedim(spectral_norm_of(layer).dim, 0)
    target.copy_(matrix.reshape(target.shape))


def stack_by_shape(matrices: dict[str, torch.Tensor], dtype: torch.dtype) -> list[tuple[list[str], torch.Tensor]]:
    """Group equal-shape matrices into one (B, m, n) batch each, so one batched LAPACK/cuSOLVER call covers them."""
    groups: dict[tuple, list[str]] = {}
    for name, matrix in matrices.items():
        groups.setdefault((tuple(matrix.shape), matrix.device), []).append(name)
    return [(names, torch.stack([matrices[name].to(dtype) for name in names])) for names in groups.values()]


# ---------------------------------------------------------------------------------------------
# Spectra


@dataclass(frozen=True)
class LayerSpectrum:
    kind: str
    singular_values: np.ndarray  # of the raw weight matrix, descending
    sigma_hat: float  # SN's power-iteration estimate of singular_values[0]

    @property
    def normalized(self) -> np.ndarray:
        """s_i / s_1: scale-free, so it does not matter that SN divides by sigma_hat rather than s_1."""
        return self.singular_values / self.singular_values[0]


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, of a batch (..., m, n) via the eigenvalues of the smaller Gram matrix.

    Squaring W costs absolute accuracy only at the level sqrt(eps) * s_1 (about 1e-8 * s_1 in float64),
    far below anything a spectrum plot or the collapse score resolves, and it is cheaper than an
    SVD: 1.2 s against 2.5 s for the ImageNet D's 17 convs on one CPU core (benchmarks/bench_spectral.py).
    """
    m, n = matrices.shape[-2:]
    gram = matrices @ matrices.mT if m <= n else matrices.mT @ matrices
    return from_gram_eigenvalues(torch.linalg.eigvalsh(gram).flip(-1))


def from_gram_eigenvalues(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Singular values from the Gram matrix's eigenvalues (descending). eigh finds each to about eps times the
    largest, so one below m eps times the largest (a negative one too) is the rounding of a direction W does not have
    (a dead filter, a filter repeating another, an all-zero W): 0, which SR's edits then keep at 0 instead of
    raising that rounding along a direction made of noise. The floor (~1e-7 s_1) is below what a float32-stored W
    resolves. It is float64's whatever the dtype: every caller solves in float64, and a float32 floor (~1e-2 s_1 at
    m = 1024) would erase the small singular values a collapse plot shows."""
    floor = eigenvalues[..., :1] * (eigenvalues.shape[-1] * torch.finfo(torch.float64).eps)
    return torch.where(eigenvalues > floor, eigenvalues, 0).sqrt()


def _sigma_hat(layer: nn.Module) -> torch.Tensor:
    # The value SN divides by in its next eval-mode forward: u^T W v from the stored vectors, no power step.
    sn = spectral_norm_of(layer)
    matrix = weight_matrix(layer).double()
    return torch.vdot(sn._u.double(), matrix @ sn._v.double())


@torch.no_grad()
def compute_spectra(module: nn.Module) -> dict[str, LayerSpectrum]:
    """Full spectrum and SN estimate of every spectrally normalized weight of `module` (u, v are not updated)."""
    layers = spectral_norm_layers(module)
    values: dict[str, np.ndarray] = {}
    for names, stack in stack_by_shape({name: weight_matrix(layer) for name, layer in layers.items()}, torch.float64):
        values.update(zip(names, singular_values(stack).cpu().numpy()))
    return {
        name: LayerSpectrum(layer_kind(layer), values[name], float(_sigma_hat(layer)))
        for name, layer in layers.items()
    }


def conv_index(spectra: dict[str, LayerSpectrum]) -> list[str]:
    """Conv layer names in index order; the same order as `layer_index_map` of the module they came from."""
    return sorted(name for name, spectrum in spectra.items() if spectrum.kind == "conv")


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class SpectraRecord:
    iteration: int
    nets: dict[str, dict[str, LayerSpectrum]]  # "gen" / "dis" -> layer name -> spectrum
    conv_index: dict[str, list[str]]  # "gen" / "dis" -> conv names by index


def spectra_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / SPECTRA_DIR / f"spectra_iter_{iteration:08d}.npz"


def save_spectra(
    run_dir: str | Path,
    iteration: int,
    spectra_gen: dict[str, LayerSpectrum],
    spectra_dis: dict[str, LayerSpectrum],
) -> Path:
    """Write both networks' spectra for one iteration; atomic, so a plot reading the folder never sees half a file."""
    arrays: dict[str, np.ndarray] = {"iteration": np.int64(iteration)}
    for net, spectra in zip(NETS, (spectra_gen, spectra_dis)):
        arrays[f"{net}/conv_index"] = np.array(conv_index(spectra), dtype=str)
        for name, spectrum in spectra.items():
            arrays[f"{net}/{name}/s"] = np.asarray(spectrum.singular_values, dtype=np.float64)
            arrays[f"{net}/{name}/sigma_hat"] = np.float64(spectrum.sigma_hat)
            arrays[f"{net}/{name}/kind"] = np.array(spectrum.kind)
    path = spectra_path(run_dir, iteration)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.savez(file, **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    return path


def load_spectra(path: str | Path) -> SpectraRecord:
    """A spectra file; a ValueError (or KeyError) for one whose entries are not what ``save_spectra`` writes."""
    with open_npz(path) as data:
        fields = {key: data[key] for key in data.files}
    try:
        return _spectra_record(fields)
    except TypeError as error:  # e.g. a sigma_hat of two values, a conv index that is no list
        raise ValueError(f"an entry of the wrong shape or type ({first_line(error)})") from None


def _spectra_record(fields: dict[str, np.ndarray]) -> SpectraRecord:
    nets: dict[str, dict[str, LayerSpectrum]] = {net: {} for net in NETS}
    for key in fields:
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "s":
            net, name = parts[0], parts[1]
            nets[net][name] = LayerSpectrum(
                kind=str(fields[f"{net}/{name}/kind"]),
                singular_values=fields[key],
                sigma_hat=float(fields[f"{net}/{name}/sigma_hat"]),
            )
    return SpectraRecord(
        iteration=int(fields["iteration"]),
        nets=nets,
        conv_index={net: [str(name) for name in fields[f"{net}/conv_index"]] for net in NETS},
    )


def list_spectra(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(iteration, path)] of the run's spectra files, sorted by iteration; empty when there are none."""
    folder = Path(run_dir) / SPECTRA_DIR
    if not folder.is_dir():
        return []
    found = ((_FILE_NAME.match(path.name), path) for path in folder.iterdir())
    return sorted((int(match.group(1)), path) for match, path in found if match and path.is_file())  # no FIFO
