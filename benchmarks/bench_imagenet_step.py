"""Seconds per training iteration of the ImageNet-128 SRGANs models, and SR / spectra cost against it.

    python -m benchmarks.bench_imagenet_step [--micro-batch 32] [--iterations 3] [--out benchmarks/results/imagenet_step_cpu.json]

Builds configs/sr_imagenet.yaml (G with SN, 42.0M parameters; D 30.0M) on synthetic data with one
micro-batch per iteration, times full D+G iterations (after one warm-up), then one dynamic SR call
that edits (after the recording call) and one spectra snapshot of D and G. The full recipe's
iteration is 2048 / micro-batch accumulation steps, so its time is extrapolated linearly.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.results_io import save_result
from source.config import load_config
from source.provenance import device_name
from source.spectral.spectra import compute_spectra
from source.training import build
from source.training.distributed import World
from source.training.extension import read_losses

ROOT = Path(__file__).resolve().parents[1]


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/imagenet_step_cpu.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = ["dataset.name=synthetic", f"batchsize={args.micro_batch}", f"micro_batchsize={args.micro_batch}",
                 "num_workers=0"]
    config = load_config(ROOT / "configs/sr_imagenet.yaml", overrides)
    world = World(rank=0, local_rank=0, size=1, device=device)
    models = build.build_models(config, device)
    updater = build.build_updater(config, world, models, build.build_batches(config, world))
    updater.update()  # warm-up
    step = min(seconds(lambda: read_losses([updater.update()])) for _ in range(args.iterations))  # reading waits
    sr = updater.regularizer
    sr(models.dis, 0)  # the first dynamic call only records the envelope
    sr_edit = seconds(lambda: sr(models.dis, 0))
    spectra = seconds(lambda: (compute_spectra(models.gen), compute_spectra(models.dis)))
    accumulation = 2048 // args.micro_batch
    result = {
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "micro_batch": args.micro_batch,
        "seconds_per_micro_batch_iteration": step,
        "seconds_per_2048_iteration_extrapolated": step * accumulation,
        "sr_dynamic_edit_seconds": sr_edit,
        "spectra_snapshot_seconds": spectra,
        "sr_per_2048_iteration_fraction": sr_edit / (step * accumulation),
        "sr_every_5_iterations_fraction": sr_edit / (5 * step * accumulation),
        "spectra_per_2048_iteration_fraction": spectra / (step * accumulation),
    }
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
