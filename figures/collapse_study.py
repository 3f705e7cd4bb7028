"""The collapse study's report (docs/collapse.md, "GPU study"): per setting and arm, over seeds.

    python -m figures.collapse_study configs/collapse/gpu_study.yaml [--root results/gpu_study] [--out docs/collapse]

Reads each run's ``log.jsonl`` (D's collapse scores, detected collapses, SR's start) and ``classifier_modes.jsonl``
(the classifier measures) and writes, in --out:
- ``gpu_study_<setting>_curves.png``: D's mean collapse score, modes, diversity and classifier FID over
  iterations, every seed of every arm (a branch drawn from its branch point, its parent's part before it);
- ``data/gpu_study_summary.json``: per run its series and landmarks; per arm the seeds' collapse iterations
  (or none), and mean ± sample std over seeds of the measures at the end and just before the collapse;
and prints the summary as a markdown table. Runs still going are summarized as far as they got.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from figures.common import USER_ERRORS, command_line, finish_iteration_axes, plt, save_figure
from source.config import ConfigError
from source.study.state import first_collapse, run_folder
from source.study.spec import Run, Study, load_study
from source.training.runlog import events, read_jsonl, sr_start

SCORE = "collapse_score/dis/mean"
MEASURES = ("modes", "diversity", "classifier_FID")


def series(folder: Path) -> dict:
    """One run's collapse scores and classifier measures over iterations, and where its SR started."""
    log = read_jsonl(folder / "log.jsonl")
    modes = read_jsonl(folder / "classifier_modes.jsonl")
    return {"score": [[r["iteration"], r[SCORE]] for r in log if SCORE in r],
            "measures": [{"iteration": r["iteration"], **{m: r[m] for m in MEASURES}} for r in modes],
            "collapse": first_collapse(folder),
            "sr_start": sr_start(folder),
            "resumed": next((r["iteration"] for r in events(folder, "resumed")), None),
            "reached": max([r["iteration"] for r in log if "loss_dis" in r], default=0)}


def run_series(study: Study, root: Path, run: Run) -> dict:
    """A branch's own series with its parent's up to the branch point in front (the run as a whole)."""
    own = series(run_folder(root, run))
    start = own.pop("resumed")
    if run.parent is None or start is None:
        return own
    parent = series(run_folder(root, study.run(run.parent)))
    own["score"] = [p for p in parent["score"] if p[0] <= start] + own["score"]
    own["measures"] = [m for m in parent["measures"] if m["iteration"] <= start] + own["measures"]
    own["branched_at"] = start
    return own


def landmarks(data: dict) -> dict:
    """The measures at the end, and at the last record before the first collapse (when there was one)."""
    measures = data["measures"]
    before = [m for m in measures if data["collapse"] is not None and m["iteration"] < data["collapse"]]
    return {"end": measures[-1] if measures else None, "before_collapse": before[-1] if before else None}


def mean_std(values: list[float]) -> list[float] | None:
    """[mean, sample std] (std 0 for one value); None for none."""
    if not values:
        return None
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def summarize(study: Study, root: Path) -> dict:
    runs, arms = {}, {}
    for run in study.runs:
        data = run_series(study, root, run)
        data.update(landmarks(data))
        runs[run.name] = data
        arms.setdefault(f"{run.setting}/{run.arm}", []).append(data)
    summary = {}
    for name, seeds in arms.items():
        collapses = [d["collapse"] for d in seeds if d["collapse"] is not None]
        row = {"seeds": len(seeds), "reached": [d["reached"] for d in seeds], "collapses": [d["collapse"] for d in seeds],
               "collapse_iteration": mean_std(collapses)}
        for when in ("end", "before_collapse"):
            row[when] = {m: mean_std([d[when][m] for d in seeds if d[when]]) for m in MEASURES}
        summary[name] = row
    return {"study": str(study.path), "arms": summary, "runs": runs}


def _cell(value: list[float] | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = ["| setting/arm | iterations reached | collapsed (iteration) | modes (end) | diversity (end) | "
             "classifier FID (end) |", "|---|---|---|---|---|---|"]
    for name, row in summary["arms"].items():
        collapsed = [c for c in row["collapses"] if c is not None]
        shown = f"{len(collapsed)} of {row['seeds']}" + (f" ({', '.join(map(str, collapsed))})" if collapsed else "")
        end = row["end"]
        lines.append(f"| {name} | {', '.join(map(str, row['reached']))} | {shown} | {_cell(end['modes'], 1)} | "
                     f"{_cell(end['diversity'])} | {_cell(end['classifier_FID'], 1)} |")
    return "\n".join(lines)


def curves_figure(study: Study, summary: dict, setting: str) -> plt.Figure:
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    arms = list(dict.fromkeys(run.arm for run in study.runs if run.setting == setting))
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for run in (r for r in study.runs if r.setting == setting):
        data, color = summary["runs"][run.name], colors[run.arm]
        label = run.arm if run.seed == study.spec.seeds[0] else None
        if data["score"]:
            axes[0].plot(*zip(*data["score"]), color=color, alpha=0.8, linewidth=1, label=label)
        for axis, measure in zip(axes[1:], MEASURES):
            points = [(m["iteration"], m[measure]) for m in data["measures"]]
            if points:
                axis.plot(*zip(*points), color=color, alpha=0.8, linewidth=1, label=label)
        for marker in (data["collapse"], data.get("branched_at")):
            if marker is not None:
                axes[0].axvline(marker, color=color, linestyle=":", linewidth=1)
    titles = ["D collapse score (mean $s_i/s_1$, $i \\geq 2$)", "modes (classes >= 2 % of samples)",
              "diversity (generated / real, classifier features)", "classifier FID"]
    finish_iteration_axes(figure, axes, [f"{setting}: {title}" for title in titles], fontsize=10)
    return figure


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--root", type=Path, help="the study's runs (default results/<study name>)")
    parser.add_argument("--out", type=Path, default=Path("docs/collapse"))
    args = parser.parse_args(argv)
    study = load_study(args.study)
    root = args.root or Path("results") / study.path.stem
    if not root.is_dir():
        raise FileNotFoundError(f"study folder {root} does not exist; run the study first (python -m source.study)")
    summary = summarize(study, root)
    for setting in dict.fromkeys(run.setting for run in study.runs):
        save_figure(curves_figure(study, summary, setting), args.out / f"{study.path.stem}_{setting}_curves.png")
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    (args.out / "data" / f"{study.path.stem}_summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    sys.exit(command_line(main, errors=USER_ERRORS + (ConfigError,)))
