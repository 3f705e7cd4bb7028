"""The collapse study's chunk settings that a GPU benchmark run measured best, as ``source.study`` arguments.

    python -m benchmarks.gpu.study_settings $OUT/gpu_<device>.json      # e.g. --set performance.step_graphs=true ...
    python -m benchmarks.gpu.study_settings --dir benchmarks/results    # the committed file of this machine's GPU
    python -m benchmarks.gpu.study_settings --dir benchmarks/results --tests-log chunk.log   # and the tests here

From section (d) (benchmarks/gpu/small.py), on the study's own base model and recipe:
- step graphs (or fused Adam alone), where (d) chose them for its concurrent runs: the fastest fp32 variant
  uncompiled whose warm-up agreed with eager's (``small.agrees``: within ``small.SPREAD`` times the rounding
  yardstick's spread);
- ``--per-process K``, where K runs in one process (one CUDA stream each) did more G-iterations/s in all than any
  number of processes did (several processes measured too), and the first of them agreed with the single run;
- ``performance.sr_on_cpu``, where one static SR call on the study's D took less time on the CPU than on the GPU.
Nothing is chosen that was not measured, nor where the run that measured (d) did not record the GPU-only tests
(``run.sh --gpu-tests``: graph capture, runs on streams, SR on the CPU; ``gpu_tests`` in the section) as passed:
then the chunk runs as the study's base sets (eager, one run per process); likewise where the GPU-only tests run
just before on this machine and code (``--tests-log``, measure_then_study.sh 0) did not pass. At most ``MOST_PER_PROCESS`` runs share
a process: a CUDA error in one ends them all.
Each choice and its numbers go to stderr; stdout holds only the arguments, for a shell to splice in.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.gpu.common import device_name, gpu_tests, pick_device, slug
from benchmarks.gpu.small import agrees_with_single

FUSED_ADAM = ["--set", "performance.fused_adam=true"]
STEP_GRAPHS = ["--set", "performance.step_graphs=true", *FUSED_ADAM]
MOST_PER_PROCESS = 8


def choose(small: dict, tests: dict | None) -> tuple[list[str], list[str]]:
    """(arguments, one reason per choice) from section (d)'s results and the GPU-only tests' outcome."""
    if not (tests or {}).get("passed"):
        outcome = f"{tests.get('summary') or 'no summary'}, pytest exit {tests.get('exit')}" if tests else "not recorded"
        return [], [f"the GPU-only tests did not pass ({outcome}): the study's base settings"]
    arguments, reasons = [], []
    singles = small.get("single") or {}
    if small.get("concurrent_variant") == "step-graphs":
        arguments += STEP_GRAPHS
        reasons.append(f"step graphs: {rate(singles, 'step-graphs')} G-iterations/s alone against eager's "
                       f"{rate(singles, 'eager')}, agreeing with eager")
    elif small.get("concurrent_variant") == "eager-fused-adam":
        arguments += FUSED_ADAM
        reasons.append(f"fused Adam: {rate(singles, 'eager-fused-adam')} G-iterations/s alone against eager's "
                       f"{rate(singles, 'eager')}")
    levels = small.get("concurrent") or {}
    processes = max([level.get("g_iterations_per_s_total") or 0 for level in levels.values()], default=0)
    several = any(level.get("g_iterations_per_s_total") for runs, level in levels.items() if runs != "1")
    shared = {int(runs): level["g_iterations_per_s_total"] for runs, level in (small.get("in_one_process") or {}).items()
              if int(runs) <= MOST_PER_PROCESS and level.get("status") == "ok" and level.get("g_iterations_per_s_total")
              and agrees_with_single(small, level.get("warmup_losses_difference_to_single"))}
    if shared and several and max(shared.values()) > processes:
        runs = max(shared, key=shared.get)
        arguments += ["--per-process", str(runs)]
        reasons.append(f"{runs} runs per process: {shared[runs]:.1f} G-iterations/s in all, against {processes:.1f} "
                       f"at best as separate processes")
    sr = singles.get("eager", {}).get("sr_call_s") or {}
    if sr.get("static_cpu") and sr.get("static_device") and sr["static_cpu"] < sr["static_device"]:
        arguments += ["--set", "performance.sr_on_cpu=true"]
        reasons.append(f"SR on the CPU: a static call {1e3 * sr['static_cpu']:.1f} ms there, "
                       f"{1e3 * sr['static_device']:.1f} ms on the GPU")
    return arguments, reasons or ["nothing measured better than the study's base settings"]


def rate(singles: dict, variant: str) -> str:
    value = singles.get(variant, {}).get("g_iterations_per_s")
    return f"{value:.1f}" if value else "null"


def results_of_this_gpu(folder: Path) -> Path | None:
    """The committed results of the GPU this runs on (``gpu_<its name>.json``), else, on a GPU, the only ones there,
    else none: another GPU's numbers are no guide where this GPU's are committed beside them, and none is for a
    machine without a GPU (an H200's step graphs made a CPU's chunk several times slower)."""
    device = pick_device()
    own = folder / f"gpu_{slug(device_name(device))}.json"
    found = sorted(path for path in folder.glob("gpu_*.json") if "-quick" not in path.name)
    if own.is_file():
        return own
    if len(found) == 1 and device.type == "cuda":
        return found[0]
    if len(found) == 1:
        print(f"study_settings: no GPU here, and {found[0].name} is another device's; the chunk runs as the study's "
              "base sets", file=sys.stderr)
        return None
    print(f"study_settings: none of {[path.name for path in found]} is {own.name}", file=sys.stderr)
    return None


def read_results(path: Path) -> dict:
    """A benchmark's results ({} when the file is not such results: the chunk then runs as the study's base sets)."""
    try:
        results = json.loads(path.read_text())
        if not isinstance(results, dict) or not isinstance(results["sections"], dict):
            raise TypeError("not a benchmark's results")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"study_settings: {path}: {error}; the chunk runs as the study's base sets", file=sys.stderr)
        return {}
    print(f"study_settings: section (d) of {path}", file=sys.stderr)
    return results


def tests_vouching(results: dict, small: dict, here: dict | None = None) -> dict | None:
    """The GPU-only tests' outcome that (d)'s numbers stand on: those of the run that measured (d), unless a later
    run failed them: the file's latest (merged in later, ``protocol.gpu_tests``) or the one just made ``here``. On
    that machine and code, the paths (d) measured may no longer hold, whatever an earlier run found."""
    latest = (results.get("protocol") or {}).get("gpu_tests")
    failed = [tests for tests in (here, latest) if tests and not tests.get("passed")]
    return failed[0] if failed else small.get("gpu_tests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.study_settings", description=__doc__.split("\n")[0])
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("results", nargs="?", type=Path, help="a benchmark's gpu_<device>.json")
    chosen.add_argument("--dir", type=Path, help="a folder of results: the file of this machine's GPU")
    parser.add_argument("--tests-log", type=Path, help="the GPU-only tests' log of a run just made here "
                                                       "(gpu_tests.sh); missing or not passed: the base settings")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors return 2 to a caller in Python as to a shell
        return int(exit_.code or 0)
    path = results_of_this_gpu(args.dir) if args.dir else args.results
    results = read_results(path) if path else {}
    small = (results.get("sections") or {}).get("d_small_models") or {}
    here = gpu_tests(args.tests_log) if args.tests_log else None
    arguments, reasons = choose(small, tests_vouching(results, small, here))
    for reason in reasons:
        print(f"study_settings: {reason}", file=sys.stderr)
    print(" ".join(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
