"""Section (d): G-iterations/s of the 32 px models, alone and as N runs sharing one GPU.

The models and recipe are the collapse study's base run (configs/collapse/fmnist_cifar_recipe_ch32.yaml: the
SRGANs CIFAR recipe, unconditional ResNet G and SN D at 32 px, 1 channel, ch 32, D batch 64 and G batch 128 in
micro-batches of 64, so G accumulates 2, n_dis 5) on synthetic data held on the device; one G-iteration is one
``Updater.update()`` (5 D steps, 1 G step). Variants: ``eager`` (the faithful fp32 default), ``eager-fused-adam``
(its yardstick, below), ``step-graphs`` (the same fp32 arithmetic, each D and G step one CUDA graph:
``performance.step_graphs``, with fused Adam), ``compiled-step-graphs`` (the same, G and D compiled by inductor's
default mode: fewer, fused kernels in the graphs), ``fp32-graphs`` (the same arithmetic compiled with
``performance.compile_mode`` reduce-overhead: CUDA graphs of the forwards and backwards, and fused Adam; these fp32
variants are the collapse study's candidates, docs/collapse.md); not fp32: ``tf32-step-graphs`` (step graphs with
TF32 tensor cores), ``bf16-step-graphs`` (step graphs with bf16 autocast, channels_last and TF32),
``fast-step-graphs`` (those step graphs compiled: the candidate for the issue's 200 G-iterations/s), ``fast`` (bf16 +
channels_last + compile + tf32) and ``fast-reduce-overhead`` (``fast`` with CUDA graphs and fused Adam).

Each run is a worker process (``small_worker.py``), or shares one with others, each on its own CUDA stream
(``in_one_process``: how ``train.py --group`` runs a study's runs): warm-up iterations (compilation and capture
happen there), then a file barrier so that concurrent workers time the same window, then as many iterations as fit
in the window. The warm-up is also the correctness check. Every worker starts from the same models (same seed) and data and records each warm-up
iteration's losses and how far the warm-up moved G's and D's weights (a graph that silently did nothing would
shorten it). GAN training amplifies rounding: on an H200 two eager runs of one seed differed by 4e-3 at the sixth
warm-up iteration and 0.1 at the eighth (19 of 20 pairs). So the yardstick is ``eager-fused-adam``, eager's
arithmetic rounded otherwise (fused Adam): a variant agrees where, at every warm-up iteration, its difference to
eager is within ``SPREAD`` times the yardstick's or ``AGREEMENT`` (``agreement_limits``); so should concurrent runs
with their variant's single run (recorded, not enforced). reduce-overhead's graphs are recorded at a graph's
second call and replayed from its third; step graphs at a step's fourth call (D's in the first iteration, G's in
the fourth), so 8 warm-up iterations replay both. Each worker also records how often inductor skipped CUDA graphs
(then reduce-overhead is plain compile).

The faster of eager and step graphs that agrees runs once more on the study's own data path (``study_data_path``): Fashion-MNIST's
files (a random stand-in of the same size and format) held on the device, each batch indexed, dequantized and
converted there (``performance.data_on_device``, as the study's base config sets), so the rate the study can
expect, not only the models', is measured; and once more through the loader (``loader_data_path``: read, padded
and dequantized per sample in the training process, ``num_workers: 0``, about 1 ms per batch of 64 on one CPU core
here), the path that ``data_on_device`` replaces. The eager run also times one SR call per mode on its D, on the
device and on the CPU (``sr_call_s``; the CPU's is what ``performance.sr_on_cpu`` runs, less two small copies): the
cost the study's SR arms add. Eager, step graphs, TF32 step graphs, fast step graphs and fp32-graphs, alone, are
profiled after their window (``kernel_profile``: the device's busy time against the wall, launches, the heaviest
kernels): where the time the rate leaves goes.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.gpu.common import (MINIMUM_S, datasheet_peak, finish_child, pick_device, progress, read_result,
                                   remaining, run_child, start_child)
from benchmarks.gpu.small_worker import COMPILED, FP32, LAST, g_iteration_flops

RESERVE_S = 3.0  # a worker's deadline ends this much before the section's, so the section can still record
# largest difference to eager of a variant that agrees: warm-up losses (in units of max(|eager's|, 1)) and the
# distance its warm-up moved G's and D's weights (relative), or SPREAD times the yardstick's where that is more
AGREEMENT = 1e-2
SPREAD = 10.0
YARDSTICK = "eager-fused-adam"  # eager's arithmetic, rounded otherwise: how far rounding alone carries a run


def write_fashion_mnist_standin(folder: Path, count: int) -> Path:
    """Fashion-MNIST's training files (plain idx, as the loader reads them) holding ``count`` random images: the
    study's data path at its cost, on a machine without the data set."""
    if folder.exists():
        return folder
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", np.arange(count) % 10)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        (folder / name).write_bytes(header + array.astype(np.uint8).tobytes())
    return folder


def travel_differences(singles: dict) -> dict:
    """Per variant, the largest relative difference of G's and D's warm-up travel from eager's (null: not measured)."""
    eager = singles.get("eager", {}).get("warmup_travel")
    return {name: None if not (eager and run.get("warmup_travel")) else float(np.max(
        [abs(run["warmup_travel"][net] - eager[net]) / max(eager[net], 1e-12) for net in eager]))  # NaN wins
        for name, run in singles.items()}


def loss_differences(losses: list[dict] | None, reference: list[dict] | None) -> list[float] | None:
    """Per warm-up iteration, the largest difference of its losses from the reference run's, in units of
    max(|reference loss|, 1): a relative difference that a loss near 0 does not inflate (null: not measured)."""
    if not (losses and reference):
        return None
    return [float(np.max([abs(mine[key] - theirs[key]) / max(abs(theirs[key]), 1.0) for key in theirs]))  # NaN wins
            for mine, theirs in zip(losses, reference)]


def single(params: dict, variant: str, directory: Path, name: str | None = None, streams: int = 1) -> dict:
    budget = min(params["worker_cap_s"], remaining(params) - RESERVE_S)
    if budget < MINIMUM_S:
        return {"status": "skipped", "error": "the section's budget is spent", "g_iterations_per_s": None,
                "g_iterations_per_s_why": "not run"}
    name = name or variant
    progress("d", f"{name}: {streams} run(s) in one process")
    worker_params = dict(params, variant=variant, barrier=str(directory / f"barrier-{name}"), index=0, parties=1,
                         runs_in_process=streams)
    (directory / f"barrier-{name}").mkdir()
    result = run_child("d_worker", worker_params, directory / f"{name}.json", budget)
    progress("d", f"{name}: {result.get('g_iterations_per_s')} G-iterations/s ({result['status']})")
    return result


def in_one_process(params: dict, variant: str, streams: int, directory: Path, single_losses: list | None) -> dict:
    """``streams`` runs of ``variant`` in one worker process, taking turns, each on its own CUDA stream (as
    ``train.py --group`` runs a study's runs): on one GPU, the kernels of separate processes never run at the
    same time, those of one process's streams can. The first run's warm-up losses must equal the single run's
    (``warmup_losses_difference_to_single``; the others run other seeds beside it)."""
    result = single(params, variant, directory, name=f"{variant}-{streams}-streams", streams=streams)
    result["warmup_losses_difference_to_single"] = loss_differences(result.get("warmup_losses"), single_losses)
    progress("d", f"{streams} x {variant} in one process: {result.get('g_iterations_per_s_total')} in all")
    return result


def with_data(params: dict, variant: str, resident: dict, directory: Path, on_device: bool) -> dict:
    """``variant`` alone again, its batches made from Fashion-MNIST's files (per-sample dequantization noise) on the
    device as the study does, or through the loader in the training process, instead of one batch held on the
    device: the share of the rate that the data path costs."""
    root = write_fashion_mnist_standin(directory / "fashion-mnist", params["data_count"])
    result = single(dict(params, data_root=str(root), data_on_device=on_device), variant, directory,
                    name=f"{variant}-with-{'device' if on_device else 'loader'}-data")
    rate, resident_rate = result.get("g_iterations_per_s"), resident.get("g_iterations_per_s")
    return {"variant": variant, "images": params["data_count"], "data_on_device": on_device, **result,
            "rate_to_resident_data": rate / resident_rate if rate and resident_rate else None}


def concurrent(params: dict, variant: str, parties: int, directory: Path, single_losses: list[dict] | None) -> dict:
    """``parties`` workers started together; each reports its own rate over the common window."""
    deadline = min(time.time() + params["worker_cap_s"], params["deadline"] - RESERVE_S)
    if deadline - time.time() < MINIMUM_S:
        return {"runs": [], "g_iterations_per_s_total": None, "g_iterations_per_s_total_why": "section budget spent"}
    progress("d", f"{parties} concurrent {variant} runs")
    barrier = directory / f"barrier-{parties}"
    barrier.mkdir()
    common = dict(params, variant=variant, barrier=str(barrier), parties=parties, deadline=deadline)
    processes = [start_child("d_worker", dict(common, index=index), directory / f"{parties}-{index}.json")
                 for index in range(parties)]
    statuses = [finish_child(process, deadline) for process in processes]
    runs = [dict(read_result(directory / f"{parties}-{index}.json"), status=status)
            for index, status in enumerate(statuses)]
    rates = [run.get("g_iterations_per_s") for run in runs]
    complete = all(rate is not None for rate in rates)
    result = {"runs": runs, "g_iterations_per_s_each": rates,
              "g_iterations_per_s_total": sum(rates) if complete else None,
              # the same seed and data as the single run of this variant: equal to float tolerance (cuDNN's
              # autotuning may choose other kernels in another process)
              "warmup_losses_difference_to_single": [loss_differences(run.get("warmup_losses"), single_losses)
                                                     for run in runs]}
    if not complete:
        result["g_iterations_per_s_total_why"] = "a run did not finish its window (see runs)"
    progress("d", f"{parties} x {variant}: {rates}")
    return result


def fastest_agreeing(singles: dict, limits: dict) -> str:
    """The fastest variant whose warm-up losses and weights' travel agree with eager's (eager's always do)."""
    losses, travels = eager_differences(singles), travel_differences(singles)
    measured = {name: run["g_iterations_per_s"] for name, run in singles.items() if run.get("g_iterations_per_s")
                and within(losses.get(name), limits["losses"]) and within([travels.get(name)], [limits["travel"]])}
    if not measured:
        raise RuntimeError("no single run measured a rate that agrees with eager; nothing to run concurrently")
    return max(measured, key=measured.get)


def agreement_limits(singles: dict) -> dict:
    """Per warm-up iteration, the largest loss difference to eager that still agrees, and the travel's: ``AGREEMENT``,
    or ``SPREAD`` times the yardstick's difference where that is more (``AGREEMENT`` alone without a yardstick)."""
    count = len(singles.get("eager", {}).get("warmup_losses") or [])
    measured = eager_differences(singles).get(YARDSTICK)
    losses = measured or [0.0] * count
    travel = travel_differences(singles).get(YARDSTICK) or 0.0
    return {"losses": [max(AGREEMENT, SPREAD * d) for d in losses], "travel": max(AGREEMENT, SPREAD * travel),
            "yardstick": YARDSTICK if measured else None}


def agrees(section: dict, variant: str) -> bool | None:
    """Whether a variant's single run agreed with eager, by the section's recorded limits (None: not compared)."""
    losses = (section.get("warmup_losses_difference_to_eager") or {}).get(variant)
    travel = (section.get("warmup_travel_difference_to_eager") or {}).get(variant)
    if losses is None or travel is None:
        return None
    return within(losses, recorded_limits(section, len(losses))) and within([travel], [recorded_travel_limit(section)])


def agrees_with_single(section: dict, differences: list | None) -> bool:
    """Whether a concurrent run's warm-up losses agreed with its variant's single run, by the same limits."""
    return within(differences, recorded_limits(section, len(differences or [])))


def recorded_limits(section: dict, count: int) -> list:
    return (section.get("agreement_limits") or {}).get("losses") or [AGREEMENT] * count  # before the yardstick


def recorded_travel_limit(section: dict) -> float:
    return (section.get("agreement_limits") or {}).get("travel", AGREEMENT)


def eager_differences(singles: dict) -> dict:
    eager = singles.get("eager", {}).get("warmup_losses")
    return {name: loss_differences(run.get("warmup_losses"), eager) for name, run in singles.items()}


def within(differences: list | None, limits: list) -> bool:
    """All measured and each within its limit (a NaN, from a diverged loss or weight, is not)."""
    return bool(differences) and len(differences) == len(limits) and all(
        d is not None and d <= limit for d, limit in zip(differences, limits))


def run(params: dict, partial) -> None:
    """Section (d), in the parent process, in the order that a tight budget cuts from the end: eager, its yardstick
    and step graphs alone; the fastest of them that agrees with eager on the study's data path, as N runs in one
    process (one CUDA stream each) and as N processes; TF32 and bf16 step graphs alone; the compiled step graphs
    alone (fp32, then bf16); the loader's data path; reduce-overhead and compile without graphs (``LAST``)."""
    partial.record(batch=params["batch"], n_dis=params["n_dis"], width=params["width"] or 32,
                   warmup_iterations=params["warmup"], window_s=params["window_s"], skipped=params["skipped"],
                   agreement=AGREEMENT)
    peak = datasheet_peak(pick_device(), "fp32")  # the faithful runs' ceiling: fp32, without tensor cores
    partial.record(arithmetic={"flops_per_g_iteration": g_iteration_flops(params), **peak})
    candidates = [name for name in params["variants"] if name in FP32 and name not in COMPILED]
    others = [name for name in params["variants"] if name not in candidates and name not in LAST]
    last = [name for name in params["variants"] if name in LAST]
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        singles = {}

        def alone(variant: str) -> None:
            singles[variant] = single(params, variant, directory)
            partial.record(single=singles, warmup_losses_difference_to_eager=eager_differences(singles),
                           warmup_travel_difference_to_eager=travel_differences(singles))

        for variant in candidates:
            alone(variant)
        limits = agreement_limits(singles)
        partial.record(agreement_limits=limits)
        chosen = fastest_agreeing(singles, limits)
        losses, rate = singles[chosen].get("warmup_losses"), singles[chosen]["g_iterations_per_s"]
        levels = {"1": {"g_iterations_per_s_each": [rate], "g_iterations_per_s_total": rate, "runs": "the single run"}}
        partial.record(concurrent_variant=chosen, concurrent=levels, in_one_process={})
        partial.record(study_data_path=with_data(params, chosen, singles[chosen], directory, on_device=True))
        shared = {}
        for streams in params["in_one_process"]:
            shared[str(streams)] = in_one_process(params, chosen, streams, directory, losses)
            partial.record(in_one_process=shared)
        for parties in params["concurrency"][1:]:
            levels[str(parties)] = concurrent(params, chosen, parties, directory, losses)
            partial.record(concurrent=levels)
        for variant in others:
            alone(variant)
        partial.record(loader_data_path=with_data(params, chosen, singles[chosen], directory, on_device=False))
        for variant in last:
            alone(variant)
