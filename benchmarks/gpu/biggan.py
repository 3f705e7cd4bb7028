"""Section (e): one training iteration of the CIFAR-10-LT BigGAN with every gSR term (configs/gsr/cifar10_lt_biggan.yaml:
batch 64, n_dis 5, LeCam, DiffAugment, gSR, EMA), through the real Updater on one synthetic batch held on the
device, at the faithful fp32 setting, with bf16 autocast + TF32 (no compile), and with step graphs (the faithful
arithmetic, each D and G step one CUDA graph; its warm-up losses beside the faithful ones show that it agrees). Medians
after warm-up iterations,
then one iteration of each under torch.profiler (``kernel_profile``: the H200 run took 0.24 s per iteration at
both precisions, which suggests the host, not the arithmetic, sets the pace).
"""
from __future__ import annotations

from benchmarks.gpu.common import ROOT, median, peak_memory, pick_device, progress, reset_peak_memory, timed
from benchmarks.gpu.imagenet import FAITHFUL, overrides, release_memory, resident_batches
from benchmarks.gpu.profiling import kernel_profile
from source.config import load_config
from source.training import build, performance
from source.training.distributed import World
from source.training.extension import read_losses

CONFIG = ROOT / "configs/gsr/cifar10_lt_biggan.yaml"
SETTINGS = {"faithful": FAITHFUL, "bf16": dict(FAITHFUL, **{"performance.amp": "bf16", "performance.tf32": True}),
            # the faithful arithmetic with each D and G step one CUDA graph (G's is captured at its 4th call)
            "step-graphs": dict(FAITHFUL, **{"performance.step_graphs": True, "performance.fused_adam": True})}
GRAPH_WARMUP = 5  # iterations: D's step is captured in the first, G's in the fourth


def run(params: dict, partial) -> None:
    device = pick_device()
    world = World(rank=0, local_rank=0, size=1, device=device)
    for name, setting in SETTINGS.items():
        time_setting(name, setting, params, world, partial)
        release_memory()  # the last setting's models are gone: the next peak is its own


def time_setting(name: str, setting: dict, params: dict, world: World, partial) -> None:
    device = world.device
    items = {"dataset.args.count": 1280, "batchsize": params["batch"], "micro_batchsize": params["batch"], **setting}
    config = load_config(CONFIG, overrides(params["width"], items))
    performance.configure_backends(config.performance, config.deterministic)
    models = build.build_models(config, device)
    updater = build.build_updater(config, world, models, build.build_batches(config, world))  # gSR's class counts
    updater.batches = resident_batches(config, world)
    reset_peak_memory(device)
    warmup_iterations = max(params["warmup"], GRAPH_WARMUP) if setting.get("performance.step_graphs") else params["warmup"]
    losses, warmup = [], []
    for _ in range(warmup_iterations):  # the same seed and data in every setting: the losses compare
        warmup.append(timed(lambda: losses.append(updater.update()), device))
    times = [timed(updater.update, device) for _ in range(params["timed"])]
    progress("e", f"{name}: {median(times):.3f} s per iteration")
    record = {"iteration_s": median(times), "iterations_s": times, "warmup_s": warmup,
              "warmup_losses": read_losses(losses), "config_overrides": overrides(params["width"], items),
              **peak_memory(device)}
    partial.record(**{name: record})  # before the profile: a budget that ends there keeps the times
    partial.record(**{name: dict(record, kernel_profile=kernel_profile(updater.update, read_losses, device, 1))})
