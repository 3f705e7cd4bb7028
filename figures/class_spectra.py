"""Per-class spectral norms of G's class-conditional BatchNorm over training (gSR's "spectral explosion" figure).

    python -m figures.class_spectra [RUN_BASELINE] RUN [--classes all | Y ...] [--layer-reduce max|mean | --layer NAME]
                                    [--out PATH] [--pdf] [--logy] [--json]

One column per run (two runs, e.g. a baseline and its gSR run, left to right on shared y axes), rows: the
gain (sigma_max of gamma_y - 1) and the bias (sigma_max of beta_y), each against the iteration, one
line per class. With at most 10 classes every class is drawn, otherwise the 3 most and the 3 least
frequent (by the run's class_counts) unless --classes says otherwise. Classes are coloured by their
log image count, head cool (blue), tail warm (red); qualitative colours when all counts are equal.
The layers are reduced by max (default) or mean, or one layer is shown with --layer.

Prints the figure's path, then one summary line per run (--json: one JSON object per run, with the
path): at the last iteration, the mean sigma_gamma of the head (the more frequent half of the
classes) and of the tail (the rarer half; the middle class is left out when their number is odd)
and tail / head. Files: RUN/figures/class_spectra.png (class_spectra_mean.png, class_spectra_LAYER.png);
two runs add _RUN1_vs_RUN2, so a comparison never overwrites the one-run figure. Existing figures are
overwritten, as by the other figure commands. Reads only RUN/class_spectra.jsonl, and for a branch (a run resumed
from another run's snapshot) its parents' up to where it branched (found from the "resumed" events of RUN/log.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from figures.common import ancestors, command_line, plt, require_run_folder, run_names, save_figure
from source.files import run_figures
from source.training.runlog import read_jsonl

FILE = "class_spectra.jsonl"
MAX_ALL_CLASSES = 10  # up to this many classes, every one is drawn by default
DEFAULT_PER_END = 3  # otherwise the 3 most and the 3 least frequent
PARAMS = (("gamma", r"gain: $\sigma_{\max}(\gamma_y - 1)$"), ("beta", r"bias: $\sigma_{\max}(\beta_y)$"))
IMAGE_SUFFIXES = {".png", ".pdf", ".svg", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class ClassSpectra:
    name: str
    path: Path  # the jsonl file
    iterations: np.ndarray  # [T], ascending
    class_counts: np.ndarray  # [K], of the last record
    layers: list[str]  # of the last record
    values: dict[str, np.ndarray]  # "gamma"/"beta" -> [T, L, K]

    @property
    def n_classes(self) -> int:
        return self.class_counts.size


def read_run(run_dir: Path, name: str) -> ClassSpectra:
    require_run_folder(run_dir)
    path = run_dir / FILE
    records = read_records(path)
    if not records:
        what = "is empty" if path.is_file() else "does not exist"
        raise FileNotFoundError(f"{path} {what}: per-class spectra are written every spectra_interval iterations "
                                "of a run with a class-conditional generator")
    by_iteration = {record["iteration"]: record for record in records}  # a rewritten iteration: the last record wins
    source = dict.fromkeys(by_iteration, path)
    for parent, until in ancestors(run_dir):  # a branch continues its parents' history up to where it branched
        taken = {r["iteration"]: r for r in read_records(parent / FILE) if r["iteration"] <= until}
        by_iteration, source = {**taken, **by_iteration}, {**dict.fromkeys(taken, parent / FILE), **source}
    iterations = sorted(by_iteration)
    last = by_iteration[iterations[-1]]
    layers, counts = last["layers"], last["class_counts"]
    for iteration in iterations:
        record = by_iteration[iteration]
        if record["layers"] != layers or len(record["class_counts"]) != len(counts):
            raise ValueError(f"{source[iteration]}: iteration {iteration} has layers {record['layers']} and "
                             f"{len(record['class_counts'])} classes, iteration {iterations[-1]} has layers {layers} "
                             f"and {len(counts)} classes; one run folder per run")
    values = {key: np.array([by_iteration[it][key] for it in iterations], dtype=float) for key, _ in PARAMS}
    return ClassSpectra(name, path, np.array(iterations), np.array(counts, dtype=float), list(layers), values)


def read_records(path: Path) -> list[dict]:
    """The checked records of ``path`` ([] when it is missing); a cut-off last line (a crash) is skipped with a note."""
    return [check_record(record, f"{path}:{number}")
            for number, record in enumerate(read_jsonl(path, note_torn=True), start=1)]


def check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object")
    missing = [key for key in ("iteration", "class_counts", "layers", "gamma", "beta") if key not in record]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(record["iteration"], int) or isinstance(record["iteration"], bool):
        raise ValueError(f"{where}: iteration {record['iteration']!r} is not an integer")
    counts, layers = record["class_counts"], record["layers"]
    if not isinstance(counts, list) or not counts or not all(_is_number(c) and c >= 0 for c in counts):
        raise ValueError(f"{where}: class_counts must be a non-empty list of counts")
    if not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers):
        raise ValueError(f"{where}: layers must be a non-empty list of layer names")
    for key, _ in PARAMS:
        table = record[key]
        if (not isinstance(table, list) or len(table) != len(layers)
                or not all(isinstance(row, list) and len(row) == len(counts) for row in table)):
            raise ValueError(f"{where}: {key} must hold one list of {len(counts)} values (one per class) for each "
                             f"of the {len(layers)} layers")
        if not all(_is_number(value) or value is None for row in table for value in row):
            raise ValueError(f"{where}: {key} holds a value that is not a number")
    return record


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_class(run: ClassSpectra, key: str, layer: str | None, reduce: str) -> np.ndarray:
    """[T, K]: one layer's sigma_max, or the max / mean over the layers, per iteration and class (null -> NaN)."""
    values = run.values[key]
    if layer is not None:
        return values[:, run.layers.index(layer)]
    return np.nanmax(values, axis=1) if reduce == "max" else np.nanmean(values, axis=1)


def check_layer(runs: list[ClassSpectra], layer: str | None) -> None:
    for run in runs if layer is not None else []:
        if layer not in run.layers:
            raise ValueError(f"--layer {layer!r} is not in {run.path}; layers: {', '.join(run.layers)}")


def by_frequency(counts: np.ndarray) -> np.ndarray:
    """Class indices, most frequent first; equal counts by index (class 0 counts as the head)."""
    return np.argsort(-counts, kind="stable")


def choose_classes(runs: list[ClassSpectra], requested: list[str] | None) -> list[int]:
    """--classes (indices or "all"), checked against every run; by default every class, or with more than 10
    the 3 most and the 3 least frequent of the first run, most frequent first."""
    n_classes = min(run.n_classes for run in runs)
    if requested is None and any(run.n_classes != n_classes for run in runs):
        raise ValueError(f"the runs have {' and '.join(str(run.n_classes) for run in runs)} classes; pass --classes")
    if requested == ["all"] or (requested is None and n_classes <= MAX_ALL_CLASSES):
        return [int(y) for y in by_frequency(runs[0].class_counts[:n_classes])]
    if requested is None:
        order = by_frequency(runs[0].class_counts)
        return [int(y) for y in np.concatenate([order[:DEFAULT_PER_END], order[-DEFAULT_PER_END:]])]
    classes = []
    for text in requested:
        try:
            y = int(text)
        except ValueError:
            raise ValueError(f"--classes: {text!r} is not a class index (or 'all' alone)") from None
        if not 0 <= y < n_classes:
            raise ValueError(f"--classes: class {y} is out of range; the run{'s have' if len(runs) > 1 else ' has'} "
                             f"classes 0..{n_classes - 1}")
        if y not in classes:
            classes.append(y)
    return classes


def class_colors(counts: np.ndarray, classes: list[int]) -> dict[int, tuple]:
    """Cool (blue) for the most frequent class, warm (red) for the rarest, by log count over all classes."""
    logs = np.log(np.maximum(counts, 1))
    if np.ptp(logs) == 0:  # balanced data: counts say nothing, so tell the classes apart
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        return {y: cmap(i % cmap.N) for i, y in enumerate(classes)}
    cmap = plt.get_cmap("turbo")  # blue to red through green and orange: no pale middle class on the white axes
    return {y: cmap(0.08 + 0.84 * (logs.max() - logs[y]) / np.ptp(logs)) for y in classes}


def reduction_label(run: ClassSpectra, layer: str | None, reduce: str) -> str:
    return f"layer {layer}" if layer is not None else f"{reduce} over {len(run.layers)} layers"


def class_spectra_figure(runs: list[ClassSpectra], classes: list[int], layer: str | None, reduce: str,
                         logy: bool = False) -> Figure:
    """Rows gain and bias, one column per run, one line per class; each row shares its y axis across the runs."""
    figure, axes = plt.subplots(2, len(runs), figsize=(6.5 * len(runs), 8.5), sharey="row", sharex="col",
                                squeeze=False)
    for column, run in enumerate(runs):
        colors = class_colors(run.class_counts, classes)
        for row, (key, what) in enumerate(PARAMS):
            ax = axes[row][column]
            sigma = per_class(run, key, layer, reduce)
            marker = "o" if run.iterations.size <= 30 else None
            for y in classes:
                ax.plot(run.iterations, sigma[:, y], color=colors[y], marker=marker, markersize=3,
                        label=f"{y} ({int(run.class_counts[y])})")
            ax.set_title(f"{run.name}: {what}", fontsize="medium")
            ax.grid(alpha=0.3)
            if logy:
                ax.set_yscale("log")
            if column == 0:
                ax.set_ylabel(rf"$\sigma_{{\max}}$ ({reduction_label(run, layer, reduce)})")
            if row == 1:
                ax.set_xlabel("iteration")
        same_legend = column > 0 and np.array_equal(run.class_counts[classes], runs[0].class_counts[classes])
        if not same_legend:  # a second, identical legend would only hide curves
            axes[0][column].legend(title="class (images)", fontsize="small", title_fontsize="small",
                                   ncol=2 if len(classes) > 8 else 1)
    names = " vs ".join(run.name for run in runs)
    figure.suptitle(f"{names}: per-class spectral norm of G's conditional BatchNorm, "
                    f"{reduction_label(runs[0], layer, reduce)}")
    figure.tight_layout()
    return figure


@dataclass(frozen=True)
class Summary:
    run: str
    iteration: int
    reduction: str
    head_classes: list[int]
    tail_classes: list[int]
    head_sigma_gamma: float
    tail_sigma_gamma: float
    balanced: bool

    @property
    def tail_over_head(self) -> float:
        return self.tail_sigma_gamma / self.head_sigma_gamma if self.head_sigma_gamma > 0 else math.nan

    def line(self) -> str:
        balanced = " (balanced data: head and tail by class index)" if self.balanced else ""
        return (f"{self.run}: iteration {self.iteration}, sigma_gamma ({self.reduction}) head {self.head_sigma_gamma:.4g} "
                f"(classes {_span(self.head_classes)}), tail {self.tail_sigma_gamma:.4g} "
                f"(classes {_span(self.tail_classes)}), tail/head {self.tail_over_head:.3g}{balanced}")

    def to_dict(self) -> dict:
        fields = {**self.__dict__, "tail_over_head": self.tail_over_head}
        return {key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in fields.items()}


def _span(classes: list[int]) -> str:
    ordered = sorted(classes)
    contiguous = len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1))
    return f"{ordered[0]}-{ordered[-1]}" if contiguous else ",".join(map(str, ordered))


def summarize(run: ClassSpectra, layer: str | None, reduce: str) -> Summary:
    """Mean sigma_gamma at the last iteration of the more frequent half of the classes (head) and the rarer half (tail)."""
    sigma = per_class(run, "gamma", layer, reduce)[-1]
    order = by_frequency(run.class_counts)
    half = max(1, run.n_classes // 2)
    head, tail = sorted(int(y) for y in order[:half]), sorted(int(y) for y in order[-half:])
    return Summary(run.name, int(run.iterations[-1]), reduction_label(run, layer, reduce), head, tail,
                   float(np.mean(sigma[head])), float(np.mean(sigma[tail])), bool(np.ptp(run.class_counts) == 0))


def output_path(runs: list[ClassSpectra], first_run: Path, out: Path | None, layer: str | None, reduce: str) -> Path:
    tag = f"_{layer}" if layer is not None else ("" if reduce == "max" else f"_{reduce}")
    pair = "_" + "_vs_".join(run.name.replace("/", "-") for run in runs) if len(runs) > 1 else ""
    name = f"class_spectra{tag}{pair}.png"
    if out is None:
        return run_figures(first_run) / name
    return out if out.suffix.lower() in IMAGE_SUFFIXES else out / name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m figures.class_spectra", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="a run folder with class_spectra.jsonl, or two to compare side by side, left to "
                             "right (e.g. baseline, gSR)")
    parser.add_argument("--classes", nargs="+", metavar="Y",
                        help=f"class indices to draw, or 'all'; default: every class up to {MAX_ALL_CLASSES}, "
                        f"otherwise the {DEFAULT_PER_END} most and {DEFAULT_PER_END} least frequent")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--layer-reduce", choices=("max", "mean"), default="max",
                       help="how the BatchNorm layers are combined per class (default: max)")
    which.add_argument("--layer", help="one layer by name (as in the file's 'layers', e.g. block2.b1) instead")
    parser.add_argument("--out", type=Path, help="output file (.png, .pdf, ...) or folder; default: FIRST_RUN/figures")
    parser.add_argument("--pdf", action="store_true", help="also write a PDF next to the PNG")
    parser.add_argument("--logy", action="store_true", help="logarithmic y axes")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON objects, one per line")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error(f"at most two runs can be compared, got {len(args.runs)}")
    return args


def main(argv: list[str] | None = None) -> tuple[list[Path], list[Summary]]:
    args = parse_args(argv)
    for run_dir in args.runs:  # every run folder before any file, so a typo is named as such
        require_run_folder(run_dir)
    runs = [read_run(run_dir, name) for run_dir, name in zip(args.runs, run_names(args.runs))]
    check_layer(runs, args.layer)
    classes = choose_classes(runs, args.classes)
    summaries = [summarize(run, args.layer, args.layer_reduce) for run in runs]
    path = output_path(runs, args.runs[0], args.out, args.layer, args.layer_reduce)
    figure = class_spectra_figure(runs, classes, args.layer, args.layer_reduce, args.logy)
    written = save_figure(figure, path, args.pdf)
    if args.json:
        for summary in summaries:
            print(json.dumps({**summary.to_dict(), "figure": str(written[0])}))
    else:
        for target in written:
            print(target)
        for summary in summaries:
            print(summary.line())
        if len({summary.iteration for summary in summaries}) > 1:
            print(f"note: the runs end at different iterations ({', '.join(str(s.iteration) for s in summaries)}): "
                  "their last sigmas above are not of one time; the figure's x axes show each run's whole course")
    return written, summaries


if __name__ == "__main__":
    sys.exit(command_line(main))
