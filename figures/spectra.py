"""Normalized singular-value spectra over training (the SRGANs README's fig3/fig4) and a collapse heatmap.

    python -m figures.spectra RUN [RUN2] [--layer 16] [--iterations 10000 20000 ...] [--net dis|gen] [--out DIR] [--pdf]

One run: s_i / s_1 against the index i for one layer, one curve per iteration. Two runs (e.g. SN and
SR): side-by-side panels on the same y-axis. Also writes a layers x iterations heatmap of the
collapse score (mean s_i / s_1 over i >= 2; convs by index, then the other layers; layers with one
singular value have no score and are left out, which a footnote says). Files: spectra_layerK.png and
collapse_heatmap.png for one run; two runs add _RUN1_vs_RUN2, so a comparison never overwrites the
one-run figures in the same folder (gen_/_gen for --net gen). The start of SR,
read from the "sr_start" events in RUN/log.jsonl, is drawn dashed (later curves; the curve at the
start itself is bold) and as a vertical line on the heatmap. A branch (a run resumed from another run's
snapshot, e.g. SR switched on at the SN run's 40k) is drawn with its parent's spectra up to the branch point,
named in the titles and dotted on the heatmap. Reads only RUN/spectra/ and RUN/log.jsonl, and a branch's
parents' (found from the "resumed" events in RUN/log.jsonl).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from figures.common import ancestors, command_line, plt, require_run_folder, save_figure
from source.files import run_figures
from source.training.runlog import sr_start
import numpy as np
from matplotlib.figure import Figure

from source.spectral.collapse import collapse_score
from source.spectral.spectra import SpectraRecord, list_spectra, load_spectra

DEFAULT_MAX_CURVES = 10  # without --iterations, a spectrum plot with more curves is unreadable


@dataclass(frozen=True)
class RunSpectra:
    name: str
    records: dict[int, SpectraRecord]  # iteration -> spectra, ascending; a branch's parents' up to where it branched
    sr_start: int | None  # first iteration SR was switched on, if ever
    inherited: list[tuple[str, int]]  # a branch's parents, nearest first, with the last iteration taken from each


def read_run(run_dir: Path) -> RunSpectra:
    """The run's spectra; a branch's (a run resumed from another run's snapshot) follow its parents' up to the
    branch point, so that SR switched on at the SN run's 40k shows the collapse before it and the recovery after."""
    require_run_folder(run_dir)
    files = dict(list_spectra(run_dir))
    if not files:
        raise FileNotFoundError(f"{run_dir / 'spectra'} holds no spectra_iter_*.npz files; is {run_dir} a run folder "
                                "of a run with spectra logging on?")
    starts, inherited = [sr_start(run_dir)], []
    for parent, until in ancestors(run_dir):
        taken = {iteration: path for iteration, path in list_spectra(parent) if iteration <= until}
        files = {**taken, **files}  # an iteration in both: the branch's own
        start = sr_start(parent)
        starts.append(start if start is not None and start <= until else None)  # counts where the branch took over
        inherited.append((parent.name, until))
    return RunSpectra(
        name=run_dir.resolve().name,
        records={iteration: read_spectra(files[iteration]) for iteration in sorted(files)},
        sr_start=min((start for start in starts if start is not None), default=None),
        inherited=inherited,
    )


def read_spectra(path: Path) -> SpectraRecord:
    # Training writes these files atomically, so a bad one was damaged or put there by hand: say which.
    try:
        return load_spectra(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable spectra file ({type(error).__name__}: {error})") from None


def resolve_layer(record: SpectraRecord, net: str, layer: str | None) -> tuple[str, int | None]:
    """(layer name, conv index or None) from an index, a name, or None for the last conv."""
    convs = record.conv_index[net]
    if layer is None:
        if not convs:
            raise ValueError(f"no SN conv layers in the {net!r} spectra; pass --layer NAME (one of {sorted(record.nets[net])})")
        return convs[-1], len(convs) - 1
    if layer.isdigit():
        index = int(layer)
        if index >= len(convs):
            raise ValueError(f"--layer {index} is out of range: the {net!r} spectra have conv indices 0..{len(convs) - 1}")
        return convs[index], index
    if layer not in record.nets[net]:
        raise ValueError(f"--layer {layer!r} is not in the {net!r} spectra; layers: {sorted(record.nets[net])}")
    return layer, convs.index(layer) if layer in convs else None


def choose_iterations(runs: list[RunSpectra], requested: list[int] | None) -> list[int]:
    """The iterations to plot: the requested ones (each must exist in some run) or up to 10 spread over all."""
    available = sorted(set().union(*(run.records for run in runs)))
    if requested is None:
        picks = np.linspace(0, len(available) - 1, min(DEFAULT_MAX_CURVES, len(available))).round().astype(int)
        return [available[i] for i in sorted(set(picks))]
    missing = sorted(set(requested) - set(available))
    if missing:
        raise ValueError(f"no spectra for iterations {missing}; available: {available}")
    for run in runs:
        if not set(requested) & set(run.records):
            raise ValueError(f"run {run.name} has none of the requested iterations; it has {sorted(run.records)}")
    return sorted(set(requested))


def spectra_figure(runs: list[RunSpectra], net: str, layer: str, index: int | None, iterations: list[int]) -> Figure:
    """One panel per run, one curve per iteration present in that run, colours shared across panels."""
    figure, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.8), sharey=True, squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(iterations)))
    for ax, run in zip(axes[0], runs):
        for iteration, color in zip(iterations, colors):
            if iteration in run.records:
                layers = run.records[iteration].nets[net]
                if layer not in layers:
                    raise ValueError(f"run {run.name} has no {net!r} layer {layer!r} at iteration {iteration}; "
                                     f"layers: {sorted(layers)}")
                normalized = layers[layer].normalized
                ax.plot(np.arange(normalized.size), normalized, color=color, **_curve_style(iteration, run.sr_start))
        label = f"layer {index} ({layer})" if index is not None else layer
        ax.set_title(f"{run.name}: {net} {label}{lineage_note(run)}")
        ax.set_xlabel("singular value index i")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(title="iteration", fontsize="small", loc="upper right")
    axes[0][0].set_ylabel(r"$\sigma_i / \sigma_1$ of the raw weight")
    figure.tight_layout()
    return figure


def lineage_note(run: RunSpectra) -> str:
    """A branch's title line naming where its earlier iterations come from."""
    if not run.inherited:
        return ""
    return "\n" + "; ".join(f"to {until} from {name}" for name, until in reversed(run.inherited))


def _curve_style(iteration: int, sr_start: int | None) -> dict:
    if sr_start is None or iteration < sr_start:
        return {"label": str(iteration), "linewidth": 1.2}
    if iteration == sr_start:
        return {"label": f"{iteration} (SR start)", "linewidth": 2.8}
    return {"label": f"{iteration} (SR)", "linewidth": 1.2, "linestyle": "--"}


def collapse_heatmap_figure(runs: list[RunSpectra], net: str) -> Figure:
    """Collapse score of every layer that has one (rows) at every stored iteration (columns), one panel per run."""
    figure, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5.5), squeeze=False)
    left_out: dict[str, None] = {}  # ordered union over the runs
    for ax, run in zip(axes[0], runs):
        rows, unscored = heatmap_rows(run, net)
        left_out.update(dict.fromkeys(unscored))
        iterations = np.array(sorted(run.records))
        scores = np.array([[_score(run.records[it], net, name) for it in iterations] for _, name in rows])
        mesh = ax.pcolormesh(_edges(iterations), np.arange(len(rows) + 1) - 0.5, np.ma.masked_invalid(scores),
                             cmap="magma", vmin=0, vmax=1)
        for name, until in run.inherited:
            ax.axvline(until, color="limegreen", linestyle=":", linewidth=3, label=f"branched from {name} ({until})")
        if run.sr_start is not None:
            ax.axvline(run.sr_start, color="cyan", linestyle="--", linewidth=2, label=f"SR start ({run.sr_start})")
        if run.inherited or run.sr_start is not None:
            ax.legend(loc="lower left", fontsize="small")
        ax.set_yticks(np.arange(len(rows)), [label for label, _ in rows], fontsize="small")
        ax.set_xlabel("iteration")
        ax.set_title(f"{run.name}: {net} collapse score{lineage_note(run)}")
        figure.colorbar(mesh, ax=ax, label=r"mean $\sigma_i / \sigma_1$, $i \geq 2$")
    if left_out:  # say why these layers are missing rather than show blank rows
        figure.text(0.01, 0.01, f"not shown: {', '.join(left_out)} (one singular value, so no collapse score: "
                    "the mean over i >= 2 is undefined)", fontsize="small", wrap=True)
    figure.tight_layout(rect=(0, 0.05 if left_out else 0, 1, 1))
    return figure


def heatmap_rows(run: RunSpectra, net: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, layer) rows, convs by index then the other layers, of the layers with a collapse score
    (at least 2 singular values); and the labels of the layers without one (a 1x1 conv on one channel, D's l7)."""
    record = next(iter(run.records.values()))
    convs = record.conv_index[net]
    labelled = [(f"{index} {name}", name) for index, name in enumerate(convs)]
    labelled += [(name, name) for name in sorted(set(record.nets[net]) - set(convs))]
    scored = {name for name, spectrum in record.nets[net].items() if spectrum.singular_values.size >= 2}
    rows = [(label, name) for label, name in labelled if name in scored]
    if not rows:
        raise ValueError(f"run {run.name} has no {net!r} layer with a collapse score (>= 2 singular values)")
    return rows, [label for label, name in labelled if name not in scored]


def _score(record: SpectraRecord, net: str, name: str) -> float:
    spectrum = record.nets[net].get(name)
    if spectrum is None or spectrum.singular_values.size < 2:
        return np.nan
    return collapse_score(spectrum.normalized)


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges halfway between iterations, so uneven logging intervals (resumes) keep a true time axis."""
    if centers.size == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    middles = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - middles[0]], middles, [2 * centers[-1] - middles[-1]]])


def output_names(runs: list[RunSpectra], net: str, layer_tag: str) -> tuple[str, str]:
    """Spectra and heatmap file names; a comparison names both runs, so it keeps the one-run fig3 beside it."""
    pair = f"_{runs[0].name}_vs_{runs[1].name}" if len(runs) == 2 else ""
    if net == "dis":
        return f"spectra_{layer_tag}{pair}.png", f"collapse_heatmap{pair}.png"
    return f"spectra_gen_{layer_tag}{pair}.png", f"collapse_heatmap_gen{pair}.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m figures.spectra", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="one run folder, or two to compare side by side")
    parser.add_argument("--layer", help="conv index (the SN convs sorted by module name, from 0, as the heatmap's "
                        "row labels list them; the ImageNet-128 D has 0 block1.c1 ... 16 block6.c2) or a layer "
                        "name such as l7; default: the last conv")
    parser.add_argument("--iterations", nargs="+", type=int, help=f"default: up to {DEFAULT_MAX_CURVES} spread over all")
    parser.add_argument("--net", choices=("dis", "gen"), default="dis")
    parser.add_argument("--out", type=Path, help="output folder; default: FIRST_RUN/figures")
    parser.add_argument("--pdf", action="store_true", help="also write a PDF next to each PNG")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error(f"at most two runs can be compared, got {len(args.runs)}")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    runs = [read_run(run_dir) for run_dir in args.runs]
    first_record = next(iter(runs[0].records.values()))
    layer, index = resolve_layer(first_record, args.net, args.layer)
    iterations = choose_iterations(runs, args.iterations)
    out_dir = args.out or run_figures(args.runs[0])
    spectra_name, heatmap_name = output_names(runs, args.net, f"layer{index}" if index is not None else layer)
    written = save_figure(spectra_figure(runs, args.net, layer, index, iterations), out_dir / spectra_name, args.pdf)
    written += save_figure(collapse_heatmap_figure(runs, args.net), out_dir / heatmap_name, args.pdf)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(command_line(main))
