"""What produced a run's numbers: the code version, the machine, the command (source/provenance.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from source import provenance
from source.training.runlog import events
from test_training import tiny_argv

CARRIED = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}
IN_A_CHECKOUT = isinstance(provenance._checkout_commit(provenance.ROOT), dict)  # not a tarball's or a lent copy


def git(folder: Path, *arguments: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def make_repo(repo: Path) -> str:
    (repo / "sub").mkdir(parents=True)
    (repo / "model.py").write_text("width = 32\n")
    (repo / "data.jsonl").write_text("{}\n")
    git(repo, "init", "-q")
    git(repo, "add", "model.py", "data.jsonl")
    git(repo, "commit", "-q", "-m", "first")
    return git(repo, "rev-parse", "HEAD")


def test_the_code_version_is_the_checkouts_commit_and_whether_its_code_files_changed(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    head = make_repo(repo)
    assert provenance.code_version(repo) == {"commit": head, "dirty": False}
    (repo / "data.jsonl").write_text('{"chunk": 2}\n')  # data (a study's committed state) is not code
    (repo / "notes.txt").write_text("untracked")
    assert provenance.code_version(repo) == {"commit": head, "dirty": False}
    (repo / "sub" / "new_layer.py").write_text("")  # a new module the code may import
    (repo / "model.py").write_text("width = 64\n")
    assert provenance.code_version(repo) == {"commit": head, "dirty": True, "changed": ["model.py", "sub/new_layer.py"]}
    assert provenance.describe(provenance.code_version(repo)) == f"commit {head[:7]} with local changes"
    assert not (repo / ".git" / "index.lock").exists()
    # a copy of the code inside another project's checkout is not that project's commit, nor is a GIT_DIR's
    inside = provenance.code_version(repo / "sub")
    assert inside["commit"] is None and f"{repo / 'sub'} is not the top of a git checkout" in inside["why"]
    assert provenance.describe(inside) == "code version unknown"
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    assert provenance.code_version(tmp_path)["commit"] is None


def test_a_carry_names_the_commit_a_copy_was_made_from_and_whether_the_copy_still_matches(tmp_path):
    repo = tmp_path / "repo"
    head = make_repo(repo)
    (repo / "untracked.py").write_text("travels too\n")
    record = provenance.carry_record(repo)
    assert record["files"] == ["data.jsonl", "model.py", "untracked.py"] and record["commit"] == head
    copy = tmp_path / "copy"  # what the device tool sends: the files, without .git
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    (tmp_path / "code.json").write_text(json.dumps(record))
    expected = {"commit": head, "dirty": True, "changed": ["untracked.py"], "from": "carry"}  # a new code file
    assert provenance.verify_carried(tmp_path / "code.json", copy) == expected
    (copy / "model.py").write_text("width = 64\n")  # the copy taken after the carry was made
    assert provenance.verify_carried(tmp_path / "code.json", copy) == {**expected, "tree": "differs from the carry's"}
    assert provenance.describe(provenance.verify_carried(tmp_path / "code.json", copy)).endswith(
        "with local changes (carried, the copy differing)")
    for malformed in ({**record, "files": ["../repo/model.py"]}, {**record, "files": ["/etc/passwd"]},
                      {**record, "commit": "0123abc"}, {**record, "dirty": "no"}, {"commit": head}, [record]):
        (tmp_path / "code.json").write_text(json.dumps(malformed))
        assert provenance.verify_carried(tmp_path / "code.json", copy) is None, malformed
    (tmp_path / "code.json").write_text("[" * 100_000)
    assert provenance.verify_carried(tmp_path / "code.json", copy) is None
    assert provenance.verify_carried(tmp_path / "missing.json", copy) is None
    # a record that would have us hash a file many times over, or a big file outside the copy through a link
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "big.bin").write_bytes(b"x" * 1000)
    (copy / "venv").symlink_to(tmp_path / "outside")
    (tmp_path / "code.json").write_text(json.dumps({**record, "files": ["model.py"] * 2}))
    assert provenance.verify_carried(tmp_path / "code.json", copy) is None
    assert provenance.tree_digest(copy, ["venv/big.bin"]) == provenance.tree_digest(copy, ["venv/big.bin"])
    assert provenance.tree_digest(copy, ["venv/big.bin"]) != provenance.tree_digest(tmp_path, ["outside/big.bin"])
    read = []
    original = Path.read_bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or original(self))
        patch.setattr(provenance, "MOST_BYTES", 100)
        assert provenance.tree_digest(copy, ["venv/big.bin"]) is not None and read == []  # never read: outside
        (copy / "big.bin").write_bytes(b"x" * 1000)
        assert provenance.tree_digest(copy, ["big.bin"]) is None and read == []  # past MOST_BYTES: not read


def test_outside_a_checkout_the_carried_code_version_is_used_if_well_formed(tmp_path, monkeypatch):
    monkeypatch.setenv(provenance.CODE_ENV, json.dumps({**CARRIED, "tree": "differs from the carry's"}))
    assert provenance.code_version(tmp_path) == {**CARRIED, "from": "carry", "tree": "differs from the carry's"}
    for malformed in ("not json", "[]", "[" * 100_000, json.dumps({**CARRIED, "commit": "0123abc"}),
                      json.dumps({**CARRIED, "dirty": "yes"}), json.dumps({"commit": CARRIED["commit"]})):
        monkeypatch.setenv(provenance.CODE_ENV, malformed)
        assert provenance.code_version(tmp_path)["commit"] is None, malformed[:40]


@pytest.mark.skipif(not IN_A_CHECKOUT, reason="the code here is not a git checkout")
def test_every_start_of_train_py_records_its_command_code_and_machine(tmp_path, monkeypatch):
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
    monkeypatch.setattr(provenance, "_checkout_commit", lambda root: "no .git here")
    monkeypatch.setenv(provenance.CODE_ENV, json.dumps(CARRIED))
    resumed = ["--resume", str(run / "snapshots" / "snapshot_iter_2.pt"), "--set", "iteration=3", "--out",
               str(tmp_path / "branch")]
    assert train.main(resumed) == 0
    (branched,) = events(tmp_path / "branch", "started")  # a branch's log begins with it
    assert branched["iteration"] == 2 and branched["command"] == ["train.py", *resumed]
    assert branched["code"] == {**CARRIED, "from": "carry"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU here its name is read")
def test_a_gpu_that_cannot_be_reached_is_named_so_and_raises_nothing():
    # what a run records of itself must not stop it
    assert provenance.device_name(torch.device("cuda")).startswith("a CUDA device whose name could not be read (")


@pytest.mark.skipif(not IN_A_CHECKOUT, reason="the code here is not a git checkout")
def test_the_gpu_scripts_hand_the_checked_carried_code_version_to_what_they_run(tmp_path):
    # prepare.sh writes the carry record into the carried wheels folder; run.sh and gpu_tests.sh export what it says
    # of this copy before the benchmarks and tests run (no wheels there: nothing installed, the export still happens)
    record = subprocess.run([sys.executable, "-m", "source.provenance", "record"], cwd=provenance.ROOT,
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "code.json").write_text(record)
    script = f"source benchmarks/gpu/wheels.sh; install_carried_wheels {tmp_path}; printenv {provenance.CODE_ENV}"
    environment = {key: value for key, value in os.environ.items() if key != provenance.CODE_ENV}
    done = subprocess.run(["bash", "-c", script], cwd=provenance.ROOT, capture_output=True, text=True,
                          env=dict(environment, PYTHON=sys.executable))
    assert json.loads(done.stdout.splitlines()[-1]) == {**provenance.code_version(), "from": "carry"}
    done = subprocess.run(["bash", "-c", script], cwd=provenance.ROOT, capture_output=True, text=True,
                          env=dict(environment, PYTHON=sys.executable, **{provenance.CODE_ENV: "set by the caller"}))
    assert done.stdout.splitlines()[-1] == "set by the caller"


def test_a_merged_benchmark_names_each_code_version_it_was_measured_with():
    from benchmarks.gpu.report import code_line

    first = {"commit": CARRIED["commit"], "dirty": False, "from": "carry"}
    later = {"commit": "f" * 40, "dirty": True}
    assert code_line({"code": first}) == "commit 0123456 (carried)"
    assert code_line({"code": later, "runs": [{"code": first}, {"code": later}]}) == (
        "measured at several code versions (commit 0123456 (carried), commit fffffff with local changes: see the "
        "protocol's runs)")
    assert code_line({}) == "code version not recorded"  # results from before runs recorded their code
