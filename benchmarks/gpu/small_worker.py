"""Section (d)'s worker process: one training run of the 32 px models, or several taking turns in one process on
CUDA streams of their own; what benchmarks/gpu/small.py (the section, in the parent process) starts, N at a time.

Each worker: warm-up iterations (compilation and capture happen there; the correctness check), a file barrier so
that concurrent workers time the same window, then as many iterations as fit in the window.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

from benchmarks.gpu.common import ROOT, median, peak_memory, pick_device, synchronize, timed
from benchmarks.gpu.profiling import kernel_profile
from benchmarks.gpu.imagenet import FAITHFUL, FAST, overrides, resident_batches
from source.config import load_config
from source.spectral.sr import MODES, SpectralRegularizer
from source.training import build, performance
from source.training.distributed import World
from source.training.extension import read_losses

CONFIG = ROOT / "configs/collapse/fmnist_cifar_recipe_ch32.yaml"
GRAPHS = {"performance.compile": True, "performance.compile_mode": "reduce-overhead", "performance.fused_adam": True}
STEP_GRAPHS = {"performance.step_graphs": True, "performance.fused_adam": True}
VARIANTS = {  # measured in this order (small.run), the study's uncompiled fp32 candidates first
    "eager": FAITHFUL,
    "eager-fused-adam": dict(FAITHFUL, **{"performance.fused_adam": True}),  # the agreement's yardstick (small.py)
    "step-graphs": dict(FAITHFUL, **STEP_GRAPHS),
    # the same step graphs with TF32 tensor cores, or with FAST's arithmetic uncompiled: not the faithful fp32
    "tf32-step-graphs": dict(FAITHFUL, **STEP_GRAPHS, **{"performance.tf32": True}),
    "bf16-step-graphs": dict(FAST, **STEP_GRAPHS, **{"performance.compile": False}),
    "compiled-step-graphs": dict(FAITHFUL, **STEP_GRAPHS, **{"performance.compile": True}),  # fewer, fused kernels
    "fast-step-graphs": dict(FAST, **STEP_GRAPHS),  # FAST's arithmetic in fewer, fused kernels, each step one graph
    "fp32-graphs": dict(FAITHFUL, **GRAPHS),
    "fast": FAST,
    "fast-reduce-overhead": dict(FAST, **GRAPHS),
}
FP32 = ("eager", "eager-fused-adam", "step-graphs", "compiled-step-graphs", "fp32-graphs")  # the study's candidates
# minutes of compiling on a cold cache
COMPILED = ("compiled-step-graphs", "fast-step-graphs", "fp32-graphs", "fast", "fast-reduce-overhead")
# measured last, after the loader's data path: reduce-overhead compiles longest (the H200's section budget ended
# during fp32-graphs' compile), and compile without graphs leaves the launches that make these models slow
LAST = ("fp32-graphs", "fast", "fast-reduce-overhead")

# a few seconds each on a GPU (the profiler starting up)
PROFILED = ("eager", "step-graphs", "fp32-graphs", "tf32-step-graphs", "fast-step-graphs")


def cudagraph_skips() -> int:
    """Graphs that compile's cudagraphs skipped; dynamo unimported (a second of every eager worker's start): none."""
    utils = sys.modules.get("torch._dynamo.utils")
    return utils.counters["inductor"]["cudagraph_skips"] if utils else 0


def g_iteration_flops(params: dict) -> float:
    """Model FLOPs of one G-iteration of the eager run at the section's sizes: torch's FlopCounterMode on the CPU
    (the count does not depend on the device); the arithmetic a variant's rate is measured against."""
    from torch.utils.flop_counter import FlopCounterMode

    config = load_config(CONFIG, small_overrides(dict(params, variant="eager")))
    run = SmallRun(config, World(rank=0, local_rank=0, size=1, device=torch.device("cpu")), params, None)
    with FlopCounterMode(display=False) as counter:
        run.update()
    return float(counter.get_total_flops())


def small_overrides(params: dict) -> list[str]:
    """The variant's settings; with ``data_root``, the study's own data path on the Fashion-MNIST files there."""
    items = {"batchsize": params["batch"], "micro_batchsize": params["batch"], "gen_batchsize": 2 * params["batch"],
             "updater.n_dis": params["n_dis"], **VARIANTS[params["variant"]],
             "performance.data_on_device": False}  # resident_batches hold one synthetic batch on the device
    if params.get("data_root"):
        items.update({"dataset.name": "fashion_mnist", "dataset.args": {"root": params["data_root"]},
                      "performance.data_on_device": params["data_on_device"]})
    return overrides(params["width"], items)


def wait_for_all(directory: Path, index: int, parties: int, deadline: float) -> float:
    """A file barrier: announce readiness, wait until every worker is ready (or the deadline); seconds waited."""
    (directory / f"ready-{index}").touch()
    start = time.time()
    while len(list(directory.glob("ready-*"))) < parties and time.time() < deadline:
        time.sleep(0.02)
    return time.time() - start


def window(runs: list, seconds: float, device, read_every: int) -> tuple[int, float]:
    """Iterations each run completed in a window of about ``seconds`` (the runs take turns, one iteration each), and
    the window's exact length. The losses are read every ``read_every`` iterations, as the trainer reads them at each
    log line (each read waits for that run's stream)."""
    synchronize(device)
    start, count, unread = time.perf_counter(), 0, [[] for _ in runs]
    while time.perf_counter() - start < seconds:
        for run, losses in zip(runs, unread):
            losses.append(run.update())
            if len(losses) == read_every:
                run.read(losses)
                losses.clear()
        count += 1
    synchronize(device)
    return count, time.perf_counter() - start


class SmallRun:
    """One training run of the small models in a worker; with ``stream``, on its own CUDA stream (a run that
    shares the worker's process with others, as ``train.py --group`` runs them)."""

    def __init__(self, config, world: World, params: dict, stream: torch.cuda.Stream | None):
        self.stream = stream
        with self.turn():
            self.models = build.build_models(config, world.device)
            batches = build.build_batches(config, world) if params.get("data_root") else resident_batches(config, world)
            self.updater = build.build_updater(config, world, self.models, batches)
            self.initial = {name: [p.detach().clone() for p in getattr(self.models, name).parameters()]
                            for name in ("gen", "dis")}

    def turn(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def update(self):
        with self.turn():
            return self.updater.update()

    def read(self, losses: list) -> list[dict]:
        with self.turn():  # waits for this run's stream, as the trainer's read at a log line does
            return read_losses(losses)


def worker(params: dict, partial) -> None:
    """Child: one training run of the small models, or ``runs_in_process`` runs taking turns, each on its own stream.

    Runs in one process have seeds of their own (the first the single run's), so that their models and data differ:
    their warm-up iterations overlap on the device, and the first run's losses, compared with the single run's,
    would show one run's kernels disturbing another's (runs with equal data would write equal values)."""
    device = pick_device()
    world = World(rank=0, local_rank=0, size=1, device=device)
    count = params.get("runs_in_process", 1)
    configs = [load_config(CONFIG, small_overrides(params) + ([f"seed={index}"] if index else []))
               for index in range(count)]
    performance.configure_backends(configs[0].performance, configs[0].deterministic)
    runs = [SmallRun(config, world, params, torch.cuda.Stream(device) if count > 1 and device.type == "cuda"
                     else None) for config in configs]
    warmup, rounds_s = [[] for _ in runs], []
    for _ in range(params["warmup"]):  # a round: each run one iteration, their kernels overlapping
        rounds_s.append(timed(lambda: [losses.append(run.update()) for run, losses in zip(runs, warmup)], device))
    partial.record(variant=params["variant"], config_overrides=small_overrides(params), runs_in_process=count,
                   seeds=[config.seed for config in configs],
                   warmup_s=rounds_s, warmup_losses=runs[0].read(warmup[0]),
                   warmup_travel={name: travel(getattr(runs[0].models, name), start)
                                  for name, start in runs[0].initial.items()},
                   cudagraph_skips=cudagraph_skips())
    waited = wait_for_all(Path(params["barrier"]), params["index"], params["parties"],
                          params["deadline"] - params["window_s"] - 5)
    iterations, seconds = window(runs, params["window_s"], device, configs[0].display_interval)
    partial.record(barrier_wait_s=waited, iterations=iterations, window_s=seconds,
                   g_iterations_per_s=iterations / seconds, g_iterations_per_s_total=count * iterations / seconds,
                   cudagraph_skips=cudagraph_skips(), **peak_memory(device))
    if params["variant"] in PROFILED and params["parties"] == 1 and count == 1 and not params.get("data_root"):
        partial.record(kernel_profile=kernel_profile(runs[0].update, runs[0].read, device))
        if params["variant"] == "eager":
            partial.record(sr_call_s=sr_call_seconds(runs[0].models.dis, device))


def sr_call_seconds(dis, device) -> dict:
    """Median seconds of one SR call on this D (after the timing window: its edits change nothing measured), per
    mode, on the device and on a copy on the CPU (float64 SVDs of small matrices; static SR and the rescale control
    run after each of an SR iteration's n_dis D steps, dynamic SR once): what the study's SR arms add per iteration."""
    copies = {"device": (dis, device), "cpu": (copy.deepcopy(dis).cpu(), torch.device("cpu"))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a study's process has about one core (runner.py: cores / processes)
    seconds = {"cpu_threads": 1}
    try:
        for where, (model, model_device) in copies.items():
            for mode in MODES:
                sr = SpectralRegularizer(mode=mode, interval=1)
                sr(model, 0)  # dynamic: records its envelope; every mode: warms the solver up
                seconds[f"{mode}_{where}"] = median([timed(lambda: sr(model, 1), model_device) for _ in range(5)])
    finally:
        torch.set_num_threads(threads)
    return seconds


def travel(model, initial: list) -> float:
    """How far the warm-up moved the weights (L2 over all): a step that silently did nothing shortens it."""
    return sum(float((p.detach() - start).double().pow(2).sum()) for p, start in zip(model.parameters(), initial)) ** 0.5
