"""Spectral collapse next to mode collapse, per iteration, for one or more runs.

    python -m figures.collapse RUN_SN RUN_SR --labels SN SR

Panel 1: D's collapse score (mean s_i/s_1 over i >= 2, averaged over the convs; log.jsonl).
Panels 2-3: sample diversity and nearest-class mode coverage (source.metrics.modes) of every
``generator_iter_N.pt``, 100 samples per class with fixed latents against the data set's test split.
The mode measures are cached in RUN/modes.jsonl; SR's start is marked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from figures.common import (USER_ERRORS, command_line, finish_iteration_axes, is_number, not_written_here, plt,
                            require_run_folder, save_figure)
from source import arguments
from source.config import ConfigError
from source.datasets import DatasetError, build_dataset, check_dataset_args
from source.files import refuse_link, run_figures
from source.metrics.generate import generate_uint8, sample_inputs
from source.metrics.modes import mode_report
from source.training.evaluate import load_generator
from source.training.runlog import read_jsonl, sr_start

CACHE = "modes.jsonl"
SCORE = "collapse_score/dis/mean"
MAX_REAL_IMAGES = 10000  # real images the nearest-class classifier compares with (Fashion-MNIST's test split)


def generator_snapshots(run: Path) -> list[tuple[int, Path]]:
    paths = (run / "snapshots").glob("generator_iter_*.pt")
    return sorted((int(p.stem.rsplit("_", 1)[1]), p) for p in paths)


def collapse_scores(run: Path) -> list[dict]:
    scores = [r for r in read_jsonl(run / "log.jsonl") if SCORE in r]
    odd = next((r for r in scores if not is_number(r[SCORE])), None)
    if odd is not None:
        raise not_written_here(run / "log.jsonl", odd["iteration"], f"its {SCORE} is not a number")
    return scores


def cached_measure(record: dict) -> bool:
    """A mode-measure record as ``mode_history`` writes it; any other in the cache (one from elsewhere may hold
    anything) is measured again."""
    return (isinstance(record.get("per_class"), int) and isinstance(record.get("class_counts"), list)
            and all(is_number(record.get(key)) for key in ("diversity", "modes", "label_agreement")))


def check_run(run: Path) -> None:
    """Before any (slow) mode measure: every run exists and has something to plot."""
    require_run_folder(run)
    if not (collapse_scores(run) or generator_snapshots(run) or read_jsonl(run / CACHE)):
        raise ValueError(f"{run} has no collapse scores in log.jsonl (spectra_interval 0?), no "
                         f"snapshots/generator_iter_*.pt and no {CACHE}: nothing to plot")


def real_images(config) -> tuple[np.ndarray, np.ndarray]:
    """The test split of the run's data set when it has one (Fashion-MNIST, CIFAR-10, STL-10), as float [-1, 1]."""
    args = config.dataset.args
    if hasattr(args, "split"):
        args = dataclasses.replace(args, split="test")
        problems = check_dataset_args(config.dataset.name, args)
        if any("split" in problem for problem in problems):  # e.g. ImageNet's train and val
            raise ValueError(f"the mode panels compare samples with a data set's test split (Fashion-MNIST, "
                             f"CIFAR-10, STL-10); {config.dataset.name} has none, so this figure cannot be drawn "
                             f"for this run")
    dataset = build_dataset(config.dataset.name, args)
    order = list(range(len(dataset)))
    if len(dataset) > MAX_REAL_IMAGES:  # a fixed random subset: the first images of class-sorted data are few classes
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:MAX_REAL_IMAGES].tolist()
    images = np.stack([dataset[i][0].numpy() for i in order])
    labels = np.array([dataset[i][1] for i in order])
    return images.astype(np.float32) / 127.5 - 1, labels


def class_samples(gen: torch.nn.Module, per_class: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """``per_class`` samples of every class (fixed latents), quantized like the data; as many in all,
    unlabelled, for an unconditional G."""
    labels = torch.arange(n_classes).repeat_interleave(per_class) if gen.n_classes else None
    z, labels = sample_inputs(per_class * n_classes, gen.dim_z, gen.n_classes, seed, labels)
    images = torch.cat(list(generate_uint8(gen, z, labels, 250, torch.device("cpu"))))
    return images.numpy().astype(np.float32) / 127.5 - 1, None if labels is None else labels.numpy()


def mode_history(run: Path, per_class: int) -> list[dict]:
    """The mode measures of every generator export at ``per_class`` samples per class, cached per (iteration,
    samples per class): a call with another count measures again rather than plotting the other count's numbers
    (records of older versions, without the count or the class counts, are measured again too)."""
    cached = {(r["iteration"], r["per_class"]): r for r in read_jsonl(run / CACHE) if cached_measure(r)}
    real = None
    for iteration, path in generator_snapshots(run):
        if (iteration, per_class) in cached:
            continue
        loaded = load_generator(str(path), torch.device("cpu"))
        if real is None:
            real = real_images(loaded.config)
        n_classes = int(real[1].max()) + 1
        print(f"mode measures of {path.name}: {per_class} x {n_classes} samples on the CPU (cached in {run / CACHE})",
              flush=True)  # minutes for a 128 px G of 1000 classes: said, not silent
        samples, labels = class_samples(loaded.gen, per_class, n_classes=n_classes)
        record = {"iteration": iteration, "per_class": per_class, **mode_report(samples, labels, *real).to_dict()}
        cached[iteration, per_class] = record
        with open(refuse_link(run / CACHE), "a") as handle:  # a run folder from elsewhere may hold a link
            handle.write(json.dumps(record) + "\n")
    return [cached[key] for key in sorted(cached) if key[1] == per_class]


def collapse_figure(runs: list[Path], labels: list[str], per_class: int) -> plt.Figure:
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, label in zip(runs, labels):
        scores = collapse_scores(run)
        line, = axes[0].plot([r["iteration"] for r in scores], [r[SCORE] for r in scores], label=label)
        modes = mode_history(run, per_class)
        x = [r["iteration"] for r in modes]
        axes[1].plot(x, [r["diversity"] for r in modes], marker="o", color=line.get_color(), label=label)
        axes[2].plot(x, [r["modes"] for r in modes], marker="o", color=line.get_color(), label=f"{label}: modes")
        axes[2].plot(x, [10 * r["label_agreement"] for r in modes], marker="x", linestyle=":",
                     color=line.get_color(), label=f"{label}: 10 x label agreement")
        start = sr_start(run)
        if start is not None:
            for axis in axes:
                axis.axvline(start, color=line.get_color(), linestyle="--", linewidth=1)
    classes = len(modes[-1]["class_counts"]) if modes else "?"
    titles = ["D collapse score (mean over convs of mean $s_i/s_1$, $i \\geq 2$)",
              "intra-class diversity (generated / real)", f"nearest-class modes (of {classes})"]
    finish_iteration_axes(figure, axes, titles)
    return figure


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m figures.collapse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--per-class", type=arguments.integer(2, 10000, "diversity compares pairs of samples of a "
                                                             "class"), default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    for run in args.runs:
        check_run(run)
    out = args.out or run_figures(args.runs[0]) / "collapse.png"
    save_figure(collapse_figure(args.runs, labels, args.per_class), out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(command_line(main, errors=USER_ERRORS + (ConfigError, DatasetError)))
