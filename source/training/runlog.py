"""The run folder's ``log.jsonl`` and ``metrics.jsonl`` (plus tensorboardX mirrors of the scalars).

Plots and tools read only these files, so every record carries its iteration; events (SR switched
on, collapse detected, resume, interruption) are records with an ``"event"`` field.
"""
from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, out: Path, enabled: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self._tb = None

    def write(self, record: dict, file: str = "log.jsonl") -> None:
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._scalars(record)

    def event(self, iteration: int, name: str, **fields) -> None:
        self.write({"iteration": iteration, "event": name, **fields})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _scalars(self, record: dict) -> None:
        if "iteration" not in record or "event" in record:
            return
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.out / "tb"))
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, record["iteration"])
        self._tb.flush()


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, iteration: int) -> None:
    """Drop records beyond ``iteration``: a run resumed in place rewrites its history from there."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("iteration", 0) <= iteration]
    if len(kept) != len(records):
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))
