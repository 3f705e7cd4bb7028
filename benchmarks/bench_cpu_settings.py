"""The performance settings on this CPU, side by side: seconds per training iteration of the demo model.

    python -m benchmarks.bench_cpu_settings [--config configs/demo.yaml] [--iterations 20] [--rounds 3] [--settings fp32 bf16]

Builds the config's models on synthetic data (the demo: 32 px, ch 32, batch 32, n_dis 1) once per
setting, warms each up (compile's first iterations compile), then times ``--iterations`` full
iterations per round, the settings interleaved round by round so that load from other processes hits
all of them alike, and reports each setting's best round relative to plain fp32.
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
from source.training import build, performance
from source.training.distributed import World

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ["performance.channels_last=false"]  # whatever the config sets (the demo's: channels_last)
SETTINGS = {
    "fp32": PLAIN,
    "channels_last": ["performance.channels_last=true"],
    "compile": [*PLAIN, "performance.compile=true"],
    "compile+channels_last": ["performance.compile=true", "performance.channels_last=true"],
    "bf16": [*PLAIN, "performance.amp=bf16"],
}


def build_updater(config_path: Path, overrides: list[str]):
    config = load_config(config_path, ["dataset.name=synthetic", "num_workers=0", *overrides])
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    performance.configure_backends(config.performance, config.deterministic)
    models = build.build_models(config, world.device)
    return build.build_updater(config, world, models, build.build_batches(config, world))


def timed(updater, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        updater.update()
    return (time.perf_counter() - start) / iterations


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/demo.yaml")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="which to compare (fp32 always); compile takes many minutes on 2 cores")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu_settings.json")
    args = parser.parse_args(argv)
    names = ["fp32"] + [name for name in args.settings if name != "fp32"]
    updaters = {name: build_updater(args.config, SETTINGS[name]) for name in names}
    warmup = {name: timed(updater, args.warmup) * args.warmup for name, updater in updaters.items()}
    rounds = {name: [] for name in updaters}
    for round_index in range(args.rounds):
        for name, updater in updaters.items():
            rounds[name].append(timed(updater, args.iterations))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {r[-1] * 1e3:.1f} ms" for n, r in rounds.items()), flush=True)
    best = {name: min(times) for name, times in rounds.items()}
    result = {
        "config": str(args.config.relative_to(ROOT)), "device": platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "protocol": f"best of {args.rounds} interleaved rounds of {args.iterations} iterations, after {args.warmup} "
                    "warm-up iterations (which include compilation)",
        "seconds_per_iteration": best,
        "relative_to_fp32": {name: seconds / best["fp32"] for name, seconds in best.items()},
        "warmup_seconds": warmup,
    }
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
