"""What every section shares: the device, synchronised timing, peak rates, partial results and child processes.

Each section runs in a child process of its own (``bench.py --child``) so that a hang, a crash or an
out-of-memory error costs only that section: the parent kills the child's process group at its budget
and keeps whatever the child had recorded so far (``Partial`` rewrites its file after every stage).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from source.provenance import code_version, device_name
from source.study.processes import own_process_group

ROOT = Path(__file__).resolve().parents[2]
MINIMUM_S = 10.0  # no section or run is started with less time than this left

# Peak dense rates in TFLOP/s (tensor cores for bf16 and tf32, CUDA cores for fp32). Sources: NVIDIA H100
# Tensor Core GPU Architecture whitepaper (2022), table 3 (H100 SXM5: 989.4 / 494.7 / 66.9; H100 PCIe: 756 /
# 378 / 51.2), NVIDIA H100 NVL and H200 datasheets (2024; H200 SXM has the H100 SXM's compute; NVL parts
# 835.5 / 417.5 / 60). The datasheets print bf16 and tf32 with sparsity: halved here. Matched as substrings of
# torch.cuda.get_device_name(), first match first (the SXM names have no suffix: "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
)


def progress(tag: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {tag}: {message}", flush=True)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(action, device: torch.device) -> float:
    """Wall seconds of ``action()``, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    action()
    synchronize(device)
    return time.perf_counter() - start


def timed_value(function, device: torch.device):
    """``function()``'s result and its wall seconds, synchronised as ``timed``."""
    results = []
    seconds = timed(lambda: results.append(function()), device)
    return results[0], seconds


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def datasheet_peak(device: torch.device, precision: str) -> dict:
    """The device's datasheet peak TFLOP/s for ``precision`` (null, with the reason, for devices not listed)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "a CPU"
    peaks = next((rates for key, rates in PEAK_TFLOPS if key in name), None)
    if peaks is None:
        return {"precision": precision, "peak_tflops": None,
                "peak_tflops_why": f"no datasheet peak for {name} in benchmarks/gpu/common.py"}
    return {"precision": precision, "peak_tflops": peaks[precision]}


def utilisation(flops: float | None, seconds: float | None, device: torch.device, precision: str) -> dict:
    """Model-FLOPs utilisation: counted model FLOPs / time / the device's datasheet peak for ``precision``."""
    peak = datasheet_peak(device, precision)
    if peak["peak_tflops"] is None:
        return dict(peak, value=None, value_why=peak["peak_tflops_why"])
    if not flops or not seconds:
        return dict(peak, value=None, value_why="FLOPs or time not measured")
    return dict(peak, value=flops / seconds / (peak["peak_tflops"] * 1e12))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_memory_bytes": None, "peak_memory_bytes_why": "CPU: no allocator statistics"}
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)}


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "code": code_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "cpu_cores": os.cpu_count(),
        "cudnn_conv_fp32_precision_default": torch.backends.cudnn.conv.fp32_precision,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }


class Partial:
    """A child's results, rewritten to its file after every stage so that a timeout keeps what was measured."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def record(self, **items) -> None:
        self.data.update(items)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str))
        temporary.replace(self.path)


def remaining(params: dict) -> float:
    """Seconds left before the parent kills this child."""
    return params["deadline"] - time.time()


def start_child(name: str, params: dict, result: Path) -> subprocess.Popen:
    """``bench.py --child name`` in its own process group (so a kill also ends the processes it started)."""
    command = [sys.executable, "-m", "benchmarks.gpu.bench", "--child", name, "--params", json.dumps(params),
               "--result", str(result)]
    return subprocess.Popen(command, cwd=ROOT, **own_process_group())


def finish_child(process: subprocess.Popen, deadline: float) -> str:
    """Wait until ``deadline``; 'ok', 'error' (non-zero exit) or 'timeout' (the group was killed)."""
    try:
        code = process.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"
    return "ok" if code == 0 else "error"


def read_result(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_child(name: str, params: dict, result: Path, budget: float) -> dict:
    """Run one child to completion or its budget; its recorded results plus status and wall seconds."""
    started = time.time()
    params = dict(params, deadline=started + budget)
    status = finish_child(start_child(name, params, result), params["deadline"])
    data = read_result(result)
    data.update(status=status, wall_s=round(time.time() - started, 2), budget_s=budget)
    if status == "timeout":
        data["error"] = f"killed at its budget of {budget:.0f} s; what it had recorded before is kept"
    elif status == "error":
        data.setdefault("error", "child process failed without recording an error (see the log)")
    return data


def gpu_tests(log: Path | None) -> dict | None:
    """The GPU-only tests' outcome from their log (gpu_tests.sh's): pytest's exit status and summary line; "passed" only
    where pytest exited 0 having passed some and failed none (a crash leaves no summary; all skipped passes none)."""
    if log is None:
        return None
    text = log.read_text(errors="replace") if log.is_file() else ""
    exits = re.findall(r"^pytest exit (-?\d+)$", text, re.MULTILINE)
    summaries = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected)\b.*?)\s*=*$", text, re.MULTILINE)
    summary = summaries[-1] if summaries else None
    passed = bool(exits and exits[-1] == "0" and summary and re.search(r"\b[1-9]\d* passed", summary)
                  and not re.search(r"\b(failed|error)", summary))
    return {"exit": int(exits[-1]) if exits else None, "summary": summary, "passed": passed}


def in_own_process(function, *args):
    """``function(*args)`` in a fresh (spawned) process, its result or exception returned here: a failed CUDA graph
    capture leaves torch's CUDA state unusable in its process (torch < 2.13: the default generator still
    capturing, the capture stream current), which must not spoil what runs after it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)
