"""Several runs in one process (train.py --group): each computes what it computes alone, fails alone, stops with a
snapshot; and the study runner's --per-process, which starts such groups."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from source.study import runner, state
from source.study.spec import load_study
from source.training.checkpoint import load_snapshot, snapshots_of
from source.training.runlog import read_jsonl
from source.training.trainer import Trainer
from test_study import write_study
from test_training import tiny_argv

ROOT = Path(__file__).resolve().parents[1]


def write_group(path: Path, runs: dict[str, list[str]]) -> Path:
    specs = [{"args": args, "log": str(path.parent / f"{name}.log"), "status": str(path.parent / f"{name}.status")}
             for name, args in runs.items()]
    path.write_text(json.dumps(specs))
    return path


def status_of(path: Path, name: str) -> int:
    return json.loads((path.parent / f"{name}.status").read_text())["returncode"]


def final_state(folder: Path) -> dict:
    snapshot = load_snapshot(snapshots_of(folder)[-1])
    return {"iteration": snapshot["iteration"], **{f"{net}.{key}": value for net in ("gen", "dis")
                                                     for key, value in snapshot[net].items()}}


def losses(folder: Path) -> list[tuple]:
    return [(r["iteration"], r["loss_dis"], r["loss_gen"]) for r in read_jsonl(folder / "log.jsonl") if "loss_dis" in r]


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="one CUDA stream per run, step graphs: run it on a GPU machine"))])
def test_runs_of_a_group_compute_what_each_computes_alone(tmp_path, device):
    # two different runs of different lengths: dynamic SR on one, the other ends first and the group goes on; on a
    # GPU each run on its own stream, with its steps as CUDA graphs (captured from a step's 4th call), the losses
    # read every 5 iterations, so that the runs' iterations in between overlap on the device
    on = ["device=cpu"] if device == "cpu" else ["device=cuda", "performance.step_graphs=true",
                                                 "performance.fused_adam=true", "display_interval=5"]
    lengths = ("4", "6") if device == "cpu" else ("10", "15")
    runs = {"a": (lengths[0], "seed=3", *on), "b": (lengths[1], "updater.apply_SR=false", "updater.n_dis=2", *on)}
    group = write_group(tmp_path / "group.json", {name: tiny_argv(tmp_path / "grouped" / name, int(n), *extra)
                                                  for name, (n, *extra) in runs.items()})
    assert train.main(["--group", str(group)]) == 0
    for name, (n, *extra) in runs.items():
        assert train.main(tiny_argv(tmp_path / "alone" / name, int(n), *extra)) == 0
        grouped, alone = final_state(tmp_path / "grouped" / name), final_state(tmp_path / "alone" / name)
        assert grouped["iteration"] == alone["iteration"] == int(n)
        assert grouped.keys() == alone.keys() and all(torch.equal(grouped[k], alone[k]) for k in alone
                                                      if k != "iteration")
        assert losses(tmp_path / "grouped" / name) == losses(tmp_path / "alone" / name)
        assert status_of(group, name) == 0
        log = (tmp_path / f"{name}.log").read_text()  # each run's output in its own log
        folders = [line.split()[2] for line in log.splitlines() if line.startswith("run folder:")]
        assert folders == [str(tmp_path / "grouped" / name)] and f"iteration={n} " in log
        (started,) = [r for r in read_jsonl(tmp_path / "grouped" / name / "log.jsonl") if r.get("event") == "started"]
        assert started["command"][1:] == tiny_argv(tmp_path / "grouped" / name, int(n), *extra)
        assert started["group"] == str(group)  # the file those arguments came from


def test_one_runs_failure_is_its_own_and_bad_group_files_are_one_line_errors(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("")
    group = write_group(tmp_path / "group.json", {
        "good": tiny_argv(tmp_path / "good", 3),
        "taken": tiny_argv(taken, 3),  # --out holds another run's file
        "other_backends": tiny_argv(tmp_path / "other", 3, "performance.channels_last=false"),  # the demo's: true
        "typo": tiny_argv(tmp_path / "typo", 3, "updater.n_diss=2"),
        "compiled": tiny_argv(tmp_path / "compiled", 3, "performance.compile=true"),
        "bad_args": ["--config", "x.yaml", "--bogus"]})
    assert train.main(["--group", str(group)]) == 2
    assert status_of(group, "good") == 0 and final_state(tmp_path / "good")["iteration"] == 3
    for name, message in [("taken", "already holds a run"), ("other_backends", "must agree"), ("typo", "n_diss"),
                          ("compiled", "run uncompiled"), ("bad_args", "not train.py's")]:
        assert status_of(group, name) == 2
        errors = [line for line in (tmp_path / f"{name}.log").read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "other").exists() and not (tmp_path / "typo").exists()
    bad = tmp_path / "bad.json"
    for content in ("[", "[]", json.dumps([{"args": "--config x", "log": "l", "status": "s"}]), "[" * 100000):
        bad.write_text(content)
        assert train.main(["--group", str(bad)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit):
        train.main(["--group", str(group), "--out", str(tmp_path / "x")])


def test_a_group_file_writes_only_log_and_status_files_it_names(tmp_path, capsys):
    """A group file may come from someone else: its logs are appended to (with the run's arguments in an error) and
    its statuses replaced, so a shell's startup file or a link must not be a run's log or status."""
    victim = tmp_path / "bashrc"
    victim.write_text("export PS1=x\n")
    (tmp_path / "link.log").symlink_to(victim)
    (tmp_path / "folder.status").mkdir()
    good = {"args": ["--config", "nonexistent\ntouch PWNED\n#"], "log": str(tmp_path / "a.log"),
            "status": str(tmp_path / "a.status")}
    for spec, message in [({"log": str(victim)}, "run 0's log '%s' is not a .log file" % victim),
                          ({"status": str(tmp_path / "authorized_keys")}, "is not a .status file"),
                          ({"status": ""}, "is not a .status file"), ({"log": str(tmp_path / ".log")}, "not a .log"),
                          ({"log": str(tmp_path / "link.log")}, "is a link"),
                          ({"status": str(tmp_path / "folder.status")}, "is not a regular file")]:
        group = tmp_path / "group.json"
        group.write_text(json.dumps([{**good, **spec}]))
        assert train.main(["--group", str(group)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert victim.read_text() == "export PS1=x\n" and not (tmp_path / "authorized_keys").exists()
    group.write_text(json.dumps([good] * 65))
    assert train.main(["--group", str(group)]) == 2 and "at most 64 share a process" in capsys.readouterr().err
    group.write_text(json.dumps([good]))  # a valid group: the arguments are quoted, one line in the log
    assert train.main(["--group", str(group)]) == 2
    errors = [line for line in (tmp_path / "a.log").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not any(line.startswith("touch") for line in (tmp_path / "a.log").read_text().splitlines())


def test_an_error_while_a_run_closes_is_that_runs_status(tmp_path, monkeypatch):
    close = Trainer.close

    def failing_close(trainer):
        close(trainer)
        if trainer.out.name == "bad":
            raise OSError("no space left on device")

    monkeypatch.setattr(Trainer, "close", failing_close)
    group = write_group(tmp_path / "group.json", {"bad": tiny_argv(tmp_path / "bad", 2),
                                                  "good": tiny_argv(tmp_path / "good", 4)})
    assert train.main(["--group", str(group)]) == 1
    assert status_of(group, "bad") == 1 and "no space left on device" in (tmp_path / "bad.log").read_text()
    assert status_of(group, "good") == 0 and final_state(tmp_path / "good")["iteration"] == 4


def start_group(tmp_path: Path, folders: dict) -> tuple[subprocess.Popen, Path]:
    """A group of long runs in a process of its own, once every run has logged two iterations."""
    group = write_group(tmp_path / "group.json", {name: tiny_argv(folder, 100000, f"seed={i}")
                                                  for i, (name, folder) in enumerate(folders.items())})
    process = subprocess.Popen([sys.executable, "train.py", "--group", str(group)], cwd=ROOT, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 240
    while min(state.logged_iteration(f) for f in folders.values()) < 2:
        if process.poll() is not None or time.time() > deadline:  # a signal now would meet a run still starting
            process.kill()
            pytest.fail(f"the group did not train two iterations of every run: {process.communicate()[1][-2000:]}")
        time.sleep(0.3)
    return process, group


def test_a_second_sigterm_stops_a_group_at_once_and_no_run_counts_as_failed(tmp_path, monkeypatch):
    advance = Trainer.advance

    def signalled_twice(trainer):  # both signals during a's second iteration, before any snapshot
        going = advance(trainer)
        if trainer.out.name == "a" and trainer.iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return going

    monkeypatch.setattr(Trainer, "advance", signalled_twice)
    group = write_group(tmp_path / "group.json", {name: tiny_argv(tmp_path / name, 100) for name in ("a", "b")})
    assert train.main(["--group", str(group)]) == 128 + signal.SIGTERM
    assert [status_of(group, name) for name in ("a", "b")] == [-signal.SIGTERM] * 2  # the study relaunches them
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the group's handlers are gone


@pytest.mark.parametrize("grouped", [False, True])
def test_a_stop_signals_handler_writes_nothing_and_the_run_says_it_stopped(tmp_path, monkeypatch, capsys, grouped):
    # a handler that prints can interrupt a print to the same file, which Python refuses with an error ("reentrant
    # call") raised in whatever the run was doing: a group's run then failed on CI. Here the handler runs during a's
    # second iteration with printing forbidden.
    advance = Trainer.advance

    def signalled(trainer):
        going = advance(trainer)
        if trainer.out.name == "a" and trainer.iteration == 2:
            with monkeypatch.context() as silent:
                silent.setattr("builtins.print", lambda *_, **__: pytest.fail("a signal handler printed"))
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        return going

    monkeypatch.setattr(Trainer, "advance", signalled)
    names = ("a", "b") if grouped else ("a",)
    if grouped:
        group = write_group(tmp_path / "group.json", {name: tiny_argv(tmp_path / name, 100) for name in names})
        assert train.main(["--group", str(group)]) == 0
    else:
        assert train.main(tiny_argv(tmp_path / "a", 100)) == 0
    for name in names:  # said at the signal where the output has a file descriptor (a group's logs), and at the end
        console = (tmp_path / f"{name}.log").read_text() if grouped else capsys.readouterr().out
        stopped = state.latest_iteration(tmp_path / name)
        assert 2 <= stopped < 100 and f"stopping on SIGTERM: writing a snapshot at iteration {stopped}" in console
        assert ("SIGTERM received: finishing iteration" in console) == grouped


def test_sigterm_stops_every_run_of_a_group_with_a_snapshot_that_resumes(tmp_path):
    folders = {name: tmp_path / name for name in ("a", "b")}
    process, group = start_group(tmp_path, folders)
    try:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:  # not left training for the rest of the suite
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    for name, folder in folders.items():
        assert status_of(group, name) == 0
        stopped = state.latest_iteration(folder)
        assert stopped >= 2 and any(r.get("event") == "interrupted" and r["iteration"] == stopped
                                    for r in read_jsonl(folder / "log.jsonl"))
        assert "SIGTERM received" in (tmp_path / f"{name}.log").read_text()
    snapshot = snapshots_of(folders["a"])[-1]
    resumed = state.latest_iteration(folders["a"]) + 1
    assert train.main(["--resume", str(snapshot), "--set", f"iteration={resumed}"]) == 0
    (branch,) = tmp_path.glob("a-resume*")  # a longer run: a branch of a's
    assert state.latest_iteration(branch) == resumed


def test_a_study_chunk_with_runs_sharing_processes_stops_continues_and_matches_runs_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)  # the first chunk's stop comes before c, alone, is done
    arms = {"a": {}, "b": {"set": ["updater.apply_SR=true"]}, "c": {}}
    study = load_study(write_study(tmp_path, 40, **arms))
    root = tmp_path / "runs"
    reached = lambda: min(state.latest_iteration(state.run_folder(root, run)) for run in study.runs)  # noqa: E731
    lines = []
    # every chunk here runs two processes at most, so each process has the same threads (CPU results depend on them)
    runner.run_chunk(study, root, parallel=4, per_process=2, stop=lambda: reached() >= 2, echo=lines.append)
    assert sum(" in one process (" in line for line in lines) == 1  # a and b together, c alone
    stopped = {run.name: state.latest_iteration(state.run_folder(root, run)) for run in study.runs}
    # c, alone in its process, may end before a and b, which share a slower-starting one, reach their first snapshot
    assert all(2 <= stopped[run.name] < 40 or run.arm == "c" and stopped[run.name] == 40 for run in study.runs), stopped
    chunk = runner.run_chunk(study, root, parallel=6, per_process=3, echo=lines.append)
    assert {name: record["returncode"] for name, record in chunk.runs.items()} == {
        run.name: 0 for run in study.runs if stopped[run.name] < 40}
    alone = tmp_path / "alone"
    alone.mkdir()
    runner.run_chunk(load_study(write_study(alone, 40, **arms)), alone, parallel=2, echo=lambda _: 0)
    for run in study.runs:
        folder = state.run_folder(root, run)
        resumed = [r["iteration"] for r in read_jsonl(folder / "log.jsonl") if r.get("event") == "resumed"]
        # continued in place once, from where the group's stop left it (a finished run is left as it is)
        assert resumed == ([stopped[run.name]] if stopped[run.name] < 40 else [])
        grouped, straight = final_state(folder), final_state(state.run_folder(alone, run))
        assert grouped["iteration"] == 40 and all(torch.equal(grouped[k], straight[k]) for k in straight
                                                  if k != "iteration")
    assert not list(root.rglob("*.status"))  # read and removed
    history = [json.loads(line) for line in (root / "chunks.jsonl").read_text().splitlines()]
    assert [record["per_process"] for record in history] == [2, 3]
    groups = [sorted(Path(spec["log"]).name for spec in json.loads(path.read_text()))  # named after their first run
              for path in (root / "groups").glob("*.json")]
    assert [f"{run.arm}_s0.log" for run in study.runs if stopped[run.name] < 40] in groups  # the last chunk's


def test_runs_started_together_share_processes_in_groups_as_equal_as_can_be():
    sizes = lambda runs, most: [len(group) for group in runner.balanced_groups(list(range(runs)), most)]  # noqa: E731
    assert sizes(12, 8) == [6, 6] and sizes(12, 4) == [4, 4, 4] and sizes(13, 4) == [4, 3, 3, 3]
    assert sizes(3, 2) == [2, 1] and sizes(5, 1) == [1] * 5 and sizes(0, 2) == []
    assert sum(runner.balanced_groups(list(range(13)), 4), []) == list(range(13))  # in order, each once


def test_a_chunk_refuses_compile_with_runs_sharing_processes(tmp_path, capsys):
    from source.study import __main__ as study_cli

    study = str(write_study(tmp_path, 4, a={}))
    assert study_cli.main(["run", study, "--per-process", "2", "--set", "performance.compile=true"]) == 2
    assert "--per-process above 1 runs uncompiled" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before the study is read
        study_cli.main(["run", study, "--per-process", "0"])
    assert exit_.value.code == 2
