"""Cost of SR and of a spectra snapshot on the ImageNet-128 D's 17 conv shapes (srgan.md §6.4).

    python -m benchmarks.bench_spectral [--repeats 3] [--threads 1] [--device cpu] [--out benchmarks/results/spectral_cpu.json]

Random SN convs of the real shapes stand in for the model: the cost of an SVD depends on the shape,
not on the values. The "math_" entries time the bare computations, including the alternatives the
code decided against (a float32 SR edit, an SVD-based edit or spectrum), so the choices can be rechecked on
new hardware. Prints and writes seconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from source.provenance import cpu_model
from source.spectral.spectra import (
    compute_spectra,
    singular_values,
    spectral_norm_layers,
    stack_by_shape,
    weight_matrix,
)
from source.spectral.sr import SpectralRegularizer, dynamic_compensation, thin_svd

# (block, conv, C_in, C_out, kernel) of SNResNetProjectionDiscriminator(ch=64): reshaped W is C_out x C_in*k*k
IMAGENET_D_CONVS = [
    (1, "c1", 3, 64, 3), (1, "c2", 64, 64, 3), (1, "c_sc", 3, 64, 1),
    (2, "c1", 64, 64, 3), (2, "c2", 64, 128, 3), (2, "c_sc", 64, 128, 1),
    (3, "c1", 128, 128, 3), (3, "c2", 128, 256, 3), (3, "c_sc", 128, 256, 1),
    (4, "c1", 256, 256, 3), (4, "c2", 256, 512, 3), (4, "c_sc", 256, 512, 1),
    (5, "c1", 512, 512, 3), (5, "c2", 512, 1024, 3), (5, "c_sc", 512, 1024, 1),
    (6, "c1", 1024, 1024, 3), (6, "c2", 1024, 1024, 3),
]


def imagenet_d_convs(device: torch.device) -> nn.Module:
    dis = nn.Module()
    for block, conv, c_in, c_out, kernel in IMAGENET_D_CONVS:
        if not hasattr(dis, f"block{block}"):
            dis.add_module(f"block{block}", nn.Module())
        getattr(dis, f"block{block}").add_module(conv, spectral_norm(nn.Conv2d(c_in, c_out, kernel)))
    return dis.to(device)


def dynamic_edit_math(matrices: dict[str, torch.Tensor], dtype: torch.dtype, solver: str) -> None:
    """The arithmetic of one dynamic SR edit of ``matrices``, by ``solver`` (sr.Factors): the envelope is zero, so
    the edit rebuilds each W as it is, at the cost of any other edit."""
    for _, stack in stack_by_shape(matrices, dtype):
        dynamic_compensation(stack, stack.new_zeros(stack.shape[0], min(stack.shape[-2:])), solver)


def seconds(action, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(device: torch.device, repeats: int) -> dict[str, list[float]]:
    dis = imagenet_d_convs(device)
    # copies: the SR calls below edit the weights in place, the bare computations time the initial ones
    matrices = {name: weight_matrix(layer).detach().clone() for name, layer in spectral_norm_layers(dis).items()}

    def spectra_math(spectrum) -> None:
        for _, stack in stack_by_shape(matrices, torch.float64):
            spectrum(stack).cpu()

    recorded = SpectralRegularizer("dynamic", interval=1)
    recorded(dis, 0)
    actions = {
        "sr_dynamic_record_call": lambda: SpectralRegularizer("dynamic", interval=1)(dis, 0),
        "sr_dynamic_edit_call": lambda: recorded(dis, 1),
        "sr_static_call": lambda: SpectralRegularizer("static", interval=1)(dis, 0),
        "compute_spectra": lambda: compute_spectra(dis),
        # the same computations without module handling, to compare the alternatives like for like
        "math_dynamic_edit_float64": lambda: dynamic_edit_math(matrices, torch.float64, "gram"),
        "math_dynamic_edit_float64_svd": lambda: dynamic_edit_math(matrices, torch.float64, "svd"),
        "math_dynamic_edit_float32": lambda: dynamic_edit_math(matrices, torch.float32, "gram"),
        "math_thin_svd_float64": lambda: spectra_math(lambda stack: thin_svd(stack)[1]),
        "math_svd_float64_without_transposing_wide": lambda: spectra_math(
            lambda stack: torch.linalg.svd(stack, full_matrices=False)[1]
        ),
        "math_spectra_gram_eigvalsh_float64": lambda: spectra_math(singular_values),
        "math_spectra_svdvals_float64": lambda: spectra_math(  # on the tall orientation, as thin_svd
            lambda stack: torch.linalg.svdvals(stack if stack.shape[-2] >= stack.shape[-1] else stack.mT)),
    }
    return {name: seconds(action, device, repeats) for name, action in actions.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 gives stable numbers on a shared machine (MKL's threads spin)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/spectral_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = measure(device, args.repeats)
    for name, times in results.items():
        print(f"{name:42s} best {min(times):8.3f} s   all {[round(t, 3) for t in times]}")
    report = {
        "what": "seconds per call on the 17 ImageNet-128 D conv shapes (srgan.md §6.4), best of repeats",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "best_s": {name: min(times) for name, times in results.items()},
        "all_s": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
