"""What produced a run's numbers: the code version, the machine, the command (source/provenance.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from source import provenance
from source.training.runlog import events
from test_training import tiny_argv

CARRIED = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True}


def git(folder: Path, *arguments: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def no_carried_code(monkeypatch):
    monkeypatch.setenv(provenance.CODE_ENV, "")  # undone after the test, whatever a test sets in between


def test_the_code_version_is_the_checkouts_commit_and_whether_its_tracked_files_changed(tmp_path, no_carried_code):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "model.py").write_text("width = 32\n")
    git(repo, "init", "-q")
    git(repo, "add", "model.py")
    git(repo, "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD")
    assert provenance.code_version(repo) == {"commit": head, "dirty": False}
    (repo / "notes.txt").write_text("untracked")
    assert provenance.code_version(repo) == {"commit": head, "dirty": False}, "untracked files are not looked at"
    (repo / "model.py").write_text("width = 64\n")
    assert provenance.code_version(repo) == {"commit": head, "dirty": True}
    assert provenance.describe(provenance.code_version(repo)) == f"commit {head[:7]} with local changes"
    # a copy of the code inside another project's checkout is not that project's commit
    inside = provenance.code_version(repo / "sub")
    assert inside["commit"] is None and f"{repo / 'sub'} is not the top of a git checkout" in inside["why"]
    assert provenance.describe(inside) == "code version unknown"


def test_outside_a_checkout_the_carried_code_version_is_used_if_well_formed(tmp_path, monkeypatch, no_carried_code):
    monkeypatch.setenv(provenance.CODE_ENV, json.dumps(CARRIED))
    assert provenance.code_version(tmp_path) == {**CARRIED, "from": "carry"}
    assert provenance.code_version()["commit"] == git(provenance.ROOT, "rev-parse", "HEAD"), "a checkout's own first"
    for malformed in ("not json", "[]", json.dumps({**CARRIED, "commit": "0123abc"}),
                      json.dumps({**CARRIED, "dirty": "yes"}), json.dumps({"commit": CARRIED["commit"]})):
        monkeypatch.setenv(provenance.CODE_ENV, malformed)
        assert provenance.code_version(tmp_path)["commit"] is None, malformed


def test_every_start_of_train_py_records_its_command_code_and_machine(tmp_path, monkeypatch, no_carried_code):
    run = tmp_path / "run"
    argv = tiny_argv(run, 2)
    assert train.main(argv) == 0
    (record,) = events(run, "started")
    assert record["iteration"] == 0 and record["command"] == ["train.py", *argv] and record["world_size"] == 1
    assert record["code"] == provenance.code_version()
    assert record["code"]["commit"] == git(provenance.ROOT, "rev-parse", "HEAD")
    assert record["machine"] == {"device": provenance.cpu_model(), "python": record["machine"]["python"],
                                 "torch": torch.__version__, "cuda": None, "cudnn": None}
    # a branch on a machine whose copy of the code has no .git (a lent GPU's): the commit its carry named
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-git"))
    monkeypatch.setenv(provenance.CODE_ENV, json.dumps(CARRIED))
    resumed = ["--resume", str(run / "snapshots" / "snapshot_iter_2.pt"), "--set", "iteration=3", "--out",
               str(tmp_path / "branch")]
    assert train.main(resumed) == 0
    (branched,) = events(tmp_path / "branch", "started")  # a branch's log begins with it
    assert branched["iteration"] == 2 and branched["command"] == ["train.py", *resumed]
    assert branched["code"] == {**CARRIED, "from": "carry"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU here its name is read")
def test_a_gpu_that_cannot_be_reached_is_named_so_and_raises_nothing():
    # a chunk's record is written after its runs, which may have left the GPU unusable: it must still be written
    assert provenance.device_name(torch.device("cuda")).startswith("a CUDA device whose name could not be read (")


def test_the_gpu_scripts_hand_the_code_version_recorded_beside_the_wheels_to_what_they_run(tmp_path):
    # prepare.sh writes code.json into the carried wheels folder; run.sh and gpu_tests.sh export it before the
    # benchmarks and tests run on the lent machine (no wheels there: nothing is installed, the export still happens)
    (tmp_path / "code.json").write_text(json.dumps(CARRIED))
    script = f"source benchmarks/gpu/wheels.sh; install_carried_wheels {tmp_path}; printenv {provenance.CODE_ENV}"
    environment = {key: value for key, value in os.environ.items() if key != provenance.CODE_ENV}
    done = subprocess.run(["bash", "-c", script], cwd=provenance.ROOT, capture_output=True, text=True,
                          env=dict(environment, PYTHON=sys.executable))
    assert json.loads(done.stdout.splitlines()[-1]) == CARRIED
    done = subprocess.run(["bash", "-c", script], cwd=provenance.ROOT, capture_output=True, text=True,
                          env=dict(environment, PYTHON=sys.executable, **{provenance.CODE_ENV: "set by the caller"}))
    assert done.stdout.splitlines()[-1] == "set by the caller"
