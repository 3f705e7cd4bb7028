"""Operations per G-iteration of the 32 px models, and CPU seconds per iteration, with our spectral norm and with
torch's parametrization on the same buffers, side by side in one run.

    python -m benchmarks.bench_sn_kernels [--iterations 5] [--out benchmarks/results/sn_ops_cpu.json]

On a GPU the 32 px models (ch 32, batch 64, n_dis 5: issue 9's small-model target) are launch-bound: an iteration
costs about a few microseconds per kernel, whatever the kernel does (section (d) of the GPU benchmark profiles it).
The operations that torch dispatches here, views left out, are the kernels a GPU iteration launches, so their
count is the proxy this CPU can measure; the CPU seconds are the other side (the arithmetic is the same).
"""
from __future__ import annotations

import argparse
import collections
import platform
import time
from pathlib import Path

import torch
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.gpu.small_worker import CONFIG, SmallRun, small_overrides
from benchmarks.results_io import save_result
from source.config import load_config
from source.links.spectral_norm import FP32SpectralNorm
from source.training.distributed import World

# aten operations that return views or metadata: no kernel on a GPU
VIEWS = {"view", "_unsafe_view", "detach", "expand", "t", "transpose", "unsqueeze", "squeeze", "slice", "split",
         "unbind", "select", "as_strided", "permute", "reshape", "alias", "_record_function_enter_new",
         "_record_function_exit"}


class OperationCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def use_torch_spectral_norm(model: torch.nn.Module) -> None:
    """Our SN layers run torch's own forward (same class hierarchy and buffers: only the code differs)."""
    for module in model.modules():
        if type(module) is FP32SpectralNorm:
            module.__class__ = _SpectralNorm


def measure(spectral_norm: str, iterations: int, params: dict) -> dict:
    config = load_config(CONFIG, small_overrides(params))
    run = SmallRun(config, World(rank=0, local_rank=0, size=1, device=torch.device("cpu")), params, None)
    if spectral_norm == "torch":
        use_torch_spectral_norm(run.models.dis)
    run.update()  # first iteration: allocations
    with OperationCount() as counted:
        losses = run.update()
    start = time.perf_counter()
    for _ in range(iterations):
        run.update()
    seconds = (time.perf_counter() - start) / iterations
    return {"operations_per_g_iteration": sum(counted.counts.values()), "cpu_s_per_g_iteration": seconds,
            "losses_second_iteration": {name: float(value) for name, value in losses.items()},
            "most_frequent": dict(counted.counts.most_common(12))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sn_ops_cpu.json"))
    args = parser.parse_args()
    params = {"batch": 64, "n_dis": 5, "width": 32, "variant": "step-graphs"}  # step graphs fall back to eager here
    result = {"what": "32 px models (ch 32, batch 64, n_dis 5), fp32, fused Adam, eager on the CPU",
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch_version": torch.__version__, "iterations_timed": args.iterations,
              "ours": measure("ours", args.iterations, params), "torch": measure("torch", args.iterations, params)}
    result["ratios"] = {
        "operations_ours_over_torch": result["ours"]["operations_per_g_iteration"]
        / result["torch"]["operations_per_g_iteration"],
        "cpu_time_ours_over_torch": result["ours"]["cpu_s_per_g_iteration"] / result["torch"]["cpu_s_per_g_iteration"]}
    save_result(result, args.out)


if __name__ == "__main__":
    main()
