"""Hostile and careless use through the public entry points: unsafe snapshots, shared run folders, NaN weights,
torn logs, YAML bombs and the one-line errors promised for bad input (issue 8)."""
import io
import json
import os
import pickle
import re
import signal
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboardX.proto import event_pb2

import evaluation
import train
import updater as updater_module
from source.config import ConfigError, load_config
from source.training import build, checkpoint, convert_snapshot, resume, runfolder
from source.training.checkpoint import load_snapshot
from test_training import CONFIGS, tiny_argv


class Payload:
    """Pickles into a call of os.system: what a crafted snapshot from a stranger would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_error(capsys, message: str) -> str:
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (iterations 1..4, snapshots at 2 and 4), copied by the tests that change it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(tiny_argv(run, 4)) == 0
    return run


def copy_run(run: Path, to: Path) -> Path:
    import shutil
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(runfolder.LOCK_FILE))
    return to


# --- 1. snapshots cannot run code ---------------------------------------------------------------

def test_a_crafted_snapshot_is_refused_without_running_its_payload(tmp_path, trained, capsys):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "snapshot_iter_4.pt"
    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_4.pt")
    torch.save({**snapshot, "updater": Payload(marker)}, evil)
    assert train.main(["--resume", str(evil), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "loading them could run code")
    assert evaluation.main(["grids", "--snapshot", str(evil)]) == 2
    assert "loading them could run code" in capsys.readouterr().err
    assert not marker.exists(), "the payload ran"


def test_crafted_inception_weights_are_refused_without_running_their_payload(tmp_path):
    from source.metrics.inception import InceptionBackbone, WeightsUnavailable

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2), "evil": Payload(marker)}, evil)
    with pytest.raises(WeightsUnavailable, match="tensors only"):
        InceptionBackbone(weights=str(evil))
    assert not marker.exists()


def legacy_copy(path: Path, to: Path) -> Path:
    """``path`` as this toolkit wrote it before safe loading: numpy RNG states pickled as numpy objects."""
    snapshot = load_snapshot(path)
    for state in snapshot["rng"]:
        state["numpy"] = np.random.get_state()  # ('MT19937', ndarray, int, int, float)
    torch.save(snapshot, to)
    return to


def test_an_old_snapshot_says_how_to_convert_it_and_resumes_after_conversion(tmp_path, trained, capsys):
    run = copy_run(trained, tmp_path / "run")
    old = legacy_copy(trained / "snapshots" / "snapshot_iter_4.pt", run / "snapshots" / "snapshot_iter_4.pt")
    capsys.readouterr()
    assert train.main(["--resume", str(old), "--set", "iteration=5"]) == 2
    one_line_error(capsys, f"python -m source.training.convert_snapshot {old}")
    assert convert_snapshot.main([str(old)]) == 0
    assert (run / "snapshots" / "snapshot_iter_4.pt.orig").is_file()
    capsys.readouterr()  # a second call leaves both files (it used to replace the true original)
    orig = (run / "snapshots" / "snapshot_iter_4.pt.orig").read_bytes()
    assert convert_snapshot.main([str(old)]) == 0 and "loads safely already: nothing to convert" in capsys.readouterr().out
    assert (run / "snapshots" / "snapshot_iter_4.pt.orig").read_bytes() == orig
    converted = load_snapshot(old, training_state=True)
    assert converted["rng"][0]["numpy"]["state"]["key"].dtype == torch.int64
    assert train.main(["--resume", str(old), "--set", "iteration=5", "--out", str(tmp_path / "continued")]) == 0
    assert (tmp_path / "continued" / "snapshots" / "snapshot_iter_5.pt").is_file()


def test_the_converter_refuses_an_old_looking_snapshot_that_would_run_a_command(tmp_path, trained, capsys):
    # numpy objects first, so the loader's error reads as an old snapshot's and suggests the converter
    marker = tmp_path / "ran_a_command"
    disguised = tmp_path / "snapshot_iter_4.pt"
    torch.save({"rng": [{"numpy": np.random.get_state()}], "gen": {}, "iteration": 4, "x": Payload(marker)}, disguised)
    assert train.main(["--resume", str(disguised)]) == 2
    one_line_error(capsys, "convert_snapshot")
    assert convert_snapshot.main([str(disguised)]) == 2
    one_line_error(capsys, "Python objects other than numpy arrays and numbers")
    assert not marker.exists() and not (tmp_path / "snapshot_iter_4.pt.orig").exists()


# --- 2. one run per folder ----------------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, trained, capsys):
    before = sorted(p.name for p in (trained / "snapshots").iterdir())
    assert train.main(tiny_argv(trained, 2)) == 2
    err = one_line_error(capsys, "already holds a run (")
    assert err.endswith(f"; choose another --out, delete it, or continue it with --resume {trained}/snapshots/"
                        f"snapshot_iter_4.pt\n")
    assert sorted(p.name for p in (trained / "snapshots").iterdir()) == before


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = runfolder.claim(runfolder.plan_fresh(str(out), out))  # as a run that is still training
    try:
        assert train.main(tiny_argv(out, 2)) == 2
        one_line_error(capsys, f"pid {os.getpid()}")
    finally:
        holder.release()
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 4)) == 0
    for name in ("snapshot_iter_4.pt", "generator_iter_4.pt"):  # as if it were at iteration 3 now
        (run / "snapshots" / name).unlink()
    holder = runfolder.claim(runfolder.Plan(run, only=True, in_place=True))  # the run still training
    try:
        assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_2.pt")]) == 2  # in place
        one_line_error(capsys, "the run is still going; stop it first (Ctrl-C writes a snapshot), or branch")
    finally:
        holder.release()
    assert not out.exists(), "a folder claimed and never written is removed again"


def test_default_folders_are_numbered_and_resume_branches_never_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [a for a in tiny_argv(Path("unused"), 2) if a not in ("--out", "unused")]
    assert train.main(argv) == 0 and train.main(argv) == 0
    assert "results/demo is taken" in capsys.readouterr().out
    first, second = Path("results/demo"), Path("results/demo-2")
    assert (first / "snapshots" / "snapshot_iter_2.pt").is_file() and (second / "snapshots" / "snapshot_iter_2.pt").is_file()
    snapshot = str(first / "snapshots" / "snapshot_iter_1.pt")  # not the run's latest: a branch, even unchanged
    for _ in range(2):
        assert train.main(["--resume", snapshot, "--set", "iteration=3"]) == 0
    branches = [Path("results/demo-resume1"), Path("results/demo-resume1-2")]
    assert all((b / "snapshots" / "snapshot_iter_3.pt").is_file() for b in branches)
    assert [json.loads(line)["event"] for line in (branches[0] / "log.jsonl").read_text().splitlines()
            if "event" in json.loads(line)][:3] == ["resumed", "started", "sr_start"]
    assert not (first / "snapshots" / "snapshot_iter_3.pt").exists()


def test_resume_from_the_latest_snapshot_continues_the_run_in_place(tmp_path, trained, capsys):
    run = copy_run(trained, tmp_path / "run")
    for name in ("snapshot_iter_4.pt", "generator_iter_4.pt"):  # a run stopped after its snapshot at 2
        (run / "snapshots" / name).unlink()
    stale = run / "snapshots" / ".snapshot_iter_6.pt.x1y2.tmp"  # left by a write that was killed
    stale.write_bytes(b"partial")
    with open(run / "log.jsonl", "a") as log:
        log.write('{"iteration": 5, "epoch": 0, "ela')  # a line cut by a crash (disk full, power loss)
    assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_2.pt"), "--set", "iteration=1"]) == 2
    one_line_error(capsys, "a branch from it would train nothing (--set iteration=N with N > 2)")
    assert not list(tmp_path.glob("run-*")), "no branch folder made for nothing"
    assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_2.pt")]) == 0  # unchanged: in place
    assert not stale.exists() and not list(tmp_path.glob("run-*"))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss_dis" in r] == [1, 2, 3, 4]
    resumed = next(i for i, r in enumerate(records) if r.get("event") == "resumed")
    assert records[resumed]["iteration"] == 2 and [r.get("iteration") for r in records[resumed:] if "loss_dis" in r
                                                   ] == [3, 4], "appended after the torn line and 3, 4 were dropped"
    assert [(r["iteration"], r["command"][1:]) for r in records if r.get("event") == "started"] == \
        [(0, records[0]["command"][1:]), (2, ["--resume", str(run / "snapshots" / "snapshot_iter_2.pt")])]
    # TensorBoard hides what the interrupted session logged past the snapshot too: a purge marker at 2 + 1
    starts = [event.step for event in tensorboard_events(run / "tb") if event.HasField("session_log")
              and event.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]
    log = (run / "log.jsonl").read_text()
    capsys.readouterr()
    assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_4.pt")]) == 0  # finished: nothing to do
    assert "the run has trained its 4 iterations: nothing to do (to train longer: --set iteration=N" in \
        capsys.readouterr().out
    assert (run / "log.jsonl").read_text() == log, "a resume that trains nothing logs nothing (no 'resumed' event)"


def tensorboard_events(folder: Path) -> list:
    """Every event of the TFRecord files in ``folder`` (length, its CRC, the event, its CRC)."""
    events = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        while data:
            length = int.from_bytes(data[:8], "little")
            events.append(event_pb2.Event.FromString(data[12:12 + length]))
            data = data[16 + length:]
    return events


@pytest.mark.parametrize("name", [runfolder.LOCK_FILE, "log.jsonl", "snapshots/generator_iter_6.pt"])
def test_a_received_run_folder_with_a_link_is_not_written_through(tmp_path, trained, capsys, name):
    run = copy_run(trained, tmp_path / "run")
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_4.pt")]) == 2
    one_line_error(capsys, "is a symbolic link; a run writes only into files of its own folder")
    assert victim.read_text() == "keep me\n"


def test_a_received_run_folder_with_a_fifo_is_refused_not_waited_on(tmp_path, trained, capsys):
    run = copy_run(trained, tmp_path / "run")
    (run / "log.jsonl").unlink()
    os.mkfifo(run / "log.jsonl")  # the resume in place appended to it and waited for a reader for good
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the resume blocked on the FIFO"))
    signal.alarm(60)
    try:
        assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_4.pt")]) == 2
    finally:
        signal.alarm(0)
    one_line_error(capsys, "log.jsonl is neither a file nor a folder (a FIFO, socket or device); a run writes only")


def test_a_received_snapshot_that_links_to_another_runs_resumes_beside_the_received_run(tmp_path, trained, capsys):
    """The run folder is the one the snapshot is in, not its target's: the resume used to branch (or continue in
    place) beside the run the link named."""
    victim = copy_run(trained, tmp_path / "victim" / "run")
    received = tmp_path / "received" / "run" / "snapshots"
    received.mkdir(parents=True)
    (received / "snapshot_iter_4.pt").symlink_to(victim / "snapshots" / "snapshot_iter_4.pt")
    assert train.main(["--resume", str(received / "snapshot_iter_4.pt"), "--set", "iteration=5"]) == 0
    assert (tmp_path / "received" / "run-resume4" / "snapshots" / "snapshot_iter_5.pt").is_file()
    assert sorted(p.name for p in victim.parent.iterdir()) == ["run"]


def test_a_branch_folder_placed_as_a_link_is_passed_over(tmp_path, trained):
    run = copy_run(trained, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run-resume2").symlink_to(elsewhere)
    assert train.main(["--resume", str(run / "snapshots" / "snapshot_iter_2.pt"), "--set", "iteration=3"]) == 0
    assert not any(elsewhere.iterdir()) and (tmp_path / "run-resume2-2" / "snapshots" / "snapshot_iter_3.pt").is_file()


def unfinished(run: Path) -> str:
    """The run as if stopped after its snapshot at 2 of its 4 iterations: its latest snapshot, to resume in place (a
    finished run's resume has nothing to do)."""
    for name in ("snapshot_iter_4.pt", "generator_iter_4.pt"):
        (run / "snapshots" / name).unlink(missing_ok=True)
    return str(run / "snapshots" / "snapshot_iter_2.pt")


def test_a_resume_changing_only_how_the_arithmetic_runs_or_how_often_it_records_continues_in_place(tmp_path, trained):
    run = copy_run(trained, tmp_path / "run")
    assert train.main(["--resume", unfinished(run), "--set", "performance.channels_last=false"]) == 0  # demo's: true
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no branch folder"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r.get("event") == "resumed"][-1]
    assert resumed["changes"] == ["performance.channels_last: true -> false"]
    assert "channels_last: false" in (run / "config.yaml").read_text()
    assert train.main(["--resume", unfinished(run), "--set", "evaluation_interval=1000", "--set",
                       "display_interval=7"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "evaluating less often is no branch either"
    assert "evaluation_interval: 1000" in (run / "config.yaml").read_text()
    assert train.main(["--resume", unfinished(run), "--set", "updater.apply_SR=false", "--set", "iteration=5"]) == 0
    assert (tmp_path / "run-resume2").is_dir(), "the recipe changed: a branch"


# --- 3./4. NaN weights, exploding weights, torn logs ----------------------------------------------

def test_nan_weights_with_finite_losses_never_become_a_snapshot(tmp_path, monkeypatch, capsys):
    original = updater_module.Updater.update

    def breaks_a_weight(self):
        observation = original(self)
        if self.iteration == 4:  # after the step: the losses of this iteration were finite
            with torch.no_grad():
                next(self.dis_module.parameters()).view(-1)[0] = float("nan")
        return observation

    monkeypatch.setattr(updater_module.Updater, "update", breaks_a_weight)
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 4, "snapshot_interval=2", "display_interval=10")) == 1
    err = one_line_error(capsys, "hold NaN/Inf")
    assert "at iteration 4" in err and "snapshot_iter_2.pt" in err
    assert not (out / "snapshots" / "snapshot_iter_4.pt").exists()


def test_exploding_weights_are_warned_about_once(tmp_path, monkeypatch, capsys):
    original = updater_module.Updater.update

    def explodes(self):
        observation = original(self)
        with torch.no_grad():
            next(self.gen_module.parameters()).view(-1)[0] = 1e9
        return observation

    monkeypatch.setattr(updater_module.Updater, "update", explodes)
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 3)) == 0
    assert capsys.readouterr().out.count("WARNING: weights are exploding") == 1
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "weights_exploding" and e["max_abs_weight"] == 1e9 for e in events)


def test_a_log_rewrite_killed_midway_leaves_the_old_log(tmp_path, monkeypatch):
    from source.training import runlog

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 6)))
    before = log.read_text()
    monkeypatch.setattr("source.files.os.replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        runlog.truncate_after(log, 2)
    assert log.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


def test_disk_full_while_writing_a_snapshot_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch, capsys):
    import errno

    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 4)) == 1
    one_line_error(capsys, "No space left on device); nothing was lost")
    assert load_snapshot(out / "snapshots" / "snapshot_iter_2.pt", training_state=True)["iteration"] == 2
    assert not list((out / "snapshots").glob("*.tmp")) and not (out / "snapshots" / "snapshot_iter_4.pt").exists()


# --- 5. YAML bombs and list items ---------------------------------------------------------------

def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")  # 10^9 strings when walked
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(bomb)
    assert time.perf_counter() - start < 5


def merge_bomb(levels: int) -> str:
    """YAML merge keys of merges: PyYAML doubles its node lists at every level while parsing (30 levels, some
    850 bytes, ask for tens of GB before any count of the result could run)."""
    lines = ["l0: &l0 {a: 1, b: 2}"] + [f"l{k}: &l{k} {{<<: [*l{k - 1}, *l{k - 1}]}}" for k in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, message", [
    (merge_bomb(30), "merge keys (<<) are not supported"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
])
def test_yaml_that_would_exhaust_memory_or_recursion_is_a_one_line_error(tmp_path, capsys, text, message):
    from source.study.spec import load_study

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for load in (load_config, load_study):
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            load(path)
        assert "\n" not in str(error.value)
    assert train.main(["--config", str(path), "--dry-run"]) == 2
    one_line_error(capsys, message)


def test_a_snapshot_of_shared_or_deeply_nested_dicts_is_refused_or_walked_once(tmp_path, trained, capsys):
    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_4.pt")
    shared = {"a": 0.0}
    for _ in range(60):  # one dict referenced twice per level: 2^60 paths, 60 dicts
        shared = {"a": shared, "b": shared}
    snapshot["opt_gen"]["nested"] = shared
    torch.save(snapshot, tmp_path / "shared.pt")
    assert checkpoint.non_finite_weights(load_snapshot(tmp_path / "shared.pt", training_state=True)) == []
    deep = {}
    for _ in range(2000):  # deeper than Python recurses when the config is copied (the limit: 1000 frames)
        deep = {"x": deep}
    snapshot["opt_gen"]["nested"], snapshot["config"]["extra"] = deep, deep
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for pickling it: with pickle's Python Pickler, as from Python 3.12 the C one
    try:  # stops at a fixed C-stack depth whatever the limit (748 dicts on 3.12.1)
        python_pickle = types.SimpleNamespace(__name__="pickle", Pickler=pickle._Pickler)
        torch.save(snapshot, tmp_path / "deep.pt", pickle_module=python_pickle)
    finally:
        sys.setrecursionlimit(limit)
    assert train.main(["--resume", str(tmp_path / "deep.pt")]) == 2
    one_line_error(capsys, "nested deeper than 32 levels")


def test_a_snapshot_of_numbers_sharing_one_hash_is_refused_before_unpickling(tmp_path, trained, capsys):
    """Integer keys k (2^61 - 1) share one hash: building the dict took quadratic time (40k keys: 12.5 s)."""
    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_4.pt")
    snapshot["opt_gen"]["flood"] = {k * (2**61 - 1): 0 for k in range(1, 100)}
    torch.save(snapshot, tmp_path / "flood.pt")
    assert train.main(["--resume", str(tmp_path / "flood.pt")]) == 2
    one_line_error(capsys, "a hash flood")


def test_the_converter_converts_each_shared_container_once_and_refuses_a_foreign_rng(tmp_path, trained, capsys,
                                                                                       monkeypatch):
    shared = [np.float64(1.0)]
    for _ in range(40):  # 2^40 paths, 41 containers
        shared = [shared, shared]
    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_2.pt")
    old = tmp_path / "old.pt"
    torch.save(dict(snapshot, extra=shared), old)
    assert convert_snapshot.main([str(old)]) == 0
    converted = load_snapshot(old)["extra"]
    assert converted[0] is converted[1]  # still shared, not copied 2^40 times
    (tmp_path / "old.pt.orig").unlink()
    array = np.zeros(2**16)  # one array met 3 times is converted once (5000 references to 2 MiB asked 10 GB)
    torch.save(dict(snapshot, extra=[array] * 3), old)
    assert convert_snapshot.main([str(old)]) == 0
    converted = load_snapshot(old)["extra"]
    assert converted[0].untyped_storage().data_ptr() == converted[2].untyped_storage().data_ptr()
    (tmp_path / "old.pt.orig").unlink()
    torch.save(dict(snapshot, extra=[array]), old)
    monkeypatch.setattr(convert_snapshot, "plain", lambda value: (_ for _ in ()).throw(MemoryError()))
    assert convert_snapshot.main([str(old)]) == 2  # one line, and no .orig left to refuse the next try
    one_line_error(capsys, "out of memory converting it")
    assert not (tmp_path / "old.pt.orig").exists()
    monkeypatch.undo()
    torch.save(dict(snapshot, rng={"numpy": np.zeros(1)}), old)  # the old format's numpy, in a foreign layout
    assert convert_snapshot.main([str(old)]) == 2
    one_line_error(capsys, "its 'rng' entry is not a list of each rank's states")


def recompressed(source: Path, to: Path, compression: int) -> Path:
    """``source``'s zip members written again with ``compression`` (what neither torch.save nor np.savez does)."""
    import zipfile

    with zipfile.ZipFile(source) as old, zipfile.ZipFile(to, "w", compression) as new:
        for member in old.infolist():
            new.writestr(member.filename, old.read(member))
    return to


def test_zip_files_that_would_load_to_more_than_they_hold_are_refused(tmp_path, trained, capsys):
    import zipfile

    from source.metrics.reference import ReferenceUnavailable, file_reference
    from source.metrics.statistics import save_stats

    snapshot = recompressed(trained / "snapshots" / "snapshot_iter_4.pt", tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    with pytest.raises(checkpoint.SnapshotError, match="not as torch.save writes"):
        load_snapshot(snapshot)
    assert convert_snapshot.main([str(snapshot)]) == 2  # the converter loads with the same check
    one_line_error(capsys, "not as torch.save writes")
    ours = tmp_path / "ref.npz"
    save_stats(str(ours), np.zeros(4), np.eye(4), {"n_images": 1})
    assert file_reference(str(recompressed(ours, tmp_path / "deflated.npz", zipfile.ZIP_DEFLATED)))  # as numpy writes
    big = tmp_path / "zeros.npz"
    np.savez_compressed(big, mu=np.zeros(4), sigma=np.zeros((2000, 2000)))  # 32 MB of zeros in some 30 KB
    for bomb in (big, recompressed(ours, tmp_path / "bzip2.npz", zipfile.ZIP_BZIP2)):
        with pytest.raises(ReferenceUnavailable, match="not as numpy writes"):
            file_reference(str(bomb))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)})
    with zipfile.ZipFile(tmp_path / "overstated.npz", "w") as archive:  # 800 TB declared in 128 bytes
        archive.writestr("mu.npy", header.getvalue())
        archive.writestr("sigma.npy", header.getvalue())
    with pytest.raises(ReferenceUnavailable, match=r"declares \(10000000, 10000000\) of float64, more than it holds"):
        file_reference(str(tmp_path / "overstated.npz"))
    small = io.BytesIO()
    np.lib.format.write_array(small, np.zeros(4))
    with zipfile.ZipFile(tmp_path / "overstated.npz", "w") as archive:
        archive.writestr("mu.npy", small.getvalue())
        archive.writestr("sigma", header.getvalue())  # numpy serves "sigma" as "sigma.npy": checked the same
    with pytest.raises(ReferenceUnavailable, match=r"declares \(10000000, 10000000\) of float64, more than it holds"):
        file_reference(str(tmp_path / "overstated.npz"))
    np.savez(tmp_path / "meta.npz", mu=np.zeros(4), sigma=np.eye(4), meta=np.array("[1]"))
    with pytest.raises(ReferenceUnavailable, match="its meta is not a mapping"):
        file_reference(str(tmp_path / "meta.npz"))
    from source.metrics.reference import features_path
    from source.metrics.statistics import StatsMismatch

    for garbage in (b"not a torch file", None):
        if garbage is None:
            torch.save([1, 2], features_path(str(ours)))  # torch's, but not ours
        else:
            Path(features_path(str(ours))).write_bytes(garbage)
        with pytest.raises(StatsMismatch, match="are not readable .*; delete it"):  # a training run's evaluation
            file_reference(str(ours))  # reports it in one line and goes on (EVALUATION_ERRORS)


def legacy_torch_file(path: Path, obj, declared: int) -> Path:
    """``obj`` in torch's legacy (pre-zip) format with every storage declared ``declared`` floats and no storage data
    written: torch reserves what the file declares, unchecked (a crafted file's way to gigabytes)."""
    import pickle

    class Pickler(pickle.Pickler):
        def persistent_id(self, item):
            if isinstance(item, torch.storage.TypedStorage):
                return "storage", torch.FloatStorage, str(id(item)), "cpu", declared, None
            return None

    sys_info = {"protocol_version": torch.serialization.PROTOCOL_VERSION, "little_endian": sys.byteorder == "little",
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as handle:
        for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, sys_info):
            pickle.dump(header, handle, protocol=2)
        Pickler(handle, protocol=2).dump(obj)
        pickle.dump([], handle, protocol=2)  # the storage keys whose data follow: none
    return path


def test_small_files_that_declare_gigabytes_are_refused_before_their_values_are_read(tmp_path, trained, capsys):
    """torch's legacy format: a 25 KB snapshot declaring some 100 GB of tensors (its first read of the values would
    have allocated them); an .npz of a thousand deflated 1 MiB members (each within the per-member allowance)."""
    import zipfile

    from source.files import torch_load
    from source.spectral.spectra import load_spectra

    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_4.pt")
    weights = {"w0": torch.empty(2**27), "w1": torch.empty(2**27)}  # never touched: pickled by a storage id alone
    bomb = legacy_torch_file(tmp_path / "legacy.pt", {**snapshot, "dis": weights, "gen": {}}, declared=2**27)
    assert bomb.stat().st_size < 100_000
    for _ in range(2):  # the second time with a zip's end-of-archive record appended (torch goes by the first bytes)
        with pytest.raises(checkpoint.SnapshotError, match=r"tensors of [\d,]+ bytes in a file of [\d,]+ bytes"):
            load_snapshot(bomb, training_state=True)
        bomb.write_bytes(bomb.read_bytes() + b"PK\x05\x06" + bytes(18))
    honest = tmp_path / "honest.pt"
    torch.save({"w": torch.arange(4.0)}, honest, _use_new_zipfile_serialization=False)
    assert torch.equal(torch_load(honest)["w"], torch.arange(4.0)), "a genuine legacy file still loads"

    member = io.BytesIO()
    np.lib.format.write_array(member, np.zeros(2**17))  # 1 MiB of zeros, some 1 KB deflated
    with zipfile.ZipFile(tmp_path / "spectra_iter_1.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(1000):
            archive.writestr(f"m{index}.npy", member.getvalue())
    with pytest.raises(ValueError, match="not as numpy writes"):
        load_spectra(tmp_path / "spectra_iter_1.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "plain.npz")  # numpy reads a file by its contents, not its name
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_spectra(tmp_path / "plain.npz")
    header = io.BytesIO()  # an .npy header declaring 8 TiB: numpy allocated it before any check saw the file
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
    (tmp_path / "huge.npz").write_bytes(header.getvalue())
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_spectra(tmp_path / "huge.npz")


def test_crafted_spectra_files_and_fifos_in_a_run_folder_are_one_line_errors(tmp_path, trained, capsys):
    from figures import collapse, spectra
    from figures.common import command_line

    run = tmp_path / "run"
    (run / "spectra").mkdir(parents=True)
    np.savez(run / "spectra" / "spectra_iter_2.npz", iteration=np.array(2), **{
        "dis/l0/s": np.ones(3), "dis/l0/kind": np.array("conv"), "dis/l0/sigma_hat": np.ones(2),
        "dis/conv_index": np.array("l0"), "gen/conv_index": np.array(["x"])})
    assert command_line(spectra.main, [str(run)]) == 2
    one_line_error(capsys, "an entry of the wrong shape or type")
    os.mkfifo(run / "spectra" / "spectra_iter_4.npz")  # listed by name only, it blocked the read for good
    (run / "spectra" / "spectra_iter_2.npz").unlink()
    assert command_line(spectra.main, [str(run)]) == 2
    one_line_error(capsys, "holds no spectra_iter_*.npz files")
    received = tmp_path / "received"
    (received / "snapshots").mkdir(parents=True)
    for name in ("config.yaml", "log.jsonl"):
        (received / name).write_bytes((trained / name).read_bytes())
    for name in ("generator_iter_4.pt",):
        (received / "snapshots" / name).write_bytes((trained / "snapshots" / name).read_bytes())
    os.mkfifo(received / collapse.CACHE)  # its append (the mode measures' cache) waited for a reader for good
    assert command_line(collapse.main, [str(received), "--per-class", "2"]) == 2
    captured = capsys.readouterr()
    assert "is neither a file nor a folder (a FIFO, socket or device)" in captured.err and captured.err.count("\n") == 1
    assert "mode measures of generator_iter_4.pt: 2 x " in captured.out  # the minutes a measure takes are announced


def test_a_snapshot_whose_config_asks_for_bigger_models_is_refused_before_they_are_built(tmp_path, trained, capsys,
                                                                                          monkeypatch):
    from source.training import build
    from source.training import evaluate as evaluate_module

    for name in ("snapshot_iter_4.pt", "generator_iter_4.pt"):
        snapshot = load_snapshot(trained / "snapshots" / name)
        snapshot["config"]["models"]["generator"]["args"]["ch"] = 3072  # 2.8 GiB before the weights were refused, the review saw
        torch.save(snapshot, tmp_path / name)
    monkeypatch.setattr(build, "build_models", lambda *_: pytest.fail("the models were built"))
    monkeypatch.setattr(evaluate_module, "build_model", lambda *_: pytest.fail("G was built"))
    assert train.main(["--resume", str(tmp_path / "snapshot_iter_4.pt")]) == 2
    one_line_error(capsys, "does not fit the configured models (gen: ")
    with pytest.raises(ValueError, match="the generator weights 'gen' do not fit .* of another shape"):
        evaluate_module.load_generator(str(tmp_path / "generator_iter_4.pt"), torch.device("cpu"))


# --- 7./9./12. one-line errors and the README's commands ----------------------------------------

@pytest.mark.parametrize("override, message", [
    ("models=5", "models: expected a mapping, got int 5"),
    ("models.generator.args=[1,2]", "models.generator.args: expected dict"),
    ("models.generator.args.ch=0", "ch must be a positive integer, got 0"),
    ("models.discriminator.args.resolution=96", "resolution must be one of [32, 48, 64, 128], got 96"),
    ("models.generator.args.n_classes=-3", "n_classes must be >= 0"),
    ("adam_G.alpha=-1", "adam_G: need 0 <= alpha <= 1"),
    ("adam_D.beta1=2", "adam_D: need 0 <= alpha <= 1, 0 <= beta1 < 1"),
    ("adam_D.alpha=.inf", "adam_D: need 0 <= alpha <= 1"),  # these two trained into the NaN guard or a traceback
    ("adam_D.eps=1e308", "0 <= eps <= 1, got alpha=0.0004, beta1=0.0, beta2=0.999, eps=1e+308"),
    ("device=banana", "device: expected auto, cpu, cuda or cuda:N, got 'banana'"),
    ("device=cuda:99999999999999999999", "device: expected auto, cpu, cuda or cuda:N"),  # torch: a traceback
    ("iteration=10:00", "iteration: expected int, got str '10:00'"),  # YAML 1.1's base 60 read it as 600
    ("iteration=020000", "iteration: expected int, got str '020000'"),  # YAML 1.1's octal read it as 8192
    ("updater.lecam.weight=1:30.0", "updater.lecam.weight: expected float, got str '1:30.0'"),  # base 60: 90.0
    ("updater.lecam.weight=.inf", "updater.lecam.weight: must be a finite number >= 0"),
    ("updater.gsr.weight=.inf", "updater.gsr.weight: must be a finite number >= 0"),  # trained into the NaN guard
    ("evaluation.n_samples=1000001", "evaluation.n_samples: 1000001 is over 1,000,000"),  # latents drawn at once
    ("evaluation.metrics=[[is]]", "evaluation.metrics[0]: expected 'is' or 'fid' or 'kid', got list"),
    # the synthetic data's defaults are read from the generator before validation: these two were tracebacks
    ("models.generator.args.n_classes=abc", "models.generator.args.n_classes: expected int, got str 'abc'"),
    ("dataset.name=[1]", "dataset.name: expected str, got list [1]"),
])
def test_bad_settings_are_one_line_errors(override, message, capsys):
    assert train.main(tiny_argv(Path("never-created"), 2, override)) == 2
    one_line_error(capsys, message)
    assert not Path("never-created").exists()


def test_a_config_giving_a_key_twice_is_refused(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text((CONFIGS / "demo.yaml").read_text() + "\nseed: 7\n")  # demo.yaml has a seed already
    assert train.main(["--config", str(config), "--dry-run"]) == 2
    one_line_error(capsys, "(the key 'seed' is given twice)")
    colliding = "".join(f"  {k * (2**61 - 1)}: 0\n" for k in range(1, 1200))  # one hash: quadratic time to build
    for text, message in [("\n0x1: a\n1: b\n", "the key '1' is given twice"),  # both the key 1: the last won
                          ("\nseed: 010\n", "010 reads as an octal number in YAML"),  # seed 8
                          ("\nextra:\n" + colliding, "a mapping of 1199 keys, more than 1000")]:
        config.write_text((CONFIGS / "demo.yaml").read_text().replace("\nseed:", "\nold_seed:") + text)
        assert train.main(["--config", str(config), "--dry-run"]) == 2
        one_line_error(capsys, message)


def test_running_out_of_memory_is_one_line(tmp_path, trained, capsys):
    """G's batch of 10^12 asked the CPU allocator for 512 TB: torch's RuntimeError, said in one line."""
    assert train.main(tiny_argv(tmp_path / "run", 2, "gen_batchsize=1000000000000", "evaluation.metrics=[]")) == 1
    one_line_error(capsys, "error: out of memory (")
    snapshot = str(trained / "snapshots" / "generator_iter_4.pt")
    assert evaluation.main(["samples", "--snapshot", snapshot, "--n", str(10**12), "--out", str(tmp_path / "s")]) == 1
    one_line_error(capsys, "error: out of memory (")


@pytest.mark.parametrize("ch, message", [
    (10**8, "models.generator.args: the network cannot be built on cpu ([enforce fail at alloc_cpu.cpp"),  # 800 GB
    (10**17, "models.generator.args: the network cannot be built on cpu (Storage size calculation overflowed"),
])
def test_models_too_large_to_build_are_a_config_error(tmp_path, capsys, ch, message):
    """A typo in ch once reached the allocator, whose out-of-memory error advised smaller batches."""
    assert train.main(tiny_argv(tmp_path / "run", 2, f"models.generator.args.ch={ch}")) == 2
    err = one_line_error(capsys, message)
    assert err.endswith("; check its sizes (ch, ...)\n"), err


def test_models_whose_training_state_exceeds_the_memory_are_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build, "memory_of", lambda device: 2**18)  # 256 KiB: the tiny models' Adam state is more
    assert train.main(tiny_argv(tmp_path / "run", 2)) == 2
    one_line_error(capsys, "models: G has 20,609 and D 4,289 parameters; their weights, gradients and Adam state "
                           "need 0.000371 GiB but cpu has 0.000244 GiB: check models.*.args (ch, ...)")
    assert not (tmp_path / "run" / "snapshots").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    assert train.main(tiny_argv(tmp_path / "run", 2, "device=cuda")) == 2
    one_line_error(capsys, "no CUDA GPU is visible here")


def test_bad_paths_are_one_line_errors(tmp_path, trained, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--config", str(CONFIGS)], "is a directory"),
             (["--config", str(CONFIGS / "demo.yml")],
              f"config file not found (did you mean {CONFIGS / 'demo.yaml'}?)"),
             (["--resume", str(tmp_path)], f"is a directory; give a snapshot file such as {tmp_path}/snapshots/"),
             (["--resume", str(trained)], f"such as {trained}/snapshots/snapshot_iter_4.pt (its newest)"),
             (tiny_argv(a_file, 2), "is a file, not a run folder"),
             (tiny_argv(Path("/proc/no/such/run"), 2), "cannot create the run folder /proc/no/such/run")]
    for argv, message in cases:
        assert train.main(argv) == 2
        one_line_error(capsys, message)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("config"), "has no 'config' entry"),
    (lambda s: s.update(data={"epoch": "x"}), "its data.epoch is 'x', not a count"),
    (lambda s: s.update(data={"epoch": 0, "batch_in_epoch": 0, "global_batch_size": "x"}),
     "its data.global_batch_size is 'x', not a count"),
    (lambda s: s["data"].update(batch_in_epoch=2**32 - 1, global_batch_size="xxxx"),  # was multiplied first: 16 GB
     "its data.global_batch_size is 'xxxx', not a count"),
    (lambda s: s.update(rng=[{"torch": 1}]), "'rng' entry is damaged"),
    (lambda s: s.update(iteration=-1), "iteration -1 is negative"),
    (lambda s: s["opt_dis"].update(state=[1, 2]), "'list' object has no attribute"),
    # found by a fuzzing pass over the snapshot's entries: each was a traceback (or a silent misuse) before
    (lambda s: s["opt_dis"]["state"][0].update(exp_avg=torch.zeros(3)), "(opt_dis: exp_avg of parameter 0 is (3,)"),
    (lambda s: s["gen"].update({"l1.bias": s["gen"]["l1.bias"] * float("nan")}), "holds NaN/Inf in 1 tensors (first: "
                                                                                   "gen.l1.bias); resume from an earlier"),
    (lambda s: s["gen"].update({"l1.bias": "x"}), "its 'gen' entry holds a str at l1.bias, not a tensor"),
    (lambda s: s.update(gen_ema="x"), "its 'gen_ema' entry is a str, not a dict"),
    (lambda s: s["updater"].update(iteration="x"), "its updater.iteration is 'x', not a count equal to its iteration 2"),
    (lambda s: s["data"].update(batch_in_epoch=-5), "its data.batch_in_epoch is -5, not a count"),
    (lambda s: s.update(elapsed="x"), "its 'elapsed' entry is a str, not seconds"),
    (lambda s: s.update(elapsed=10**400), "its 'elapsed' entry 1000000000000000000000000000000000000000 is not a run"),
    (lambda s: s["extensions"].update(LogReport={"sums": {"loss_dis": "a"}, "count": 1}),
     "'extensions' entry is damaged (ValueError: LogReport's sums and count are not finite loss sums and a count)"),
    (lambda s: s["updater"]["sr"]["ratios"].update({"block1.c1": torch.ones(1)}),
     "SR envelope of layer 'block1.c1' has 1 values but the layer has 8 singular values"),
    # the second campaign's: a view repeating one stored number into gigabytes (which checking its values would
    # allocate), tensors torch.save never writes of a model, and types a load would cast silently
    (lambda s: s["opt_gen"]["state"][0].update(exp_avg=torch.zeros(1).expand(2**15, 2**15)),
     "it holds a tensor of shape (32768, 32768) over 4 stored bytes, which torch.save never writes of a model"),
    # the third: many views of one storage (each check of the values would read it again: 1000 views of 64 MB
    # of zeros took take-back 113 s from a 20 KB part)
    (lambda s: s.update(extra=[zeros[:] for zeros in [torch.zeros(2**19)] for _ in range(8)]),
     "stored (the same storage over and over), which torch.save never writes of a model"),
    (lambda s: s["gen"].update({"l1.bias": torch.empty(8, device="meta")}), "it holds a float32 tensor (strided, on meta)"),
    (lambda s: s["gen"].update({"l1.bias": s["gen"]["l1.bias"].to_sparse()}), "it holds a float32 tensor (sparse_coo"),
    (lambda s: s["gen"].update({"l1.bias": s["gen"]["l1.bias"].to(torch.complex64)}), "it holds a complex64 tensor"),
    (lambda s: s["gen"].update({"l1.bias": s["gen"]["l1.bias"].double() * 1e300}),
     "(gen: 1 of another type (first: l1.bias is torch.float64 in the snapshot, torch.float32 here))"),
    (lambda s: s["opt_dis"]["state"][0].update(exp_avg=s["opt_dis"]["state"][0]["exp_avg"].long()),
     "(opt_dis: exp_avg of parameter 0 is torch.int64, the parameter torch.float32"),
    (lambda s: s["extensions"].update(Spectra={"detector": {"peaks": {"block1.c1": [1e300, 2]}}}),
     "the collapse detector's peak of block1.c1 is 1e+300 at iteration 2, not a score of [0, 1]"),  # faked a collapse
    (lambda s: s["extensions"].update(Spectra={"detector": {"peaks": {"block1.c1": [float("nan"), 2]}}}),
     "the collapse detector's peak of block1.c1 is nan"),  # stopped every detection
])
def test_damaged_snapshots_are_one_line_errors(tmp_path, trained, capsys, recwarn, damage, message):
    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_2.pt")
    damage(snapshot)
    path = tmp_path / "damaged.pt"
    torch.save(snapshot, path)
    argv = tiny_argv(tmp_path / "out", 4) + ["--resume", str(path)]
    assert train.main(argv) == 2
    one_line_error(capsys, message)
    assert not recwarn.list, [str(w.message) for w in recwarn]  # a warning is a line more (torch's on sparse tensors)


@pytest.mark.parametrize("content", [b"hi\n", b"abcdefgh"])
def test_a_small_file_of_other_bytes_is_one_line_as_a_snapshot_or_as_inception_weights(tmp_path, trained, capsys,
                                                                                         content):
    """torch's unpickler meets such bytes with KeyError or IndexError, not the errors a damaged file gives."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    assert train.main(["--resume", str(path)]) == 2
    one_line_error(capsys, f"{path} is not a readable snapshot (not a file written by torch.save, or damaged)")
    snapshot = str(trained / "snapshots" / "generator_iter_4.pt")
    assert evaluation.main(["metrics", "--snapshot", snapshot, "--inception-weights", str(path)]) == 2
    one_line_error(capsys, "not a file written by torch.save, or damaged")


def test_a_model_mismatch_names_the_first_tensor_and_its_shapes(tmp_path, trained, capsys):
    argv = tiny_argv(tmp_path / "out", 4, "models.discriminator.args.ch=16")
    assert train.main(argv + ["--resume", str(trained / "snapshots" / "snapshot_iter_2.pt")]) == 2
    one_line_error(capsys, "(dis: 42 of another shape (first: block1.c1.bias is (8,) in the snapshot, (16,) here))")


def test_readme_resume_command_keeps_the_runs_own_settings(tmp_path, trained, monkeypatch, capsys):
    """README step 4, as printed: --config of the file, --resume, one --set; the run's overrides are kept."""
    monkeypatch.chdir(CONFIGS.parent)
    snapshot = str(trained / "snapshots" / "snapshot_iter_4.pt")
    argv = ["--config", "configs/demo.yaml", "--resume", snapshot, "--set", "updater.apply_SR=false",
            "--set", "iteration=5"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "config change: updater.apply_SR: true -> false" in out and "config change: iteration: 4 -> 5" in out
    assert "note: resuming with the run's own settings, not those of configs/demo.yaml" in out
    branch = trained.with_name("run-resume4")
    config = load_config(branch / "config.yaml")
    assert config.dataset.name == "synthetic" and config.batchsize == 8 and config.updater.apply_SR is False


def test_switching_to_synthetic_data_derives_its_size_from_the_generator():
    overrides = ["dataset.name=synthetic", "models.generator.args.resolution=32", "models.discriminator.args.resolution=32"]
    config = load_config(CONFIGS / "sr_imagenet.yaml", overrides)
    assert config.dataset.args.size == 32 and config.dataset.args.n_classes == 1000


def test_log_lines_have_an_eta(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 2)) == 0
    assert " eta=0:00:00" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["eta_s"] for r in records if "loss_dis" in r][-1] == 0


def test_the_eta_counts_evaluations_as_often_as_they_came_not_one_intervals_rate(monkeypatch):
    from types import SimpleNamespace

    from source.training import extensions
    clock = iter([0.0, 10.0, 20.0, 50.0, 60.0])  # made; then reports after 10 s, 10 s, 30 s (an evaluation), 10 s
    monkeypatch.setattr(extensions.time, "perf_counter", lambda: next(clock))
    records = []
    world = SimpleNamespace(is_main=False, distributed=False)
    trainer = SimpleNamespace(iteration=0, stop=1000, elapsed=0.0, world=world,
                              log=SimpleNamespace(write=records.append),
                              updater=SimpleNamespace(batches=SimpleNamespace(epoch=0, dataset=None),
                                                      learning_rates=dict))
    report = extensions.LogReport(100)
    for _ in range(4):
        for _ in range(100):
            report.observe({"loss_dis": 1.0})
        trainer.iteration += 100
        report(trainer)
    assert [r["it_per_s"] for r in records] == [10.0, 10.0, 100 / 30, 10.0]  # each interval's own rate
    # none from the first interval (start-up and warm-up: a resumed run's first line was 6x off), then this
    # process's rate since: 300 iterations in 50 s
    assert [r["eta_s"] for r in records] == [None, 80.0, 700 / (200 / 40), 600 / (300 / 50)]


# --- 8. Ctrl-C under torchrun -----------------------------------------------------------------------

def test_ctrl_c_under_the_launcher_is_one_line_with_the_resume_command(tmp_path):
    """The terminal's Ctrl-C reaches torchrun's process group; torchrun forwards it to the workers."""
    import signal
    import subprocess

    from test_training import _free_port

    out = tmp_path / "run"
    # torchrun's default 30 s for the workers' last iteration, snapshot and barrier may not do on a loaded machine
    command = [sys.executable, "-m", "source.training.launch", "--nproc_per_node", "2", "--shutdown-timeout", "120",
               "--master_port", str(_free_port()), "train.py",
               *tiny_argv(out, 1000, "evaluation.metrics=[]", "snapshot_interval=1000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR"}
    process = subprocess.Popen(command, cwd=CONFIGS.parent, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "log.jsonl").is_file() or '"loss_dis"' not in (out / "log.jsonl").read_text():
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        console, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGINT, console[-3000:]
    assert "Traceback" not in console and console.strip().splitlines()[-1].startswith("launch: SIGINT received")
    assert "SIGINT received: finishing iteration" in console  # rank 0 said so at the signal
    resume_line = next(line for line in console.splitlines() if "resume with --resume" in line)
    snapshot = load_snapshot(resume_line.split("--resume ")[1].strip(), training_state=True)
    assert len(snapshot["rng"]) == 2


def test_a_workers_bad_input_under_the_launcher_is_its_line_and_status_without_a_traceback(tmp_path):
    import subprocess

    from test_training import _free_port

    command = [sys.executable, "-m", "source.training.launch", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "train.py", *tiny_argv(tmp_path / "run", 2, "batchsize=4")]
    done = subprocess.run(command, cwd=CONFIGS.parent, env={**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "ERROR"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "is not divisible by micro_batchsize x world size" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("launch: worker ")


def test_the_launcher_repeats_the_line_of_the_worker_that_failed_when_rank_0_was_stopped_before_saying_it(
        tmp_path, monkeypatch, capsys):
    """torchrun SIGTERMs the other workers as soon as one fails: rank 1 met the bad setting first and exited, rank 0
    (which speaks for all before the process group exists) was stopped before printing it, with no error file."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from source.training import distributed, launch

    error_file = tmp_path / "1" / "error.json"
    error_file.parent.mkdir()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    distributed.record_for_launcher("error: --set batchsize: 4 is not divisible")
    assert json.loads(error_file.read_text())["message"]["message"] == "error: --set batchsize: 4 is not divisible"
    stopped = ProcessFailure(local_rank=0, pid=10, exitcode=-signal.SIGTERM, error_file=str(tmp_path / "absent.json"))
    failed = ProcessFailure(local_rank=1, pid=11, exitcode=2, error_file=str(error_file))
    stopped.timestamp = failed.timestamp - 1  # the stop may be stamped first: seconds are coarse
    raised = ChildFailedError("train.py", {0: stopped, 1: failed})

    def run(_):
        raise raised

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.setattr(sys, "argv", ["launch", "train.py"])
    assert launch.main() == 2
    assert capsys.readouterr().err.splitlines() == [
        "launch: worker 1 failed with exit status 2: error: --set batchsize: 4 is not divisible"]
    # rank 0 recorded its line and was stopped before it exited (seen on a loaded machine: exit status 1, not 2)
    stopped_after = ProcessFailure(local_rank=0, pid=10, exitcode=-signal.SIGTERM, error_file=str(error_file))
    stopped_after.timestamp = failed.timestamp - 1
    raised = ChildFailedError("train.py", {0: stopped_after, 1: failed})
    assert launch.main() == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("launch: worker 1 failed with exit status 2: ")


def test_a_received_snapshot_does_not_make_a_resume_download_into_the_folder_it_names(tmp_path, trained):
    import argparse

    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_4.pt")
    chosen = str(tmp_path / "chosen_by_sender")
    snapshot["config"]["dataset"] = {"name": "cifar10", "args": {"root": chosen, "download": True}}
    for overrides, expected in (([], False), (["dataset.args.download=true"], True)):
        args = argparse.Namespace(resume="received.pt", overrides=overrides, config=None)
        assert resume.settings(args, snapshot).dataset.args.download is expected
    # whether to fetch the files is not the recipe: switched off, the run still continues in place
    assert resume.recipe_changes(["dataset.args.download: true -> false"], "cifar10") == []


def test_a_received_snapshots_cache_folder_is_used_only_where_it_holds_references(tmp_path, trained, capsys):
    """Its evaluation.cache_dir names a folder of the sender's machine: unless it holds reference statistics here,
    references are cached in the default folder (said in one note), the run continuing in place; --set keeps it.
    (A folder that merely could be made here, such as ~/.config/autostart, was made and written into.)"""
    import argparse

    from source.config import EvaluationConfig

    snapshot = load_snapshot(trained / "snapshots" / "snapshot_iter_4.pt")
    theirs = tmp_path / "their" / "refs"
    snapshot["config"]["evaluation"]["cache_dir"] = str(theirs)
    cache_dir = lambda *overrides: resume.settings(argparse.Namespace(resume="r.pt", overrides=list(overrides),
                                                                          config=None), snapshot).evaluation.cache_dir
    assert cache_dir() == EvaluationConfig.cache_dir
    out = capsys.readouterr().out
    assert f"evaluation.cache_dir {theirs} holds no reference statistics here" in out and out.count("\n") == 1
    assert cache_dir(f"evaluation.cache_dir={theirs}") == str(theirs) and not theirs.exists()
    assert cache_dir("evaluation={cache_dir: " + str(theirs) + "}") == str(theirs)  # a mapping set with it
    theirs.mkdir(parents=True)  # a folder that exists, but is no cache of references
    assert cache_dir() == EvaluationConfig.cache_dir and "holds no reference statistics" in capsys.readouterr().out
    (theirs / "synthetic_train_32px_64_tfinception.npz").write_bytes(b"")  # the user's own cache: used as it is
    assert cache_dir() == str(theirs) and capsys.readouterr().out == ""
    assert resume.recipe_changes([f"evaluation.cache_dir: {theirs} -> data/reference_stats"], "fashion_mnist") == []


def test_a_log_line_that_is_not_a_record_stops_a_resume_in_one_line(tmp_path, trained, capsys):
    run = copy_run(trained, tmp_path / "run")
    with open(run / "log.jsonl", "a") as log:
        log.write('{"iteration": "5", "loss_dis": 1.0}\n')
    assert train.main(["--resume", unfinished(run)]) == 2
    one_line_error(capsys, "log.jsonl:")
    from source.training.runlog import DamagedLog, read_jsonl

    (tmp_path / "digits.jsonl").write_text('{"iteration": ' + "9" * 5000 + '}\n{"iteration": 1}\n')
    with pytest.raises(DamagedLog, match=r"digits.jsonl:1 is not a log record \(Exceeds the limit"):
        read_jsonl(tmp_path / "digits.jsonl")  # the message named no file
