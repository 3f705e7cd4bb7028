"""The run folder's ``log.jsonl`` and ``metrics.jsonl`` (plus tensorboardX mirrors of the scalars).

Plots and tools read only these files, so every record carries its iteration; events (SR switched
on, collapse detected, resume, interruption) are records with an ``"event"`` field.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from source.files import atomic_write_text
from source.typed import first_line


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

    def purge_after(self, iteration: int) -> None:
        """A run continued in place at ``iteration``: TensorBoard hides the scalars past it that the interrupted
        session wrote (its reader drops earlier events at or after a writer's purge step), as ``truncate_after``
        drops them from the jsonl files; the new session's values are then the only ones shown."""
        if not self.enabled:
            return
        self.close()
        self._tb = self._writer(purge_step=iteration + 1)

    def _writer(self, purge_step: int | None = None):
        from tensorboardX import SummaryWriter
        self.out.mkdir(parents=True, exist_ok=True)
        return SummaryWriter(str(self.out / "tb"), purge_step=purge_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _scalars(self, record: dict) -> None:
        if "iteration" not in record or "event" in record:
            return
        if self._tb is None:
            self._tb = self._writer()
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, record["iteration"])
        self._tb.flush()


class DamagedLog(ValueError):
    """A log line that is not a record this toolkit writes (one line: file, line number, why)."""


def read_jsonl(path: Path, note_torn: bool = False) -> list[dict]:
    """The records of ``path`` ([] when missing); a half-written last line (training still running) is skipped,
    with a note on stderr when ``note_torn``. Every record is a mapping whose iteration, where it has one, is an
    int (what the readers rely on); anything else, or a broken line before the last, is a ``DamagedLog``."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                if note_torn:
                    print(f"note: {path}:{number} is cut off (a crash or a run still writing it); skipped",
                          file=sys.stderr)
                break
            raise DamagedLog(f"{path}:{number} is not valid JSON ({error})") from None
        except RecursionError:
            raise DamagedLog(f"{path}:{number} is nested too deeply to be a log record") from None
        except ValueError as error:  # an integer of more digits than Python converts
            raise DamagedLog(f"{path}:{number} is not a log record ({first_line(error)})") from None
        if not isinstance(record, dict) or type(record.get("iteration", 0)) is not int:
            raise DamagedLog(f"{path}:{number} is not a log record (a mapping with an integer iteration)")
        records.append(record)
    return records


def events(run_dir: Path, name: str) -> list[dict]:
    """The run's ``{"event": name}`` records, e.g. "sr_start" or "resumed"."""
    return [r for r in read_jsonl(Path(run_dir) / "log.jsonl") if r.get("event") == name]


def sr_start(run_dir: Path) -> int | None:
    """The first iteration at which SR was on in this run, if ever."""
    starts = [int(e["iteration"]) for e in events(run_dir, "sr_start")]
    return min(starts) if starts else None


def truncate_after(path: Path, iteration: int) -> None:
    """Drop records beyond ``iteration``: a run resumed in place rewrites its history from there."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("iteration", 0) <= iteration]
    torn = Path(path).is_file() and not Path(path).read_bytes().endswith(b"\n")  # a crash cut the last line
    if len(kept) != len(records) or torn:  # atomic: a kill during the rewrite leaves the old log, never an empty one
        atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in kept))
