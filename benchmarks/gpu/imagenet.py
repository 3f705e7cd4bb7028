"""Sections (a) and (b): the ImageNet-128 SRGANs recipe through the real Updater, and SR / spectra beside it.

(a) A setting's iteration at the full batch 2048 is too long to time several of (64 micro-batches at 32),
so two Updaters share one pair of models: one accumulates 1 micro-batch per iteration, one 2. Both run
full D+G iterations (optimizer steps included); the difference of their median times is the cost of one
more micro-batch, and the 2048 iteration is extrapolated as t(1) + (2048 / micro - 1) * (t(2) - t(1)).
The data are one synthetic micro-batch held on the device (loaders are timed elsewhere), so the times
are the models' and the Updater's alone. FLOPs are counted once per setting with FlopCounterMode on an
eager fp32 copy of one micro-batch iteration (G's forward for D, D's forward+backward, G's and D's
forward+backward for G) and scaled linearly to 2048 samples (the SN power steps, a few matrix-vector products
per optimizer step, are then over-counted, by far under 0.1 %): model FLOPs, the same for every setting.
"""
from __future__ import annotations

import gc
import itertools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_spectral import dynamic_edit_math
from benchmarks.gpu.common import (ROOT, median, peak_memory, pick_device, progress, reset_peak_memory, timed,
                                   utilisation)
from benchmarks.gpu.profiling import kernel_profile
from source.config import PerformanceConfig, first_line, load_config
from source.spectral.spectra import compute_spectra, spectral_norm_layers, weight_matrix
from source.spectral.sr import SOLVE_DTYPE
from source.training import build, performance
from source.training.distributed import World
from source.training.extension import read_losses
from updater import Updater

CONFIG = ROOT / "configs/sr_imagenet.yaml"
GLOBAL_BATCH = 2048
FAITHFUL = {"performance.amp": PerformanceConfig().amp, "performance.tf32": False, "performance.channels_last": False,
            "performance.compile": False}
FAST = {"performance.amp": "bf16", "performance.tf32": True, "performance.channels_last": True,
        "performance.compile": True, "performance.fused_adam": True}


def overrides(width: int | None, items: dict) -> list[str]:
    """``--set`` items on synthetic data; values as JSON, which YAML parses back unchanged (a bare off is false)."""
    items = {"dataset.name": "synthetic", "num_workers": 0, **items}
    if width:
        items["models.generator.args.ch"] = items["models.discriminator.args.ch"] = width
    return [f"{key}={json.dumps(value)}" for key, value in items.items()]


def recipe_overrides(params: dict, micro: int, accumulation: int, settings: dict) -> list[str]:
    items = {"batchsize": micro * accumulation, "micro_batchsize": micro,
             "bn_batchsize": min(params.get("bn_batchsize", micro), micro), **settings}
    return overrides(params.get("width"), items)


def recipe(params: dict, micro: int = 32, accumulation: int = 1, settings: dict = FAITHFUL):
    """configs/sr_imagenet.yaml at this micro-batch, accumulation and performance settings."""
    return load_config(CONFIG, recipe_overrides(params, micro, accumulation, settings))


def resident_batches(config, world: World):
    """One synthetic micro-batch, moved to the device once and repeated: no data loading in the timings."""
    real, labels = next(build.build_batches(config, world))
    return itertools.repeat((real.to(world.device), labels.to(world.device)))


def build_for(params: dict, micro: int, accumulation: int, settings: dict, world: World):
    config = recipe(params, micro, accumulation, settings)
    performance.configure_backends(config.performance, config.deterministic)
    models = build.build_models(config, world.device)
    return config, models, build.build_updater(config, world, models, resident_batches(config, world))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_flops(params: dict, world: World) -> dict:
    micro = params["flops_micro"]
    _, models, updater = build_for(params, micro, 1, FAITHFUL, world)
    with FlopCounterMode(display=False) as counter:
        updater.update()
    flops = counter.get_total_flops()
    del models, updater
    release_memory()
    return {"flops_counted_at_micro_batch": micro, "flops_per_micro_batch_iteration": flops,
            "flops_per_2048_iteration": flops * GLOBAL_BATCH / micro}


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def time_iterations(updater: Updater, count: int, device, tag: str) -> list[float]:
    times = []
    for _ in range(count):
        times.append(timed(updater.update, device))
        progress(tag, f"{times[-1]:.3f} s")
    return times


def extrapolate(one: float, two: float, micro: int) -> dict:
    per_micro = two - one
    seconds = one + (GLOBAL_BATCH // micro - 1) * per_micro
    return {"seconds_per_micro_batch_extrapolation_basis": per_micro,
            "seconds_fixed_per_iteration": one - per_micro,
            "seconds_per_2048_iteration_extrapolated": seconds,
            "images_per_s_extrapolated": GLOBAL_BATCH / seconds}


def time_setting(params: dict, micro: int, world: World, partial) -> None:
    """Warm up and time accumulation 1, then 2; record after each stage."""
    config, models, one = build_for(params, micro, 1, params["performance"], world)
    two_config = recipe(params, micro, 2, params["performance"])
    two = Updater(gen=one.gen, dis=one.dis, opt_gen=one.opt_gen, opt_dis=one.opt_dis, batches=one.batches,
                  config=two_config, world=world, regularizer=one.regularizer)
    partial.record(micro_batchsize=micro, bn_batchsize=config.bn_batch, accumulation_timed=[1, 2],
                   config_overrides=recipe_overrides(params, micro, 1, params["performance"]),
                   parameters={"gen": build.count_parameters(models.gen), "dis": build.count_parameters(models.dis)})
    reset_peak_memory(world.device)
    medians = {}
    for accumulation, updater in ((1, one), (2, two)):
        tag = f"a/{params['setting']} micro {micro} x{accumulation}"
        graphs = compiled_graphs()
        warmup = time_iterations(updater, params["warmup"], world.device, f"{tag} warm-up")
        graphs_after_warmup = compiled_graphs()
        times = time_iterations(updater, params["timed"], world.device, tag)
        medians[accumulation] = median(times)
        partial.record(**{f"accumulation_{accumulation}": {
            "warmup_s": warmup, "timed_s": times, "median_s": medians[accumulation],
            "graphs_compiled_in_warmup": graphs_after_warmup - graphs,
            "graphs_compiled_while_timing": compiled_graphs() - graphs_after_warmup}}, **peak_memory(world.device))
        if accumulation == 1:  # for a budget that ends before accumulation 2; it counts fixed costs 2048/micro times
            partial.record(seconds_per_2048_iteration_upper_bound_extrapolated=GLOBAL_BATCH // micro * medians[1])
    partial.record(images_per_s_measured_at_accumulation_2=2 * micro / medians[2],
                   **extrapolate(medians[1], medians[2], micro))
    partial.record(kernel_profile=kernel_profile(two.update, read_losses, world.device, iterations=2))


def run_setting(params: dict, partial) -> None:
    """Child of section (a): one setting; on out-of-memory the next smaller micro-batch is tried."""
    device = pick_device()
    world = World(rank=0, local_rank=0, size=1, device=device)
    partial.record(setting=params["setting"], performance=params["performance"], warmup_iterations=params["warmup"],
                   timed_iterations=params["timed"], notes=params.get("notes", []))
    flops = count_flops(params, world)
    partial.record(**flops)
    failures = []
    for micro in params["micro_batches"]:
        try:
            time_setting(params, micro, world, partial)
            break
        except torch.OutOfMemoryError as error:
            failures.append(f"micro_batchsize {micro}: {first_line(error)}")
        partial.record(out_of_memory=failures)
        release_memory()
        torch._dynamo.reset()  # the next size would otherwise be compiled with dynamic shapes
    else:
        raise RuntimeError(f"out of memory at every micro-batch size tried: {failures}")
    seconds = partial.data["seconds_per_2048_iteration_extrapolated"]
    partial.record(mfu=utilisation(flops["flops_per_2048_iteration"], seconds, device, params["precision"]))


def run_spectral(params: dict, partial) -> None:
    """Child of section (b): one dynamic SR call editing D's convs, one spectra snapshot of G and D."""
    device = pick_device()
    config = recipe(params)
    models = build.build_models(config, device)
    sr = build.build_regularizer(config)
    repeats = params["repeats"]
    record_s = timed(lambda: sr(models.dis, 0), device)  # the first dynamic call only records the envelope
    edits = [timed(lambda: sr(models.dis, sr.interval * (index + 1)), device) for index in range(repeats)]
    partial.record(sr_mode=sr.mode, sr_interval=sr.interval, convs=len(spectral_norm_layers(models.dis, sr.kinds)),
                   sr_record_call_s=record_s, sr_edit_calls_s=edits, sr_dynamic_edit_s=median(edits))
    # the edit's arithmetic alone by each solver (the SR call above uses sr.Factors' default, the Gram matrix's eigh)
    matrices = {name: weight_matrix(layer).detach() for name, layer in spectral_norm_layers(models.dis, sr.kinds).items()}
    solvers = {solver: median([timed(lambda: dynamic_edit_math(matrices, SOLVE_DTYPE, solver), device)
                               for _ in range(repeats)]) for solver in ("gram", "svd")}
    partial.record(sr_edit_math_s=solvers)
    snapshot = lambda: (compute_spectra(models.gen), compute_spectra(models.dis))  # noqa: E731
    spectra = [timed(snapshot, device) for _ in range(repeats + 1)][1:]  # the first one warms up the solvers
    layers = {"gen": len(spectral_norm_layers(models.gen)), "dis": len(spectral_norm_layers(models.dis))}
    partial.record(spectra_layers=layers, spectra_snapshot_calls_s=spectra, spectra_snapshot_s=median(spectra),
                   repeats=repeats)
