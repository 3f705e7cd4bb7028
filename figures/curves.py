"""IS, FID and KID against iteration for one or more runs (the SRGANs README's fig1/fig2).

    python -m figures.curves RUN [RUN ...] [--labels SNGAN SRGAN] [--out DIR] [--pdf]

One panel per metric present (IS, FID, KID, in that order), one line per run, with a band of one
standard deviation where the metric has one (IS over splits, KID over subsets). A run resumed
from another run's snapshot (an SR run branched from the SN run's 40k snapshot) starts its line at
the parent's value at the resume point, drawn as a diamond. SR starts ("sr_start" events) are
dashed vertical lines in the run's colour, resumes dotted ones. Panel titles state the protocol
(N, IS splits, reference) and say so when the runs were scored under different ones.
Reads only RUN/metrics.jsonl and RUN/log.jsonl. A run without IS/FID/KID records yet (a branch just started) is
left out with a note, when another run has some.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from figures.common import (command_line, is_number, not_written_here, plt, require_run_folder, resumed_run,
                            save_figure)
from source.files import run_figures
from source.training.runlog import events, read_jsonl, sr_start
from matplotlib.axes import Axes
from matplotlib.figure import Figure

METRICS = {"IS": "IS_std", "FID": None, "KID": "KID_std"}  # metric -> its standard deviation's key


@dataclass(frozen=True)
class RunCurves:
    label: str
    records: dict[int, dict]  # iteration -> metrics.jsonl record (the last one written for it), ascending
    resumes: dict[int, dict | None]  # resume iteration -> the parent run's record there, when it has one
    sr_start: int | None  # first iteration SR was on, if ever


def read_run(run_dir: Path, label: str) -> RunCurves:
    """The run's curves; its records may be empty (``no_records`` says why)."""
    require_run_folder(run_dir)
    records = {int(r["iteration"]): r for r in read_jsonl(run_dir / "metrics.jsonl") if any(m in r for m in METRICS)}
    for record in records.values():
        check_record(record, run_dir / "metrics.jsonl")
    resumes = {int(e["iteration"]): parent_record(run_dir, e) for e in events(run_dir, "resumed")}
    return RunCurves(label, dict(sorted(records.items())), resumes, sr_start(run_dir))


def check_record(record: dict, path: Path) -> None:
    """A ValueError for a record whose scores are no numbers or whose protocol is not as evaluation writes it (a run
    folder may come from elsewhere)."""
    keys = [key for metric, std in METRICS.items() for key in (metric, std) if key in record]
    odd = next((key for key in keys if not is_number(record[key])), None)
    protocol = record.get("protocol", {"n_samples": 0})
    if odd is None and isinstance(protocol, dict) and isinstance(protocol.get("n_samples"), int):
        return
    raise not_written_here(path, record["iteration"], f"its {odd} is not a number" if odd else
                           "its protocol is not as evaluation writes it")


def no_records(run_dir: Path) -> str:
    metrics_path = run_dir / "metrics.jsonl"
    holds = "holds no IS/FID/KID records" if metrics_path.is_file() else "does not exist (no evaluation yet)"
    return (f"{metrics_path} {holds}; training writes them every evaluation_interval iterations "
            "(evaluation.metrics must not be empty)")


def parent_record(run_dir: Path, event: dict) -> dict | None:
    """The metrics record at the resume iteration of the run whose snapshot was resumed, if that is another run."""
    snapshot = event.get("snapshot")
    if not snapshot:
        return None
    parent = resumed_run(run_dir, Path(snapshot))
    if parent is None or parent == run_dir.resolve():
        return None
    matches = [r for r in read_jsonl(parent / "metrics.jsonl") if r.get("iteration") == event["iteration"]]
    return matches[-1] if matches else None


def protocol_label(runs: list[RunCurves], metric: str) -> str:
    """'N=5000, 1 split(s), ref fashion_mnist train 1000 imgs' when all records agree, else a warning."""
    protocols = {_protocol_key(record["protocol"], metric) for run in runs for record in run.records.values()
                 if metric in record and "protocol" in record}
    if len(protocols) == 1:
        return protocols.pop()
    return "different protocols: not comparable" if protocols else "protocol not recorded"


def _protocol_key(protocol: dict, metric: str) -> str:
    parts = [f"N={protocol['n_samples']}"]
    if metric == "IS":
        parts.append(f"{protocol['splits']} split(s)")
    else:
        key = protocol.get("reference_key") or {}
        described = {"dataset", "split", "n_images"} <= key.keys()
        reference = f"{key['dataset']} {key['split']} {key['n_images']} imgs" if described else protocol["reference"]
        parts.append(f"ref {reference}")
    if metric == "KID" and "kid_subset_size" in protocol:
        parts.append(f"subsets of {protocol['kid_subset_size']}")
    if protocol.get("g_batchnorm", "running") != "running":  # records without it: running statistics
        parts.append(f"G BN {protocol['g_batchnorm']} statistics")
    if protocol.get("generator", "raw") != "raw":  # EMA and raw weights' numbers do not compare
        parts.append(f"G's {protocol['generator'].upper()} weights")
    return ", ".join(parts)


def curves_figure(runs: list[RunCurves]) -> Figure:
    """One panel per metric any run has; one line per run that has it, labelled with the run's label."""
    metrics = [metric for metric in METRICS if any(metric in r for run in runs for r in run.records.values())]
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, metric in zip(axes[0], metrics):
        for run, color in zip(runs, colors):
            _plot_run(ax, run, metric, color)
        ax.set_title(f"{metric} ({protocol_label(runs, metric)})", fontsize="medium")
        ax.set_xlabel("iteration")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _plot_run(ax: Axes, run: RunCurves, metric: str, color) -> None:
    points = {it: _value(r, metric) for it, r in run.records.items() if metric in r}
    if not points:
        return
    starts = {it: _value(r, metric) for it, r in run.resumes.items() if r and metric in r and it not in points}
    series = {**points, **starts}
    iterations = sorted(series)
    values, stds = [series[it][0] for it in iterations], [series[it][1] for it in iterations]
    ax.plot(iterations, values, marker="o", markersize=3, color=color, label=run.label)
    if any(stds):
        ax.fill_between(iterations, [v - s for v, s in zip(values, stds)], [v + s for v, s in zip(values, stds)],
                        color=color, alpha=0.15, linewidth=0)
    for iteration, (value, _) in starts.items():
        ax.plot([iteration], [value], marker="D", markersize=7, color=color, linestyle="none")
    for iteration, style, text in _event_lines(run):
        ax.axvline(iteration, color=color, linestyle=style, linewidth=1, alpha=0.8, label=f"{run.label}: {text}")


def _value(record: dict, metric: str) -> tuple[float, float]:
    std_key = METRICS[metric]
    return record[metric], record.get(std_key, 0.0) if std_key else 0.0


def _event_lines(run: RunCurves) -> list[tuple[int, str, str]]:
    """(iteration, line style, text) per resume and SR start; one line where both fall on the same iteration."""
    texts = {iteration: [f"resumed ({iteration})"] for iteration in run.resumes}
    if run.sr_start is not None:
        texts.setdefault(run.sr_start, []).append(f"SR start ({run.sr_start})")
    return [(iteration, "--" if iteration == run.sr_start else ":", ", ".join(parts))
            for iteration, parts in sorted(texts.items())]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m figures.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders, e.g. the SN run and the SR run")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    parser.add_argument("--out", type=Path, help="output folder; default: FIRST_RUN/figures")
    parser.add_argument("--pdf", action="store_true", help="also write curves.pdf")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    labels = args.labels or [run.resolve().name for run in args.runs]
    runs = [read_run(run, label) for run, label in zip(args.runs, labels)]
    if not any(run.records for run in runs):
        raise ValueError(no_records(args.runs[0]))
    for folder, run in zip(args.runs, runs):
        if not run.records:
            print(f"note: {no_records(folder)}; left out of the figure", file=sys.stderr)
    runs = [run for run in runs if run.records]
    written = save_figure(curves_figure(runs), (args.out or run_figures(args.runs[0])) / "curves.png", args.pdf)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(command_line(main))
