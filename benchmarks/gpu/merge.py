"""Fold a later GPU benchmark run of some sections into the results of an earlier run on the same device.

    python -m benchmarks.gpu.merge benchmarks/results/gpu_nvidia-h200.json LATER.json

A lent GPU call is shorter than the whole benchmark on a cold compile cache, so sections may be measured in
different calls (`run.sh --sections a_fast,d_small_models`). The later run's sections replace the earlier
run's, except one it did not finish cleanly where the earlier run did; a run is merged once; the protocol keeps
every run (its date, command, sections, torch) and which run measured each section; the ratios are recomputed
from the merged numbers; the JSON and its markdown are rewritten in place. Runs of another device or torch version
are refused: their numbers would not be comparable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.gpu.report import derived_ratios, markdown
from source.files import atomic_write_text

COMPARABLE = ("device", "torch", "cuda")


def run_summary(result: dict) -> dict:
    protocol = result["protocol"]
    summary = {key: protocol.get(key) for key in ("date", "command", "code", "sections_run", "total_wall_s",
                                                  "budgets_s")}
    return dict(summary, complete=result.get("complete", True))


def merge(earlier: dict, later: dict) -> dict:
    differing = [key for key in COMPARABLE if earlier["protocol"].get(key) != later["protocol"].get(key)]
    if differing or earlier.get("quick") != later.get("quick"):
        key = differing[0] if differing else "quick"
        raise ValueError(f"the runs differ in {key}: {earlier['protocol'].get(key, earlier.get('quick'))!r} and "
                         f"{later['protocol'].get(key, later.get('quick'))!r}; keep them apart")
    runs = earlier["protocol"].get("runs") or [run_summary(earlier)]
    if any(run["date"] == later["protocol"]["date"] for run in runs):
        raise ValueError(f"the run of {later['protocol']['date']} is merged already")
    measured_by = earlier["protocol"].get("section_dates") or dict.fromkeys(earlier["sections"],
                                                                           earlier["protocol"]["date"])
    # a section the later run did not finish cleanly does not replace one that the earlier run did
    replacing = {name: section for name, section in later["sections"].items()
                 if section.get("status") == "ok" or earlier["sections"].get(name, {}).get("status") != "ok"}
    sections = {**earlier["sections"], **replacing}
    protocol = {**later["protocol"], "runs": [*runs, run_summary(later)],
                "section_dates": {**measured_by, **dict.fromkeys(replacing, later["protocol"]["date"])},
                "sections_run": list(sections),  # the GPU-only tests' latest outcome (a run without them keeps it)
                "gpu_tests": later["protocol"].get("gpu_tests") or earlier["protocol"].get("gpu_tests")}
    merged = {key: value for key, value in later.items() if key != "complete"}  # each run's is in its summary
    return {**merged, "protocol": protocol, "sections": sections, "ratios": derived_ratios(sections)}


def read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be benchmark results") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("earlier", type=Path, help="the results to update (rewritten in place, with its .md)")
    parser.add_argument("later", type=Path, help="a later run's JSON, of some sections")
    args = parser.parse_args(argv)
    try:
        merged = merge(*(read_results(path) for path in (args.earlier, args.later)))
        text = json.dumps(merged, indent=2, default=str) + "\n"  # NaN stays: a diverged run's difference
        report = markdown(merged)  # before anything is written: results it cannot render change nothing
    except (OSError, ValueError) as error:
        print(f"merge: {error}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError, OverflowError) as error:  # a hand-edited or foreign file
        print(f"merge: not this benchmark's results ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    atomic_write_text(args.earlier, text)
    atomic_write_text(args.earlier.with_suffix(".md"), report)
    print(f"merge: {args.earlier} now holds {', '.join(f'{s} ({d})' for s, d in merged['protocol']['section_dates'].items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
