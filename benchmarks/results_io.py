"""How the CPU benchmarks report: the result printed as JSON and written to its results file."""
from __future__ import annotations

import json
from pathlib import Path


def save_result(result: dict, out: Path) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
