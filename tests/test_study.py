"""Studies in chunks (python -m source.study): the file, stops and continuation, branches, pruning, transfer."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from source import provenance
from source.config import ConfigError, load_config
from source.study import __main__ as study_cli
from source.study import continuation, processes, runner, state, transfer
from source.study.state import PIDS
from source.study.spec import load_study
from source.training.checkpoint import load_snapshot, snapshots_of
from source.training.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
BASE = "configs/collapse/fmnist_cifar_recipe_ch32.yaml"
# the collapse study's base, shrunk to seconds on synthetic data; deterministic, so chunks can be compared bit for bit
TOY = ["dataset.name=synthetic", "dataset.args={n_classes: 10, size: 32, channels: 1, count: 64}",
       "models.generator.args.ch=4", "models.discriminator.args.ch=4", "batchsize=4", "gen_batchsize=8",
       "micro_batchsize=4", "snapshot_interval=2", "spectra_interval=2", "display_interval=1",
       "evaluation.modes_interval=0", "updater.n_dis=1", "preview_interval=1000", "deterministic=true"]


def write_study(tmp_path: Path, iterations: int, **arms) -> Path:
    arms = arms or {"sn": {}, "resumed": {"branch": "sn", "at": 2, "set": ["updater.apply_SR=true"]}}
    study = {"base": str(ROOT / BASE), "seeds": [0], "set": TOY + [f"iteration={iterations}"],
             "settings": {"tiny": []}, "arms": arms}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.mark.parametrize("arms, message", [
    ({"sn": {"sett": []}}, "arms.sn.sett: unknown key"),
    ({"sn": {}, "b": {"branch": "sm"}}, "arms.b.branch: 'sm' is not another arm of the study .did you mean 'sn'"),
    ({"sn": {}, "b": {"branch": "sn"}, "c": {"branch": "b"}}, "b is itself a branch"),
    ({"sn": {"set": ["adam_G.alpah=1"]}}, "arm sn, seed 0.*adam_G.alpah"),
    ({"sn": {}, "b": {"branch": "sn", "at": 9}}, "arms.b.at: 9 is not before the run's end"),
    ({"sn": {"set": ["performance.compile=true"]}}, "performance.compile=true: how the arithmetic runs is chosen per"),
])
def test_study_file_problems_are_one_line_errors(tmp_path, arms, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_study(write_study(tmp_path, 9, **arms))
    assert "\n" not in str(error.value)


def test_runs_at_a_time_default_to_the_cores_without_a_gpu_and_16_with_one(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study_cli.parse_args(["run", "study.yaml"]).parallel == 2
    assert study_cli.parse_args(["device", "s.yaml", "--carry", "c", "--out", "o", "--parallel", "5",
                                 "--budget", "9"]).parallel == 5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert study_cli.parse_args(["run", "study.yaml"]).parallel == 16


def test_a_study_that_multiplies_into_too_many_runs_is_refused_before_any_config_is_built(tmp_path):
    path = write_study(tmp_path, 9, **{f"arm{index}": {} for index in range(11)})
    study = yaml.safe_load(path.read_text())
    study.update(settings={f"s{index}": [] for index in range(10)}, seeds=list(range(10)))
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match="10 settings x 11 arms x 10 seeds = 1100 runs; a study holds at most 1000"):
        load_study(path)


def test_a_branch_leaves_its_parent_at_the_detectors_last_healthy_check_whatever_chunk_stops_left(tmp_path):
    path = write_study(tmp_path, 50000, sn={}, resumed={"branch": "sn", "at": "collapse"})
    study_file = yaml.safe_load(path.read_text())
    study_file["set"].append("spectra_interval=1000")
    path.write_text(yaml.safe_dump(study_file, sort_keys=False))
    study = load_study(path)
    parent, branch = study.runs
    folder = state.run_folder(tmp_path, parent)
    (folder / "snapshots").mkdir(parents=True)
    for iteration in (11000, 12000, 12345):  # 12345: where a chunk's stop left one
        for kind in ("snapshot", "generator"):
            (folder / "snapshots" / f"{kind}_iter_{iteration}.pt").write_bytes(b"")
    assert state.status(study, tmp_path, branch) == "waiting"
    assert [p.name for p in state.prune(study, tmp_path)] == ["snapshot_iter_11000.pt", "generator_iter_11000.pt"]
    records = [{"iteration": 14000, "loss_dis": 1.0}, {"iteration": 13000, "event": "collapse", "layers": ["x"]},
               {"iteration": 14000, "event": "collapse", "layers": ["y"]}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert state.branch_snapshot(study, tmp_path, branch).name == "snapshot_iter_12000.pt"  # checked healthy
    assert state.status(study, tmp_path, branch) == "ready" and state.prune(study, tmp_path) == []
    (folder / "log.jsonl").write_text(json.dumps(records[0]) + "\n")
    (folder / "snapshots" / "snapshot_iter_50000.pt").write_bytes(b"")  # the parent ended without a collapse
    assert state.status(study, tmp_path, branch) == "never"


def test_status_says_how_much_of_the_study_is_trained_and_how_long_the_rest_takes_at_the_last_chunks_rate(
        tmp_path, capsys):
    path = write_study(tmp_path, 50000, sn={}, resumed={"branch": "sn", "at": "collapse"}, lr={})
    study_file = yaml.safe_load(path.read_text())
    study_file["set"].append("spectra_interval=1000")
    path.write_text(yaml.safe_dump(study_file, sort_keys=False))
    study = load_study(path)
    folder = state.run_folder(tmp_path, study.run("tiny/sn_s0"))
    (folder / "snapshots").mkdir(parents=True)
    for iteration in (12000, 14000):
        (folder / "snapshots" / f"snapshot_iter_{iteration}.pt").write_bytes(b"")
    (folder / "log.jsonl").write_text(json.dumps({"iteration": 14000, "event": "collapse", "layers": ["x"]}) + "\n")
    chunks = [{"runs": {"tiny/sn_s0": {"from": 0, "to": 14000}, "tiny/lr_s0": {"from": 0, "to": 0}}, "wall_s": 200,
               "machine": {"device": "NVIDIA H200"}},
              {"runs": {"tiny/lr_s0": {"from": 0}}, "wall_s": 5}, {"runs": "torn"}]  # the last two: no rate
    (tmp_path / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    assert state.start_iteration(study, tmp_path, study.run("tiny/resumed_s0")) == 12000  # the last healthy check
    rows = {row["run"]: row for row in state.progress_table(study, tmp_path)}
    assert (rows["tiny/resumed_s0"]["status"], rows["tiny/resumed_s0"]["iteration"]) == ("ready", 12000)
    outlook = state.outlook(study, tmp_path)
    # sn 14000 of 50000, lr 0 of 50000, the branch 0 of 50000 - 12000; 14000 iterations in 200 s
    assert (outlook["trained"], outlook["planned"], outlook["last_chunk_rate"]) == (14000, 138000, 70.0)
    assert outlook["counts"] == {"started": 1, "ready": 1, "fresh": 1}
    assert study_cli.main(["status", str(path), "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "14000 of 138000 iterations trained (10 %); at the last chunk's 70.0 iterations/s in all on NVIDIA H200, the "
        "rest takes about 30 min of chunks")
    chunks[0]["machine"] = "a chunk recorded before chunks named their machine"
    (tmp_path / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    assert state.outlook(study, tmp_path)["last_chunk_device"] is None
    assert study_cli.main(["status", str(path), "--root", str(tmp_path), "--arm", "sn"]) == 0  # the chosen runs only
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["tiny/sn_s0", "14000"]
    (folder / "log.jsonl").write_text("")  # no collapse: the branch waits and is not counted
    line = study_cli.outlook_line(state.outlook(study, tmp_path))
    assert line.startswith("14000 of 100000 iterations trained (14 %); runs 1 waiting")


def test_a_run_that_fails_is_not_relaunched_until_its_marker_is_deleted(tmp_path):
    study = load_study(write_study(tmp_path, 4, sn={"set": ["updater.collapse.threshold=0.5"]}))
    run = study.runs[0]
    lines = []
    bad = runner.run_chunk(study, tmp_path, parallel=1, python="false", echo=lines.append)  # exits with 1
    assert bad.runs[run.name]["returncode"] == 1 and any("not relaunched until" in line for line in lines)
    assert state.status(study, tmp_path, run) == "failed"
    assert runner.run_chunk(study, tmp_path, parallel=1, echo=lines.append).runs == {}
    path = write_study(tmp_path, 4, sn={})  # the command: exit status 1 while a chosen run has failed, for scripts
    assert study_cli.main(["run", str(path), "--root", str(tmp_path), "--budget", "60"]) == 1
    assert study_cli.main(["run", str(path), "--root", str(tmp_path), "--budget", "60", "--arm", "sn"]) == 1
    state.failure_marker(tmp_path, run).unlink()
    assert state.status(study, tmp_path, run) == "fresh"


def test_a_run_whose_snapshots_are_gone_says_it_starts_over(tmp_path):
    study = load_study(write_study(tmp_path, 2, sn={}))
    (run,) = study.runs
    runner.run_chunk(study, tmp_path, parallel=1, echo=lambda line: None)
    for path in (state.run_folder(tmp_path, run) / "snapshots").iterdir():
        path.unlink()
    lines = []
    runner.run_chunk(study, tmp_path, parallel=1, echo=lines.append)
    assert "tiny/sn_s0: its folder holds no snapshot; it starts over from iteration 0" in lines
    assert state.status(study, tmp_path, run) == "done"


def test_a_run_that_a_second_signal_stopped_at_once_is_not_marked_failed(tmp_path):
    """train.py exits 128 + N when a second signal stops it at once: a stop, continued in the next chunk."""
    study = load_study(write_study(tmp_path, 4, sn={}))
    stopped = tmp_path / "stopped_at_once"
    stopped.write_text("#!/bin/sh\nexit 143\n")
    stopped.chmod(0o755)
    lines = []
    chunk = runner.run_chunk(study, tmp_path, parallel=1, python=str(stopped), echo=lines.append)
    assert chunk.runs[study.runs[0].name]["returncode"] == 143 and not any("not relaunched" in line for line in lines)
    assert state.status(study, tmp_path, study.runs[0]) == "fresh"


def test_sigterm_to_the_runner_stops_its_runs_with_snapshots(tmp_path):
    """On the device machine too: the chunk that a signal stopped still packs its runs' snapshots for the way back."""
    study_file = write_study(tmp_path, 100000, sn={})
    root, carry, out = tmp_path / "runs", tmp_path / "carry", tmp_path / "out"
    carry.mkdir()
    (carry / transfer.CARRY_STUDY).write_text(json.dumps({"study": "study"}))
    out.mkdir()
    runner_process = subprocess.Popen([sys.executable, "-m", "source.study", "device", str(study_file), "--root",
                                       str(root), "--grace", "60", "--carry", str(carry), "--out", str(out),
                                       "--budget", "600"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    folder = root / "tiny" / "sn_s0"
    try:
        deadline = time.time() + 240
        while state.logged_iteration(folder) < 3:  # a signal before would meet a run still starting
            assert runner_process.poll() is None and time.time() < deadline, "the run did not train 3 iterations"
            time.sleep(0.5)
        ((pid, _),) = json.loads((root / PIDS).read_text()).values()
        # train.py leads a process group of its own (a kill reaches what it started; Ctrl-C at a terminal does not
        # reach it), in the runner's session: the device machine ends it with the call that started it
        assert os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(runner_process.pid)
        runner_process.send_signal(signal.SIGTERM)
        _, err = runner_process.communicate(timeout=120)
    finally:  # nothing left training for the rest of the suite
        if runner_process.poll() is None:
            runner_process.kill()
        for pid, _ in json.loads((root / PIDS).read_text()).values() if (root / PIDS).is_file() else ():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert runner_process.returncode == 130 and "stopped by SIGTERM" in err
    assert state.latest_iteration(folder) >= 3  # the run wrote its snapshot on the way out
    pids = json.loads((root / PIDS).read_text())
    assert pids == {}  # and nothing is left running
    assert json.loads((out / "progress.json").read_text())[0]["iteration"] == state.latest_iteration(folder)
    names = transfer.take_back(out, tmp_path / "back")
    assert f"tiny/sn_s0/snapshots/snapshot_iter_{state.latest_iteration(folder)}.pt" in names


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_just_after_a_run_starts_still_stops_that_run(tmp_path, monkeypatch, signum):
    # the handler raised before: landing between a run's start and its being recorded as running, it left that run
    # running unstopped (on the device machine, into the next call)
    study = load_study(write_study(tmp_path, 100000, sn={}))
    launch, started = runner._launch, []

    def signalled_on_launch(*args, **kwargs):
        started.append(launch(*args, **kwargs))
        signal.getsignal(signum)(signum, None)
        return started[-1]

    monkeypatch.setattr(runner, "_launch", signalled_on_launch)
    try:
        with pytest.raises(runner.ChunkInterrupted, match=signal.Signals(signum).name):
            runner.run_chunk(study, tmp_path / "runs", parallel=1, echo=lambda _: 0)
        assert len(started) == 1 and started[0].poll() is not None  # stopped and waited for
        assert json.loads((tmp_path / "runs" / PIDS).read_text()) == {}
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def test_a_chunk_stops_what_an_earlier_one_left_running_and_nothing_else_with_its_pid(tmp_path):
    # a process another chunk recorded, and one whose pid a running.json names but which started later (a pid
    # reused after a reboot, or a file from elsewhere): only the first is stopped
    ours, other = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train.py"])
                   for _ in range(2))
    try:
        started = processes.start_time(ours.pid)
        (tmp_path / PIDS).write_text(json.dumps({"b64/sn_s0": [ours.pid, started],
                                                        "b64/sr_s0": [other.pid, processes.start_time(other.pid) - 1],
                                                        "old/format": other.pid}))
        lines = []
        processes.stop_leftovers(tmp_path, grace=10, echo=lines.append)
        assert ours.wait(timeout=10) == -signal.SIGTERM and other.poll() is None
        assert lines == [f"b64/sn_s0: still running from an earlier chunk (pid {ours.pid}); stopping it"]
        assert not (tmp_path / PIDS).exists()
    finally:
        for process in (ours, other):
            process.kill()
            process.wait()


def test_chunks_stopped_anywhere_continue_in_place_and_end_as_straight_runs_do(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "REPORT_SECONDS", 0.0)  # a progress line at every poll
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)  # the stop below comes in time: a run's 40 take about 2 s
    study = load_study(write_study(tmp_path, 40))
    root = tmp_path / "runs"
    sn, resumed = study.runs
    sn_folder, branch_folder = state.run_folder(root, sn), state.run_folder(root, resumed)
    # chunk 1: stopped (SIGTERM) once the parent has a snapshot past the branch point; the branch may have started
    first = runner.run_chunk(study, root, parallel=2, stop=lambda: state.latest_iteration(sn_folder) >= 4,
                             echo=lambda _: 0)
    stopped = state.latest_iteration(sn_folder)
    assert 4 <= stopped < 40 and state.logged_iteration(sn_folder) == stopped
    assert any(r.get("event") == "interrupted" for r in read_jsonl(sn_folder / "log.jsonl"))
    state.prune(study, root)
    kept = [int(p.stem.rsplit("_", 1)[1]) for p in snapshots_of(sn_folder)]
    assert kept == ([stopped] if snapshots_of(branch_folder) else [2, stopped])  # 2: the branch has yet to start
    # chunk 2: until done; the parent continues in its own folder, the branch from the parent's snapshot at 2
    lines = []
    chunk = runner.run_chunk(study, root, parallel=2, echo=lines.append)
    assert any(" running, iterations " in line for line in lines)
    assert chunk.runs["tiny/sn_s0"]["from"] == stopped and chunk.runs["tiny/sn_s0"]["to"] == 40
    started_branch = first if "tiny/resumed_s0" in first.runs else chunk
    assert started_branch.runs["tiny/resumed_s0"]["from"] == 2  # where it left its parent, not its empty folder
    assert [row["status"] for row in state.progress_table(study, root)] == ["done", "done"]
    events = [r for r in read_jsonl(sn_folder / "log.jsonl") if r.get("event") == "resumed"]
    assert events[-1]["iteration"] == stopped and events[-1]["changes"] == []
    assert [r["iteration"] for r in read_jsonl(sn_folder / "log.jsonl") if "loss_dis" in r] == list(range(1, 41))
    branch_start = next(r for r in read_jsonl(branch_folder / "log.jsonl") if r.get("event") == "resumed")
    assert branch_start["iteration"] == 2 and branch_start["snapshot"].endswith("sn_s0/snapshots/snapshot_iter_2.pt")
    # the baseline stopped and continued is bit-identical to the same run in one go (same threads: also a chunk)
    (tmp_path / "straight").mkdir()
    straight = load_study(write_study(tmp_path / "straight", 40, sn={}))
    runner.run_chunk(straight, tmp_path / "straight", parallel=2, echo=lambda _: 0)
    a = load_snapshot(snapshots_of(sn_folder)[-1])
    b = load_snapshot(snapshots_of(state.run_folder(tmp_path / "straight", straight.runs[0]))[-1])
    assert a["iteration"] == b["iteration"] == 40
    assert all(torch.equal(a[net][k], b[net][k]) for net in ("gen", "dis") for k in a[net])


def test_a_chunks_performance_settings_reach_every_run_which_continues_in_place_and_a_compiled_lead_goes_first(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)  # the first chunk's stop comes before a run's 60 iterations
    study = load_study(write_study(tmp_path, 60, a={}, b={"set": ["updater.apply_SR=true"]}))
    root = tmp_path / "runs"
    reached = lambda: {run.name: state.latest_iteration(state.run_folder(root, run)) for run in study.runs}  # noqa: E731
    runner.run_chunk(study, root, parallel=2, stop=lambda: max(reached().values()) >= 2, echo=lambda _: 0)
    stopped = reached()  # one run has a snapshot, the other may have none yet (then it starts afresh)
    assert max(stopped.values()) < 60, stopped
    lead, starts = [], []

    def echo(line):  # the lead is named first; when the other run starts, how far the lead had logged
        if "compiles first" in line:
            lead.append(study.run(line.split()[0]))
        elif line.startswith("start ") and not line.startswith(f"start {lead[0].name}:"):
            starts.append(state.logged_iteration(state.run_folder(root, lead[0])))

    chunk = runner.run_chunk(study, root, parallel=2, echo=echo, performance=("performance.channels_last=true",),
                             compiled=True)
    assert chunk.lead == lead[0].name and starts[0] > stopped[chunk.lead]  # the other waited for a new iteration
    for run in study.runs:
        folder = state.run_folder(root, run)
        resumed = [r for r in read_jsonl(folder / "log.jsonl") if r.get("event") == "resumed"]
        if stopped[run.name]:  # continued in place, with the change logged
            assert resumed[-1]["changes"] == ["performance.channels_last: false -> true"]
        assert state.latest_iteration(folder) == 60 and "channels_last: true" in (folder / "config.yaml").read_text()
    history = [json.loads(line) for line in (root / "chunks.jsonl").read_text().splitlines()]
    assert history[-1]["performance"] == ["performance.channels_last=true"] and history[-1]["lead"] == chunk.lead
    assert study_cli.main(["run", str(tmp_path / "study.yaml"), "--root", str(root), "--set",
                           "updater.apply_SR=true"]) == 2
    assert "a chunk may change only performance.KEY=VALUE" in capsys.readouterr().err


def test_a_study_travels_to_a_device_chunk_and_back(tmp_path, capsys):
    study_file = write_study(tmp_path, 6)
    here, there, carry, out = (tmp_path / name for name in ("here", "there", "carry", "out"))
    assert study_cli.main(["run", str(study_file), "--root", str(here), "--setting", "tiny", "--budget", "600",
                           "--set", "performance.step_graphs=true"]) == 0
    chunk = json.loads((here / "chunks.jsonl").read_text().splitlines()[-1])  # every setting, the base's or --set
    assert {"performance.step_graphs=true", "performance.compile=false", 'performance.amp="fp32"'} <= \
        set(chunk["performance"]) and chunk["lead"] is None
    assert chunk["stop"] == "every run done, or none could go"  # not "budget": it had 600 s
    assert chunk["code"] == provenance.code_version() and chunk["machine"]["device"] == provenance.cpu_model()  # runs'
    with pytest.raises(transfer.TransferError, match="is not a carry folder"):
        transfer.reset(here)  # a mistyped --to deletes nothing
    (tmp_path / "a_file").write_text("x")
    assert study_cli.main(["carry", str(study_file), "--root", str(here), "--to", str(tmp_path / "a_file")]) == 2
    assert "a_file is a file, not a carry folder" in capsys.readouterr().err  # was a FileExistsError traceback
    transfer.reset(carry)
    (carry / transfer.CARRY_STUDY).write_text(json.dumps({"study": "study"}))
    (carry / study_cli.CARRY_CODE).write_text(json.dumps(provenance.carry_record()))
    transfer.write_archive(transfer.state_files(here, [here / "tiny"]), here, carry / transfer.STATE)
    names = transfer.extract(carry / transfer.STATE, tmp_path / "peek")
    assert {"tiny/sn_s0/snapshots/snapshot_iter_6.pt", "tiny/sn_s0/log.jsonl", "chunks.jsonl"} <= set(names)
    assert not [n for n in names if "/spectra/" in n or "/samples/" in n or "generator_iter" in n]
    # the device side: restore, one chunk (nothing left to do), pack what changed
    out.mkdir()
    assert study_cli.main(["device", str(study_file), "--root", str(there), "--carry", str(carry), "--out", str(out),
                           "--budget", "60"]) == 0
    # what its runs would name were the copy here without .git: the carry's commit, the copy checked against it
    assert json.loads(os.environ[provenance.CODE_ENV]) == {**provenance.code_version(), "from": "carry"}
    progress = json.loads((out / "progress.json").read_text())
    assert [row["status"] for row in progress] == ["done", "done"]
    parts = sorted(out.glob(transfer.PARTS + "*"))
    assert parts and all(p.stat().st_size <= transfer.PART_BYTES for p in parts)
    back = tmp_path / "back"  # here, as it was when carried
    shutil.copytree(here, back)
    returned = transfer.extract(b"".join(part.read_bytes() for part in parts), tmp_path / "peek_back")
    assert "chunks.jsonl" in returned and "tiny/sn_s0/snapshots/snapshot_iter_6.pt" not in returned  # not the untouched
    assert not [name for name in returned if Path(name).name.startswith(".")]  # the machine's locks stay there
    with pytest.raises(transfer.TransferError, match="holds 0: take the earlier calls' files back first"):
        transfer.take_back(out, tmp_path / "empty")  # not the study these files continue
    assert study_cli.main(["take-back", str(study_file), "--root", str(back), str(out)]) == 0
    assert len((back / "chunks.jsonl").read_text().splitlines()) == 2  # here's chunk and the device's
    with pytest.raises(transfer.TransferError, match="they were taken back before"):
        transfer.take_back(out, back)  # twice: it would roll the logs back
    with pytest.raises(transfer.TransferError, match="of the study 'study', not 'other'"):
        transfer.take_back(out, back, "other")  # another study's, with runs of the same names
    # a second call on the machine while warm, with the same carry, continues there (not the carry's older state)
    again = tmp_path / "again"
    again.mkdir()
    assert study_cli.main(["device", str(study_file), "--root", str(there), "--carry", str(carry), "--out", str(again),
                           "--budget", "60"]) == 0
    captured = capsys.readouterr()
    assert "earlier chunk with this carry continues" in captured.err and "done" in captured.out
    assert transfer.take_back(again, back) == ["chunks.jsonl"]
    assert (back / "chunks.jsonl").read_text() == (there / "chunks.jsonl").read_text()  # 3 chunks, in order
    parts[-1].rename(out / "elsewhere")
    if len(parts) == 1:
        with pytest.raises(transfer.TransferError, match="no study.tar.xz.partNN"):
            transfer.take_back(out, back)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="make data")
def test_where_the_data_cannot_go_to_the_configs_folder_the_runs_are_told_where_it_went(tmp_path):
    """A lent machine whose system folders are read-only: the chunk unpacks the data into the carry folder and gives
    every run that folder (a location: a run resumed with it continues in place, tests/test_training.py)."""
    import gzip
    import lzma

    blocked = tmp_path / "read-only"
    blocked.write_text("a file where the data's folder would have to be made")
    carry, out, there = tmp_path / "carry", tmp_path / "out", tmp_path / "there"
    (carry / "data").mkdir(parents=True)
    out.mkdir()
    for path in FASHION_MNIST.glob("*-ubyte.gz"):  # what `carry` packs, at a faster preset
        (carry / "data" / f"{path.name.removesuffix('.gz')}.xz").write_bytes(
            lzma.compress(gzip.decompress(path.read_bytes()), preset=0))
    (carry / transfer.CARRY_STUDY).write_text(json.dumps({"study": "study"}))
    study_file = write_study(tmp_path, 2, sn={})
    spec = yaml.safe_load(study_file.read_text())
    spec["set"] = [item for item in spec["set"] if not item.startswith("dataset.")] + [
        "dataset.name=fashion_mnist", f"dataset.args={{root: {blocked / 'data'}, split: train}}"]
    study_file.write_text(yaml.safe_dump(spec))
    assert study_cli.main(["device", str(study_file), "--root", str(there), "--carry", str(carry), "--out", str(out),
                           "--budget", "120"]) == 0
    unpacked = (carry / "unpacked").resolve()
    assert (unpacked / "train-images-idx3-ubyte").is_file()
    chunk = json.loads((there / "chunks.jsonl").read_text().splitlines()[-1])
    assert chunk["data_root"] == str(unpacked) and chunk["runs"]["tiny/sn_s0"]["returncode"] == 0
    assert yaml.safe_load((there / "tiny" / "sn_s0" / "config.yaml").read_text())["dataset"]["args"]["root"] == \
        str(unpacked)
    study = load_study(study_file)
    (run,) = study.runs
    assert runner.command(study, tmp_path / "fresh", run, "python", ("performance.amp=fp32",), "/x #1: y")[-4:] == \
        ["--set", "performance.amp=fp32", "--set", 'dataset.args.root="/x #1: y"']  # a YAML value, quoted
    assert load_config(study.spec.base, ['dataset.args.root="/x #1: y"']).dataset.args.root == "/x #1: y"


def test_a_setting_with_data_of_its_own_keeps_it_when_the_chunk_names_the_studys_folder(tmp_path):
    """The study's data (its first run's, what `carry` packs) is where the chunk says; another setting's stays its own."""
    study_file = write_study(tmp_path, 2, sn={})
    spec = yaml.safe_load(study_file.read_text())
    spec["set"] = [item for item in spec["set"] if not item.startswith("dataset.")] + ["dataset.name=fashion_mnist"]
    spec["settings"] = {"tiny": [], "cifar": ["dataset.name=cifar10", "dataset.args.root=/data/my_cifar"]}
    study_file.write_text(yaml.safe_dump(spec))
    study = load_study(study_file)
    commands = {run.setting: runner.command(study, tmp_path, run, "python", (), "/here") for run in study.runs}
    assert study.data_root() == Path("/data/my_cifar")  # the settings in sorted order: cifar's run is the first
    assert 'dataset.args.root="/here"' in commands["cifar"] and not any("/here" in a for a in commands["tiny"])


def test_one_command_at_a_time_writes_a_studys_folder_and_a_carry_serves_its_own_study(tmp_path, capsys):
    """A second chunk would stop the first one's runs as leftovers: refused while the folder's lock is held (status
    reads on); a carry made for another study is refused before anything is unpacked."""
    study_file = write_study(tmp_path, 2, sn={})
    root, carry, out = tmp_path / "root", tmp_path / "carry", tmp_path / "out"
    with processes.root_lock(root):
        assert study_cli.main(["run", str(study_file), "--root", str(root), "--budget", "30"]) == 2
        assert study_cli.main(["status", str(study_file), "--root", str(root)]) == 0
    captured = capsys.readouterr()
    assert f"error: {root} is in use by pid {os.getpid()}" in captured.err and "fresh" in captured.out
    assert processes.ROOT_LOCK not in transfer.listing(root)  # the machine's own, never returned
    transfer.reset(carry)
    (carry / transfer.CARRY_STUDY).write_text(json.dumps({"study": "another"}))
    out.mkdir()
    assert study_cli.main(["device", str(study_file), "--root", str(root), "--carry", str(carry), "--out", str(out),
                           "--budget", "30"]) == 2
    assert "was made for the study 'another', not 'study'" in capsys.readouterr().err and not list(out.iterdir())
    (carry / transfer.CARRY_STUDY).unlink()
    assert study_cli.main(["device", str(study_file), "--root", str(root), "--carry", str(carry), "--out", str(out),
                           "--budget", "30"]) == 2
    assert "was made for the study 'unknown (it has no study.json)'" in capsys.readouterr().err


def chunk_ran(root: Path, chunks: int = 0) -> dict:
    """What a chunk after ``chunks`` others appends to the study's history, and its returned files' origin."""
    with open(root / "chunks.jsonl", "a") as history:
        history.write(json.dumps({"chunk": chunks + 1}) + "\n")
    return {"study": "s", "since_chunks": chunks}


def test_a_later_call_on_a_warm_machine_returns_what_no_earlier_call_returned(tmp_path, monkeypatch):
    """Call 1 killed before it packed, call 2 packs, call 3 continues: each returns what the local copy lacks (also
    what a pack left out for room); a carry made anew replaces the state its runs have there; so does a damaged
    record of the earlier calls."""
    made, carry, root, out = (tmp_path / name for name in ("made", "carry", "root", "out"))
    run = Path("s") / "run"
    (made / run).mkdir(parents=True)
    (made / run / "log").write_text("carried")
    transfer.reset(carry)
    transfer.write_archive([made / run / "log"], made, carry / transfer.STATE)
    assert not continuation.restore(carry, root).continued and (root / run / "log").read_text() == "carried"
    (root / run / "log").write_text("carried, call 1")
    (root / run / "snapshot_1").write_bytes(b"1")  # ... and the call is killed at its limit: nothing returned
    since = continuation.restore(carry, root)
    assert since.continued and (root / run / "log").read_text() == "carried, call 1"
    (root / run / "snapshot_2").write_bytes(b"2")
    (root / run / "spectra").mkdir()
    (root / run / "spectra" / "big").write_bytes(os.urandom(3000))
    out.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(transfer, "RETURN_LIMIT", 2000)  # room for all but the spectra
        transfer.pack_changed(root, since.listing, out, chunk_ran(root, since.chunks))
    continuation.packed(root, out)
    assert sorted(transfer.take_back(out, tmp_path / "here")) == ["chunks.jsonl", "s/run/log", "s/run/snapshot_1",
                                                                 "s/run/snapshot_2"]
    since = continuation.restore(carry, root)  # call 3
    (root / run / "snapshot_3").write_bytes(b"3")
    transfer.pack_changed(root, since.listing, out, chunk_ran(root, since.chunks))
    assert since.continued and sorted(transfer.take_back(out, tmp_path / "here")) == [
        "chunks.jsonl", "s/run/snapshot_3", "s/run/spectra/big"]  # the spectra left out before come now
    assert continuation.SINCE not in transfer.listing(root)
    (made / run / "log").write_text("carried anew")  # e.g. after call 3 was killed too: what is here goes again
    transfer.write_archive([made / run / "log"], made, carry / transfer.STATE)
    assert not continuation.restore(carry, root).continued and (root / run / "log").read_text() == "carried anew"
    assert sorted(p.name for p in (root / run).iterdir()) == ["log"]  # no snapshot the carry does not hold
    (root / run / "snapshot_4").write_bytes(b"4")
    (root / continuation.SINCE).write_text('{"carry": 1, "listing": {"s/run/log": 5}, "chunks": 0}')  # damaged
    assert not continuation.restore(carry, root).continued and not (root / run / "snapshot_4").exists()


def test_take_back_accepts_files_that_extend_the_history_here_and_refuses_the_rest(tmp_path):
    """Files continue the study after the chunk their manifest names, and their chunks.jsonl extends the one here: a
    call's whose predecessor was killed between packing and recording it holds all since the carry (accepted);
    files needing an earlier call's first, taken back twice, or of another history are refused."""
    calls = iter(range(100))

    def returned(lines: int, since: int, first: str = "a") -> Path:
        call = next(calls)
        made, folder = tmp_path / f"made{call}", tmp_path / f"out{call}"
        made.mkdir()
        folder.mkdir()
        (made / "chunks.jsonl").write_text("".join(f'{{"chunk": "{first if i == 0 else i}"}}\n' for i in range(lines)))
        transfer.pack_changed(made, {}, folder, origin={"study": "s", "since_chunks": since})
        return folder

    here = tmp_path / "here"
    here.mkdir()
    (here / "chunks.jsonl").write_text('{"chunk": "a"}\n')
    with pytest.raises(transfer.TransferError, match="take the earlier calls' files back first"):
        transfer.take_back(returned(3, 2), here, "s")
    transfer.take_back(returned(2, 1), here, "s")
    with pytest.raises(transfer.TransferError, match="they were taken back before"):
        transfer.take_back(returned(2, 1), here, "s")
    transfer.take_back(returned(4, 1), here, "s")  # all since chunk 1, where the record said so
    assert transfer.chunk_count(here) == 4
    with pytest.raises(transfer.TransferError, match="they were taken back before"):
        transfer.take_back(returned(5, 4, first="b"), here, "s")  # another history


def test_a_carry_made_anew_is_checked_before_the_state_it_replaces_goes(tmp_path):
    made, carry, root = tmp_path / "made", tmp_path / "carry", tmp_path / "root"
    (made / "s" / "run").mkdir(parents=True)
    (made / "s" / "run" / "log").write_text("carried")
    transfer.reset(carry)
    transfer.write_archive([made / "s" / "run" / "log"], made, carry / transfer.STATE)
    continuation.restore(carry, root)
    (root / "s" / "run" / "snapshot_1").write_bytes(b"1")
    (made / "link").symlink_to("/etc")
    transfer.write_archive([made / "s" / "run" / "log", made / "link"], made, carry / transfer.STATE)
    with pytest.raises(transfer.TransferError, match="only files and folders"):
        continuation.restore(carry, root)
    assert (root / "s" / "run" / "snapshot_1").is_file()  # nothing went


def test_changed_files_come_back_in_parts_that_reassemble(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "old.txt").write_text("old")
    (root / "a" / "changed.txt").write_text("before")
    before = transfer.listing(root)
    (root / "a" / "changed.txt").write_text("after, longer")
    (root / "a" / "new.bin").write_bytes(os.urandom(3000))
    (root / "a" / "snapshots").mkdir()
    (root / "a" / "snapshots" / "generator_iter_2.pt").write_bytes(b"G")  # the snapshot holds G: stays behind
    monkeypatch.setattr(transfer, "PART_BYTES", 1000)
    parts = transfer.pack_changed(root, before, tmp_path, chunk_ran(root))
    assert len(parts) >= 3 and not (tmp_path / "left_out.txt").exists()
    assert transfer.take_back(tmp_path, tmp_path / "back") == ["a/changed.txt", "a/new.bin", "chunks.jsonl"]
    assert (tmp_path / "back" / "a" / "new.bin").read_bytes() == (root / "a" / "new.bin").read_bytes()
    parts[-1].unlink()  # the last part lost: the numbering has no gap, the manifest tells
    with pytest.raises(transfer.TransferError, match=f"parts .* of {len(parts)}; one did not come back"):
        transfer.take_back(tmp_path, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_over_the_return_limit_grids_and_tensorboard_stay_behind_before_anything_else(tmp_path, monkeypatch):
    root, out = tmp_path / "root", tmp_path / "out"
    for folder, size in (("run/tb", 4000), ("run/samples", 4000), ("run/snapshots", 3000)):
        (root / folder).mkdir(parents=True)
        (root / folder / "file").write_bytes(os.urandom(size))
    out.mkdir()
    monkeypatch.setattr(transfer, "RETURN_LIMIT", 6000)
    origin = chunk_ran(root)
    transfer.pack_changed(root, {}, out, origin)
    assert (out / "left_out.txt").read_text().split() == ["run/samples/file", "run/tb/file"]
    assert transfer.take_back(out, tmp_path / "back") == ["run/snapshots/file", "chunks.jsonl"]
    monkeypatch.setattr(transfer, "RETURN_LIMIT", 1000)
    with pytest.raises(transfer.TransferError, match="snapshots and logs take 0 MiB compressed, over the 0 MiB"):
        transfer.pack_changed(root, {}, out, origin)
    # fewer parts where other files share the call's 8 (--parts): the same order of what stays behind
    monkeypatch.setattr(transfer, "RETURN_LIMIT", 10 ** 6)
    monkeypatch.setattr(transfer, "PART_BYTES", 4000)
    assert len(transfer.pack_changed(root, {}, out, origin, parts=3)) == 3 and not (out / "left_out.txt").exists()
    assert len(transfer.pack_changed(root, {}, out, origin, parts=2)) == 2
    assert (out / "left_out.txt").read_text().split() == ["run/tb/file"]


def test_the_collapse_study_file_names_its_runs_and_branches_and_selects_by_setting_and_seed():
    study = load_study(ROOT / "configs" / "collapse" / "gpu_study.yaml")
    assert len(study.runs) == 36 and {run.iteration for run in study.runs} == {50000}
    branches = [run for run in study.runs if run.parent]
    assert [run.parent for run in branches][:3] == ["b64/sn_s0", "b64/sn_s1", "b64/sn_s2"]
    assert all(run.at == "collapse" for run in branches) and len(branches) == 12
    assert study.data_root() == Path("/usr/share/datasets/fashion-mnist")
    chosen = study.select(["b16"], [1])
    assert len(chosen) == 6 and {(run.setting, run.seed) for run in chosen} == {("b16", 1)}
    with pytest.raises(ConfigError, match="--seed 7: the study has"):
        study.select(None, [7])
    baseline = study.select(["b64"], None, ["sn"])
    assert [run.name for run in baseline] == ["b64/sn_s0", "b64/sn_s1", "b64/sn_s2"]
    with pytest.raises(ConfigError, match="--arm snn: the study has"):
        study.select(None, None, ["snn"])


def test_the_cifar10_study_is_the_fashion_mnist_study_on_other_data():
    """configs/collapse/gpu_study_cifar10.yaml repeats gpu_study.yaml's settings, arms and seeds: the same runs and
    branches, each with the same recipe, on CIFAR-10 (3 channels, IS/FID instead of the Fashion-MNIST classifier)."""
    fashion, cifar = (load_study(ROOT / "configs" / "collapse" / name) for name in ("gpu_study.yaml",
                                                                                  "gpu_study_cifar10.yaml"))
    assert [(r.name, r.parent, r.at, r.iteration) for r in cifar.runs] == \
        [(r.name, r.parent, r.at, r.iteration) for r in fashion.runs]
    data_keys = {"dataset", "models", "evaluation"}
    for mine, theirs in [(m, t) for m, t in zip(cifar.runs, fashion.runs) if m.parent is None]:  # branches: parents'
        a = load_config(cifar.spec.base, list(mine.overrides)).to_dict()
        b = load_config(fashion.spec.base, list(theirs.overrides)).to_dict()
        assert {k: v for k, v in a.items() if k not in data_keys} == {k: v for k, v in b.items() if k not in data_keys}
        assert a["dataset"]["name"] == "cifar10" and a["models"]["discriminator"]["args"]["channels"] == 3
        assert a["evaluation"]["modes_interval"] == 0 and a["evaluation"]["metrics"] == ["is", "fid"]
        assert a["models"]["generator"]["args"] == dict(b["models"]["generator"]["args"], channels=3)


def test_train_py_starts_with_the_gpu_images_packages_and_the_carried_wheels():
    """The GPU machine has torch, scipy, pyyaml, tqdm, ... but not these (KINDS.md); carry must bring what train.py
    imports of them, and the rest (lmdb, fid-helper) must stay optional there."""
    blocked = sorted(module for name, module in transfer.NOT_ON_THE_GPU_IMAGE.items() if name not in transfer.WHEELS)
    code = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import train, source.study.__main__"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_study_folder_holds_one_studys_runs(tmp_path, capsys):
    """A --root of another study's folder had a run train there and the other study's next status save that chunk
    into its committed state; a train.py run folder was read as a study of fresh runs."""
    path = write_study(tmp_path, 4)
    root, parts = tmp_path / "root", tmp_path / "parts"
    root.mkdir()
    parts.mkdir()
    assert study_cli.main(["take-back", str(path), str(parts), "--root", str(root)]) == 2  # no parts: refused, but
    assert json.loads((root / processes.ROOT_STUDY).read_text()) == {"study": "study"}  # the folder is the study's
    capsys.readouterr()
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text())
    for argv in (["status", str(other), "--root", str(root)],
                 ["run", str(other), "--root", str(root), "--budget", "9"]):
        assert study_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"--root {root} holds the study 'study', not 'other'" in err and err.count("\n") == 1
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "log.jsonl").write_text("")
    assert study_cli.main(["status", str(path), "--root", str(run_folder)]) == 2
    assert "is a train.py run folder, not a study's folder" in capsys.readouterr().err


def test_only_the_wheels_pinned_by_hash_are_installed_from_a_carry(tmp_path, capfd):
    """A carry's wheels are installed on the lent machine before train.py runs: a wheel put there by anyone else (here
    one named as tensorboardX's, holding a sitecustomize.py that every Python start would run) is refused."""
    import zipfile

    pins = dict(line.split(" ")[0].split("==") for line in transfer.GPU_WHEELS.read_text().splitlines()
                if line and not line.startswith("#"))
    assert sorted(pins) == sorted(transfer.WHEELS)
    constraints = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert all(constraints[name] == version for name, version in pins.items()), "the pins follow constraints.txt"
    wheels = tmp_path / "carry" / "wheels"
    wheels.mkdir(parents=True)
    for project, version in pins.items():  # both named and versioned as pinned: only their hashes differ
        name = f"{project.replace('-', '_')}-{version}"
        with zipfile.ZipFile(wheels / f"{name}-py3-none-any.whl", "w") as wheel:
            wheel.writestr("sitecustomize.py", "open('PWNED', 'w')\n")
            wheel.writestr(f"{name}.dist-info/METADATA",
                           f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
            wheel.writestr(f"{name}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            wheel.writestr(f"{name}.dist-info/RECORD", "")
    with pytest.raises(transfer.TransferError, match="not those gpu_wheels.txt pins by hash"):
        transfer.install_wheels(tmp_path / "carry", tmp_path / "site")
    assert "DO NOT MATCH THE HASHES" in capfd.readouterr().err
    assert not (tmp_path / "site" / "sitecustomize.py").exists()


def test_a_study_root_or_return_that_is_not_as_written_is_a_one_line_error(tmp_path, capsys):
    """Files a chunk returns, or a study root from elsewhere, may be damaged or crafted (a hostile-input review:
    each of these was a traceback)."""
    path = write_study(tmp_path, 4)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / f"{transfer.PARTS}00").write_bytes(b"not xz")
    for manifest in ("{not json", "[1, 2]", json.dumps({"parts": 1, "sha256": __import__("hashlib").sha256(
            b"not xz").hexdigest()}), " " * 2**17 + "{}"):  # the last: read whole before, however large
        (parts / transfer.MANIFEST).write_text(manifest)
        assert study_cli.main(["take-back", str(path), str(parts), "--root", str(tmp_path / "root")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    root = tmp_path / "root"
    (root / PIDS).parent.mkdir(parents=True, exist_ok=True)
    (root / PIDS).write_text("[1, 2]")  # not what a chunk writes: nothing stopped, no AttributeError
    processes.stop_leftovers(root, 1.0, print)
    assert not (root / PIDS).exists()
    folder = root / "tiny" / "sn_s0"
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text('{"iteration": "5", "event": "collapse"}\n{"iteration": 6}\n')
    (root / "chunks.jsonl").write_text('{"runs": {"tiny/sn_s0": {"from": 0, "to": Infinity}}, "wall_s": 1}\n')
    assert study_cli.main(["status", str(path), "--root", str(root)]) == 2
    assert "log.jsonl:1 is not a log record (a mapping with an integer iteration)" in capsys.readouterr().err
    (folder / "log.jsonl").write_text("")
    assert state.last_chunk(root) == (None, None)  # an infinite advance is no rate
    # a new user's walk: a mistyped --root read as a study of fresh runs (take-back made the folder), a missing
    # carry blamed its study.json, and device without --budget ran until its call's limit killed the packing
    for argv, message in [(["status", str(path), "--root", str(tmp_path / "typo")], "--root"),
                          (["take-back", str(path), str(parts), "--root", str(tmp_path / "typo")], "--root"),
                          (["device", str(path), "--carry", str(tmp_path / "nowhere"), "--out", str(parts),
                            "--budget", "5"], "--carry")]:
        assert study_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message} ") and "no such" in err, err
    assert not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit):
        study_cli.parse_args(["device", str(path), "--carry", str(parts), "--out", str(parts)])


def test_a_study_root_with_a_planted_link_runs_no_chunk(tmp_path, capsys):
    path = write_study(tmp_path, 4)
    root = tmp_path / "root"
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (root / "tiny" / "console").mkdir(parents=True)
    (root / "tiny" / "console" / "sn_s0.log").symlink_to(victim)  # where train.py's console would be appended
    assert study_cli.main(["run", str(path), "--root", str(root), "--budget", "5"]) == 2
    assert "sn_s0.log is a symbolic link; a chunk writes only into the study root's own files" in \
        capsys.readouterr().err
    assert victim.read_text() == "keep me\n"


@pytest.mark.parametrize("option, value, message", [
    ("--budget", "0", "argument --budget: must be a finite number > 0, got 0"),  # printed the status, rc 0
    ("--budget", "nan", "argument --budget: must be a finite number > 0, got nan"),  # ran
    ("--grace", "-1", "argument --grace: must be a finite number > 0, got -1"),  # ran
    ("--seed", str(10**20), "argument --seed: must be in [0, 2^32)"),
    ("--parallel", "0", "argument --parallel: must be at least 1, got 0"),
    ("--per-process", "-1", "argument --per-process: must be at least 1, got -1"),
])
def test_numbers_out_of_range_are_usage_errors_before_the_study_is_read(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        study_cli.main(["run", "no-such-study.yaml", option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
