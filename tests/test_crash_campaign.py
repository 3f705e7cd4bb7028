"""kill -9 campaign: a run SIGKILLed again and again (mid-iteration, mid-snapshot, mid-log-rewrite, mid-export)
and resumed in place each time ends exactly as a run never interrupted, with no temp files left behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from source.training.checkpoint import load_snapshot, snapshot_iteration, snapshots_of
from source.training.runlog import read_jsonl
from test_training import tiny_argv

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 20  # iterations of the run; a snapshot after every one
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
DEADLINE_S = 120  # for any one process to reach the moment it is killed at

# train.py with os.replace blocked for good when it is about to rename a temp file whose name starts with
# $CRASH_FREEZE: the process then sits inside an atomic write (temp file complete, target not yet replaced),
# so the SIGKILL that follows lands there deterministically, however slow the machine.
FROZEN_TRAIN = """
import os, runpy, sys, threading
prefix, replace = os.environ["CRASH_FREEZE"], os.replace
def frozen_replace(src, dst, *args, **kwargs):
    if os.path.basename(str(src)).startswith(prefix):
        threading.Event().wait()  # until SIGKILL
    return replace(src, dst, *args, **kwargs)
os.replace = frozen_replace
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob(".*.tmp") if p.is_file())


def newest_snapshot(out: Path) -> Path:
    """The newest snapshot_iter_N.pt; it must load as a full snapshot of iteration N."""
    newest = snapshots_of(out)[-1]
    assert load_snapshot(newest, training_state=True)["iteration"] == snapshot_iteration(newest)
    return newest


class Process:
    """train.py (or the frozen variant) in its own session, output to a file."""

    def __init__(self, log: Path, argv: list[str], freeze: str | None = None):
        self.log = log
        command = [sys.executable, "train.py", *argv] if freeze is None else \
            [sys.executable, "-c", FROZEN_TRAIN, *argv]
        env = ENV if freeze is None else {**ENV, "CRASH_FREEZE": freeze}
        with open(log, "wb") as output:
            self.popen = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_for(self, condition, what: str, poll_s: float = 0.002) -> None:
        """Poll until ``condition()``; the process must still be running (it is killed, never finishes)."""
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert self.popen.poll() is None, f"exited ({self.popen.returncode}) before {what}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s:\n{self.output()}"
            time.sleep(poll_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=60)

    def finish(self) -> int:
        try:
            return self.popen.wait(timeout=DEADLINE_S)
        finally:
            self.kill()


def loss_records(out: Path) -> list[tuple]:
    return [(r["iteration"], r["loss_dis"], r["loss_gen"]) for r in read_jsonl(out / "log.jsonl") if "loss_dis" in r]


@pytest.mark.slow
def test_kill_9_campaign_resumes_in_place_to_the_uninterrupted_result(tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    settings = ("snapshot_interval=1", "evaluation.metrics=[]")
    snaps = out / "snapshots"
    processes = []

    def start(name, argv, freeze=None):
        processes.append(Process(tmp_path / f"{name}.out", argv, freeze))
        return processes[-1]

    def resume(name, freeze=None):
        return start(name, ["--resume", str(newest_snapshot(out))], freeze)

    try:
        # 1. A fresh run, killed as soon as it is seen writing a snapshot after snapshot 3 (mid-write when the poll
        #    catches its temp file, else after snapshot 6): any moment must leave a loadable newest snapshot.
        run = start("fresh", tiny_argv(out, TOTAL, *settings))
        run.wait_for(lambda: (snaps / "snapshot_iter_3.pt").exists(), "snapshot 3")
        run.wait_for(lambda: any(snaps.glob(".snapshot_iter_*.tmp")) or (snaps / "snapshot_iter_6.pt").exists(),
                     "a snapshot being written", poll_s=0)
        run.kill()
        n1 = snapshot_iteration(newest_snapshot(out))
        assert 3 <= n1 <= TOTAL - 5

        # 2. Killed while snapshot n1 + 3 is being written: its log line is out, the snapshot is not.
        run = resume("resume1", freeze=f".snapshot_iter_{n1 + 3}.pt.")
        run.wait_for(lambda: any(snaps.glob(f".snapshot_iter_{n1 + 3}.pt.*.tmp")), f"snapshot {n1 + 3} being written")
        run.kill()
        assert not (snaps / f"snapshot_iter_{n1 + 3}.pt").exists()
        assert snapshot_iteration(newest_snapshot(out)) == n1 + 2
        assert loss_records(out)[-1][0] == n1 + 3, "the log is a record ahead of the newest snapshot"
        assert [p.parent for p in temp_files(out)] == [snaps]

        # 3. Killed while the resume rewrites log.jsonl without that record: the old log stays whole.
        log_before = (out / "log.jsonl").read_bytes()
        run = resume("resume2", freeze=".log.jsonl.")
        run.wait_for(lambda: any(out.glob(".log.jsonl.*.tmp")), "the log being rewritten")
        run.kill()
        assert [p.parent for p in temp_files(out)] == [out], "the previous round's temp file is gone"
        assert (out / "log.jsonl").read_bytes() == log_before
        n2 = snapshot_iteration(newest_snapshot(out))
        assert n2 == n1 + 2

        # 4. Killed while the generator export of iteration n2 + 2 is written (before its snapshot, so that a
        #    snapshot on disk always has its export): the newest snapshot is n2 + 1, with its export.
        run = resume("resume3", freeze=f".generator_iter_{n2 + 2}.pt.")
        run.wait_for(lambda: any(snaps.glob(f".generator_iter_{n2 + 2}.pt.*.tmp")), f"export {n2 + 2} being written")
        run.kill()
        assert snapshot_iteration(newest_snapshot(out)) == n2 + 1
        assert (snaps / f"generator_iter_{n2 + 1}.pt").exists()
        assert not (snaps / f"generator_iter_{n2 + 2}.pt").exists()
        assert n2 + 2 < TOTAL

        # The last resume runs to the end; so does an uninterrupted run to compare with.
        assert resume("resume4").finish() == 0, processes[-1].output()
        assert start("straight", tiny_argv(straight, TOTAL, *settings)).finish() == 0, processes[-1].output()
    finally:
        for process in processes:
            process.kill()

    assert temp_files(out) == []
    assert snapshot_iteration(newest_snapshot(out)) == TOTAL
    records = loss_records(out)
    assert [r[0] for r in records] == list(range(1, TOTAL + 1)), "one loss record per iteration, in order"
    assert records == loss_records(straight), "the same losses as the uninterrupted run"
    resumed = [e["iteration"] for e in read_jsonl(out / "log.jsonl") if e.get("event") == "resumed"]
    assert resumed == [n1, n2, n2 + 1], "resume 2, killed before it trained, logged no event"
    a = load_snapshot(snaps / f"snapshot_iter_{TOTAL}.pt", training_state=True)
    b = load_snapshot(straight / "snapshots" / f"snapshot_iter_{TOTAL}.pt", training_state=True)
    for key in ("gen", "dis"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for key in ("opt_gen", "opt_dis"):
        for p, state in a[key]["state"].items():
            assert all(torch.equal(v, b[key]["state"][p][k]) for k, v in state.items())
