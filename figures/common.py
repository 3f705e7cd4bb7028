"""What every figure module shares: the Agg backend, how figures are written and how user errors are reported."""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from source.files import refuse_link  # noqa: E402
from source.training.runlog import events  # noqa: E402

# OSError: a missing run folder or file, an --out that is a file, a read-only disk.
USER_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)
MAX_PATH_PARTS = 32  # of a resumed snapshot's path, followed back from a log that may come from elsewhere


def save_figure(figure: Figure, path: Path, pdf: bool = False) -> list[Path]:
    """Write ``path`` (and a PDF beside it on request), then free the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [refuse_link(target) for target in ([path, path.with_suffix(".pdf")] if pdf else [path])]
    for target in paths:
        figure.savefig(target, dpi=150)
    plt.close(figure)
    return paths


def finish_iteration_axes(figure: Figure, axes, titles: list[str], fontsize: float | None = None) -> None:
    """Title, "iteration" x label, a light grid and a legend on each panel, then a tight layout."""
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=fontsize)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a panel with nothing drawn yet (a study just begun) has none
            axis.legend(fontsize=8)
    figure.tight_layout()


def is_number(value) -> bool:
    """An int or float as the logs hold them (not a bool): what a figure reads from a file that may come from
    elsewhere is checked with it before it is plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def not_written_here(path: Path, iteration, what: str) -> ValueError:
    """The one-line error for a record that is not as this toolkit writes it."""
    return ValueError(f"{path}: the record of iteration {iteration}: {what}; the file is damaged or was not written "
                      f"by this toolkit")


def require_run_folder(run: Path) -> None:
    """Checked first, so a typo in RUN is named as such and no RUN/figures folder is created for it."""
    if run.is_file():
        raise FileNotFoundError(f"{run} is a file; give the run's folder")
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")


def command_line(main: Callable[[list[str] | None], object], argv: list[str] | None = None,
                 errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    """Exit status of ``main(argv)``: a user error is one ``error: ...`` line on stderr and status 2, as in
    train.py and evaluation.py; tracebacks are left for bugs."""
    try:
        main(argv)
    except errors as error:
        print("error: " + " ".join(str(error).splitlines()), file=sys.stderr)  # one line even if the message is not
        return 2
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def resumed_run(run_dir: Path, snapshot: Path) -> Path | None:
    """The run folder (one with a log) of a snapshot that ``run_dir`` resumed. train.py records the path as given,
    absolute or relative to where it ran, and run folders move between machines: tried as given, then its last
    parts (the most specific first) from here and from each folder above the resumed run (a branch lies beside its
    parent)."""
    bases = [Path.cwd()] + list(run_dir.resolve().parents)
    parts = (snapshot.parts[1:] if snapshot.is_absolute() else snapshot.parts)[-MAX_PATH_PARTS:]
    tails = [Path(*parts[start:]) for start in range(len(parts))]
    candidates = ([snapshot] if snapshot.is_absolute() else []) + [base / tail for tail in tails for base in bases]
    for candidate in candidates:
        try:
            folder = candidate.resolve().parent.parent
            if (folder / "log.jsonl").is_file():
                return folder
        except (OSError, ValueError):  # a log from elsewhere: a NUL in the path, a loop of links, no permission
            continue
    return None


def ancestors(run_dir: Path) -> list[tuple[Path, int]]:
    """The runs a branch continues, nearest first, each with the last of its iterations that the branch took over:
    a run resumed from another run's snapshot (SR switched on at the SN run's 40k, as in the SRGANs README) has that
    run's history up to there. [] for a run that never branched, or whose parent is no longer found."""
    lineage: list[tuple[Path, int]] = []
    seen, current, until = {run_dir.resolve()}, run_dir, None
    while (origin := _branch_origin(current)) is not None and origin[0] not in seen:  # a loop of logs ends it
        parent, at = origin
        until = at if until is None else min(until, at)
        lineage.append((parent, until))
        seen.add(parent)
        current = parent
    return lineage


def _branch_origin(run_dir: Path) -> tuple[Path, int] | None:
    """(parent folder, iteration) of the first "resumed" event that names another run's snapshot."""
    for event in events(run_dir, "resumed"):
        snapshot = event.get("snapshot")
        parent = resumed_run(run_dir, Path(snapshot)) if isinstance(snapshot, str) and snapshot else None
        if parent is not None and parent != run_dir.resolve() and isinstance(event.get("iteration"), int):
            return parent, event["iteration"]
    return None


def run_names(runs: list[Path]) -> list[str]:
    """Names for runs shown together: each folder's name, with as many parent folders as it takes to tell them
    apart ("a/run" and "b/run" rather than "run" twice); the same folder twice is an error."""
    resolved = [Path(run).resolve() for run in runs]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"the same run folder is given twice: {' '.join(str(run) for run in runs)}")
    depth = 1
    while True:
        names = ["/".join(path.parts[-depth:]) for path in resolved]
        if len(set(names)) == len(names) or depth >= max(len(path.parts) for path in resolved):
            return names
        depth += 1
