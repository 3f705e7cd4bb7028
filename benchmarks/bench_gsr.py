"""gSR's cost per G step as a fraction of a training iteration (CIFAR-10-LT SNGAN and BigGAN, the ImageNet-128 G).

    python -m benchmarks.bench_gsr [--iterations 3] [--threads 2] [--models sngan,biggan] [--out ...gsr_cpu.json]

CIFAR-10-LT: configs/gsr/cifar10_lt_{sngan,biggan}.yaml (n_dis 5, batch 64, LeCam, DiffAugment; BigGAN also EMA)
on synthetic data; full iterations are timed with gSR on and off, side by side, and one gSR call (penalty + its
backward) alone. ImageNet-128: configs/sr_imagenet.yaml with gSR on (1000 classes, 10 conditional BNs); an iteration
at micro-batch 32 is timed and extrapolated to the recipe's batch 2048 (64 micro-batches), as
bench_imagenet_step does. Best of ``--iterations`` after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.results_io import save_result
from source.config import load_config
from source.training import build
from source.training.distributed import World

ROOT = Path(__file__).resolve().parents[1]


def best_seconds(action, repeats: int) -> float:
    action()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def build_updater(config_file: str, overrides: list[str]):
    config = load_config(ROOT / config_file, ["dataset.name=synthetic", "num_workers=0", *overrides])
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    models = build.build_models(config, world.device)
    return build.build_updater(config, world, models, build.build_batches(config, world))


def gsr_call(updater) -> None:
    updater.terms.gsr(updater.gen_module).backward()
    updater.opt_gen.zero_grad(set_to_none=True)


def cifar(repeats: int, model: str) -> dict:
    config = f"configs/gsr/cifar10_lt_{model}.yaml"
    on = build_updater(config, ["dataset.args.count=1280"])
    off = build_updater(config, ["dataset.args.count=1280", "updater.gsr.enabled=false"])
    iteration_on, iteration_off = best_seconds(on.update, repeats), best_seconds(off.update, repeats)
    call = best_seconds(lambda: gsr_call(on), repeats)
    return {"iteration_s_gsr_on": iteration_on, "iteration_s_gsr_off": iteration_off, "gsr_call_s": call,
            "gsr_call_fraction_of_iteration": call / iteration_off,
            "iteration_time_ratio_on_over_off": iteration_on / iteration_off}


def imagenet(repeats: int, micro_batch: int) -> dict:
    updater = build_updater("configs/sr_imagenet.yaml", [
        "updater.gsr.enabled=true", f"batchsize={micro_batch}", f"micro_batchsize={micro_batch}",
        "dataset.args.count=2000"])
    iteration = best_seconds(updater.update, max(1, repeats - 1))
    call = best_seconds(lambda: gsr_call(updater), repeats)
    accumulation = 2048 // micro_batch
    return {"micro_batch": micro_batch, "iteration_s_micro_batch": iteration,
            "iteration_s_2048_extrapolated": iteration * accumulation, "gsr_call_s": call,
            "gsr_call_fraction_of_2048_iteration": call / (iteration * accumulation)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--models", default="sngan,biggan", help="CIFAR-10-LT models to time (sngan, biggan)")
    parser.add_argument("--skip-imagenet", action="store_true", help="CIFAR only (the ImageNet G takes minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gsr_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"device": platform.processor() or "cpu", "torch_threads": torch.get_num_threads(),
              "load_average_1min": os.getloadavg()[0]}
    for model in args.models.split(","):
        result[f"cifar10_lt_{model}"] = cifar(args.iterations, model)
    if not args.skip_imagenet:
        result["imagenet128_sr"] = imagenet(args.iterations, args.micro_batch)
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
