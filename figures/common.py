"""What every figure module shares: the Agg backend and how figures are written."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save_figure(figure: Figure, path: Path, pdf: bool = False) -> list[Path]:
    """Write ``path`` (and a PDF beside it on request), then free the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [path, path.with_suffix(".pdf")] if pdf else [path]
    for target in paths:
        figure.savefig(target, dpi=150)
    plt.close(figure)
    return paths
