"""Where an iteration's time goes on a GPU: torch.profiler over a few iterations after a timing window, for
sections (a) and (d) of the benchmark (benchmarks/gpu/README.md)."""
from __future__ import annotations

import time
from typing import Callable

from benchmarks.gpu.common import synchronize


def kernel_profile(update: Callable[[], object], read: Callable[[list], object], device, iterations: int = 3,
                   top: int = 8) -> dict:
    """Where a G-iteration's time goes: ``iterations`` calls of ``update`` (one G-iteration each), then ``read`` of
    their outputs (the losses, as a log line reads them), under torch.profiler: wall, the device's busy time (union
    of its kernels' and copies' intervals), kernel and graph launches, and the kernels (on a CPU: the ops) that take
    most of it. Busy time far below wall: the run waits on the host (launches, Python, a sync); near it:
    on its kernels, and the top ones say which. Never fails the section: an error is recorded instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            start = time.perf_counter()
            read([update() for _ in range(iterations)])
            synchronize(device)
            wall = time.perf_counter() - start
        events = prof.events()
        on_device = [e for e in events if e.device_type == DeviceType.CUDA]
        launches = {name: sum(e.name == name for e in events if e.device_type == DeviceType.CPU) / iterations
                    for name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")}
        spans = sorted((e.time_range.start, e.time_range.end) for e in on_device)
        heaviest = on_device if cuda else [e for e in events if e.device_type == DeviceType.CPU]
        busy = {"device_busy_ms_per_g_iteration": busy_us(spans) / 1e3 / iterations} if cuda else {
            "device_busy_ms_per_g_iteration": None, "device_busy_ms_per_g_iteration_why": "no CUDA device"}
        return {"iterations": iterations, "wall_ms_per_g_iteration": 1e3 * wall / iterations, **busy,
                "device_events_per_g_iteration": len(on_device) / iterations,
                "launches_per_g_iteration": {name: n for name, n in launches.items() if n},
                "top": heaviest_names(heaviest, iterations, top, self_time=not cuda),
                "top_is": "device kernels and copies" if cuda else "CPU ops by self time"}
    except Exception as error:  # noqa: BLE001: a profiler that cannot run here costs only this record
        return {"error": f"{type(error).__name__}: {error}"}


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of sorted [start, end) intervals (kernels on several streams may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def heaviest_names(events: list, iterations: int, top: int, self_time: bool) -> list[dict]:
    """The ``top`` names by time, with calls and ms per G-iteration."""
    by_name: dict[str, list[float]] = {}
    for event in events:
        spent = event.self_cpu_time_total if self_time else event.time_range.elapsed_us()
        calls_and_us = by_name.setdefault(event.name, [0, 0.0])
        calls_and_us[0] += 1
        calls_and_us[1] += spent
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return [{"name": name[:120], "calls": calls / iterations, "ms": us / 1e3 / iterations}
            for name, (calls, us) in ranked]
