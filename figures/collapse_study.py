"""The collapse study's report (docs/collapse.md, "GPU study"): per setting and arm, over seeds.

    python -m figures.collapse_study configs/collapse/gpu_study.yaml [--root results/gpu_study] [--out FOLDER]
    python -m figures.collapse_study configs/collapse/gpu_study.yaml --out docs/collapse   # the committed report

Reads each run's ``log.jsonl`` (D's collapse scores, detected collapses, SR's start) and ``classifier_modes.jsonl``
(the classifier measures) and writes, in --out (default: the study folder's ``figures``), named after the study
file (STUDY: ``gpu_study`` here):
- ``STUDY_<setting>_curves.png``: D's mean collapse score, modes, diversity and classifier FID over
  iterations, every seed of every arm (a branch drawn from its branch point, its parent's part before it);
- ``STUDY_<setting>_spectra.png``: the SRGANs fig3/fig4 analogue, D's last conv's normalized spectra over
  iterations for the first seed's baseline (the study's first arm) and, beside it, its first branch once that has
  started (SR's curves dashed), else its run of the second arm (``spectra_runs``);
- ``data/STUDY_summary.json``: per run its series and landmarks; per arm the seeds' collapse iterations
  (or none), and mean ± sample std over its started seeds of the measures at the last iteration all of them
  reached and just before each collapse; per chunk run so far (``chunks.jsonl``) its wall time, runs and the
  iterations they trained in it (the study's measured pace);
and prints the summary as a markdown table. Runs still going are summarized as far as they got.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from figures.common import USER_ERRORS, command_line, finish_iteration_axes, plt, save_figure
from figures.spectra import choose_iterations, read_run, resolve_layer, spectra_figure
from source.config import ConfigError
from source.study.state import (chunk_code, chunk_device, first_collapse, latest_iteration, logged_iteration,
                                run_folder)
from source.spectral.spectra import list_spectra
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
            # as the study's status: a chunk's stop leaves a snapshot between log lines (every display_interval)
            "reached": max(logged_iteration(folder), latest_iteration(folder))}


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


def landmarks(data: dict, common: int | None) -> dict:
    """The measures at the arm's common iteration (the last record at or before it), and at the last record
    before the first collapse (when there was one)."""
    measures = data["measures"]
    at = [m for m in measures if common is not None and m["iteration"] <= common]
    before = [m for m in measures if data["collapse"] is not None and m["iteration"] < data["collapse"]]
    return {"at_common": at[-1] if at else None, "before_collapse": before[-1] if before else None}


def mean_std(values: list[float]) -> dict | None:
    """Mean, sample std (None below two values: one seed has no spread) and how many values; None for none."""
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def common_iteration(seeds: list[dict]) -> int | None:
    """The last measured iteration that every started seed of an arm has reached: seeds compared at one point of
    their training, not a finished seed's end beside a running one's."""
    ends = [d["measures"][-1]["iteration"] for d in seeds if d["reached"] and d["measures"]]
    return min(ends) if ends else None


def summarize(study: Study, root: Path) -> dict:
    runs, arms = {}, {}
    for run in study.runs:
        runs[run.name] = run_series(study, root, run)
        arms.setdefault(f"{run.setting}/{run.arm}", []).append(runs[run.name])
    summary = {}
    for name, seeds in arms.items():
        common = common_iteration(seeds)
        for data in seeds:
            data.update(landmarks(data, common))
        started = [d for d in seeds if d["reached"]]
        collapses = [d["collapse"] for d in started if d["collapse"] is not None]
        row = {"seeds": len(seeds), "started": len(started), "reached": [d["reached"] for d in seeds],
               "branched_at": [d.get("branched_at") for d in seeds],
               "collapses": [d["collapse"] for d in seeds], "collapse_iteration": mean_std(collapses),
               "common_iteration": common}
        for when in ("at_common", "before_collapse"):
            row[when] = {m: mean_std([d[when][m] for d in started if d[when]]) for m in MEASURES}
        summary[name] = row
    return {"study": str(study.path), "arms": summary, "runs": runs, "chunks": chunk_paces(root)}


def chunk_paces(root: Path) -> list[dict]:
    """Per chunk of ``chunks.jsonl``: when, how long, how its runs shared the machine, and their iterations."""
    paces = []
    for chunk in read_jsonl(root / "chunks.jsonl"):
        runs = chunk.get("runs") if isinstance(chunk.get("runs"), dict) else {}
        trained = {name: run["to"] - run["from"] for name, run in runs.items()  # a branch that failed before its
                   if isinstance(run, dict) and isinstance(run.get("to"), int)  # first snapshot ends below its start
                   and isinstance(run.get("from"), int) and run["to"] > run["from"]}
        wall = chunk.get("wall_s") if isinstance(chunk.get("wall_s"), (int, float)) else None
        iterations = sum(trained.values())
        paces.append({"started": chunk.get("started"), "wall_s": wall, "per_process": chunk.get("per_process"),
                      "performance": chunk.get("performance"), "runs": len(trained), "iterations": iterations,
                      "iterations_per_s": round(iterations / wall, 1) if wall else None,
                      "device": chunk_device(chunk), "code": chunk_code(chunk)})
    return paces


def _cell(value: dict | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    spread = "" if value["std"] is None else f" ± {value['std']:.{digits}f}"
    return f"{value['mean']:.{digits}f}{spread} (n={value['n']})"


def markdown(summary: dict) -> str:
    lines = ["Measures over an arm's started seeds at the last iteration all of them reached (mean ± sample std, n "
             "seeds), and just before each collapse (the seeds that collapsed); collapsed: of the seeds that started; "
             "a branch's iterations reached with where it left its parent.",
             "", "| setting/arm | iterations reached | collapsed (iteration) | compared at | modes | diversity | "
             "classifier FID | modes before collapse | diversity before collapse |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["arms"].items():
        collapsed = [c for c in row["collapses"] if c is not None]
        shown = f"{len(collapsed)} of {row['started']}" + (f" ({', '.join(map(str, collapsed))})" if collapsed else "")
        if row["started"] < row["seeds"]:
            shown += f"; {row['seeds'] - row['started']} not started"
        at, before = row["at_common"], row["before_collapse"]
        reached = [f"{r} (from {b})" if b is not None else str(r) for r, b in zip(row["reached"], row["branched_at"])]
        lines.append(f"| {name} | {', '.join(reached)} | {shown} | "
                     f"{'–' if row['common_iteration'] is None else row['common_iteration']} | {_cell(at['modes'], 1)} | "
                     f"{_cell(at['diversity'])} | {_cell(at['classifier_FID'], 1)} | {_cell(before['modes'], 1)} | "
                     f"{_cell(before['diversity'])} |")
    for chunk in (c for c in summary["chunks"] if c["iterations_per_s"] is not None):
        where = "".join(f" {label} {chunk[key]}" for label, key in (("on", "device"), ("with", "code"))
                        if chunk.get(key))
        lines.append(f"\nchunk of {chunk['started']}{where}: {chunk['runs']} runs trained {chunk['iterations']} "
                     f"iterations in {chunk['wall_s']} s ({chunk['iterations_per_s']} iterations/s in all)")
    return "\n".join(lines)


def spectra_runs(study: Study, root: Path, setting: str) -> list[Path]:
    """The run folders of the fig3/fig4 analogue that hold spectra: the first seed's run of the study's first arm
    and that seed's first branch of it where the branch started, else its run of the next arm that is not a
    branch."""
    seed = study.spec.seeds[0]
    base, *others = [run for run in study.runs if run.setting == setting and run.seed == seed]
    branch = next((r for r in others if r.parent == base.name and list_spectra(run_folder(root, r))), None)
    beside = branch or next((r for r in others if r.parent is None), None)
    return [run_folder(root, r) for r in (base, beside) if r is not None and list_spectra(run_folder(root, r))]


def spectra_figure_of(folders: list[Path]) -> plt.Figure:
    runs = [read_run(folder) for folder in folders]
    layer, index = resolve_layer(next(iter(runs[0].records.values())), "dis", None)  # D's last conv
    return spectra_figure(runs, "dis", layer, index, choose_iterations(runs, None))


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
    titles = ["D collapse score (mean over convs of mean $s_i/s_1$, $i \\geq 2$)", "modes (classes >= 2 % of samples)",
              "diversity (generated / real, classifier features)", "classifier FID"]
    finish_iteration_axes(figure, axes, [f"{setting}: {title}" for title in titles], fontsize=10)
    return figure


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m figures.collapse_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--root", type=Path, help="the study's runs (default results/<study name>)")
    parser.add_argument("--out", type=Path, help="the report's folder (default ROOT/figures)")
    args = parser.parse_args(argv)
    study = load_study(args.study)
    root = args.root or Path("results") / study.name
    if not root.is_dir():
        raise FileNotFoundError(f"study folder {root} does not exist; run the study first (python -m source.study)")
    if not (root / "chunks.jsonl").is_file():  # a report of nothing would replace one of something (docs/collapse)
        raise FileNotFoundError(f"{root} holds no chunk of the study yet; nothing written (a fresh checkout: "
                                "`python -m source.study status STUDY` unpacks a study's saved state)")
    args.out = args.out or root / "figures"
    summary = summarize(study, root)
    for setting in dict.fromkeys(run.setting for run in study.runs):
        save_figure(curves_figure(study, summary, setting), args.out / f"{study.name}_{setting}_curves.png")
        folders = spectra_runs(study, root, setting)
        if folders:
            save_figure(spectra_figure_of(folders), args.out / f"{study.name}_{setting}_spectra.png")
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    (args.out / "data" / f"{study.name}_summary.json").write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    sys.exit(command_line(main, errors=USER_ERRORS + (ConfigError,)))
