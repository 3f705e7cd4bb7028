"""A study's state kept with the code (the study file's saved_state): saved after a chunk, unpacked into a fresh
checkout, never over a newer or different history, and checked as a received archive is."""
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from source import provenance
from source.study import __main__ as study_cli
from source.study import saved, state, transfer
from source.files import torch_load
from source.study.spec import load_study
from source.training.runlog import DamagedLog
from test_study import write_study


def study_with_saved_state(tmp_path: Path, iterations: int, **arms) -> Path:
    path = write_study(tmp_path, iterations, **(arms or {"sn": {}}))
    spec = yaml.safe_load(path.read_text())
    spec["saved_state"] = "kept"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_fresh_checkout_continues_the_study_from_its_saved_state(tmp_path, monkeypatch, capsys):
    """The baseline done, its branch (at iteration 2) waiting: the saved state holds the branch's snapshot and the
    baseline's done record, not its last snapshot (2.4 MB a run of the GPU study: the call's 64 MiB carry it); a
    fresh checkout's next chunk trains the branch from the restored snapshot."""
    monkeypatch.chdir(tmp_path)  # the default root results/study and the saved folder kept/ are relative
    path = study_with_saved_state(tmp_path, 4, sn={}, resumed={"branch": "sn", "at": 2,
                                                               "set": ["updater.apply_SR=true"]})
    root, kept = tmp_path / "results" / "study", tmp_path / "kept"
    assert study_cli.main(["run", str(path), "--budget", "600", "--arm", "sn"]) == 0
    assert "kept: the study's state saved" in capsys.readouterr().out
    assert (kept / "chunks.jsonl").read_bytes() == (root / "chunks.jsonl").read_bytes()
    with tarfile.open(kept / "tiny.tar.xz") as archive:
        names = set(archive.getnames())
    assert {"tiny/sn_s0/snapshots/snapshot_iter_2.pt", "tiny/sn_s0/done.json", "tiny/sn_s0/log.jsonl",
            "tiny/console/sn_s0.log"} <= names
    assert "tiny/sn_s0/snapshots/snapshot_iter_4.pt" not in names  # done: its record says where it ended
    assert any("/spectra/" in name for name in names)  # what the report reads travels too
    assert not [name for name in names if "/tb/" in name or "generator_iter" in name or "/." in name]
    branch_snapshot = (root / "tiny/sn_s0/snapshots/snapshot_iter_2.pt").read_bytes()

    shutil.rmtree(tmp_path / "results")  # a fresh checkout: the saved folder is all there is
    assert study_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "the study's saved state unpacked from kept (1 chunks more than here" in out
    assert [line.split()[:3] for line in out.splitlines() if line.startswith("tiny/")] == [
        ["tiny/sn_s0", "done", "4"], ["tiny/resumed_s0", "ready", "2"]]
    assert (root / "tiny/sn_s0/snapshots/snapshot_iter_2.pt").read_bytes() == branch_snapshot
    assert study_cli.main(["status", str(path)]) == 0  # as new as the saved state: nothing unpacked again
    assert "unpacked" not in capsys.readouterr().out
    assert study_cli.main(["run", str(path), "--budget", "600"]) == 0  # the branch, from the restored snapshot
    assert "tiny/resumed_s0: iteration 2 -> 4" in capsys.readouterr().out
    assert len((kept / "chunks.jsonl").read_text().splitlines()) == 2

    # a root elsewhere is the user's own: neither unpacked into nor saved from
    assert study_cli.main(["run", str(path), "--root", str(tmp_path / "other"), "--budget", "600"]) == 0
    assert "saved" not in capsys.readouterr().out
    assert len((kept / "chunks.jsonl").read_text().splitlines()) == 2


def test_a_saved_state_never_replaces_a_newer_or_different_history(tmp_path):
    study = load_study(study_with_saved_state(tmp_path, 4))
    root, kept = tmp_path / "root", tmp_path / "kept"
    kept.mkdir()
    record = {"runs": {}, "wall_s": 1}
    (kept / "chunks.jsonl").write_text(json.dumps(record) + "\n")
    root.mkdir()
    (root / "chunks.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({**record, "wall_s": 2}) + "\n")
    assert saved.restore(study, root, kept) == 0  # here is newer (not yet saved): left as it is
    assert not saved.newer(root, kept, study) and saved.behind(root, kept, study)
    (root / "chunks.jsonl").write_text(json.dumps({**record, "wall_s": 3}) + "\n")
    with pytest.raises(transfer.TransferError, match=r"have different histories: continue one of them") as error:
        saved.restore(study, root, kept)
    assert "\n" not in str(error.value)
    assert json.loads((root / "chunks.jsonl").read_text())["wall_s"] == 3


def planted(kept: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(kept / "tiny.tar.xz", "w:xz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("members, message", [
    ({"tiny/sn_s0/snapshots/snapshot_iter_2.pt": b"not a snapshot"}, "is not the snapshot of iteration 2"),
    ({"tiny/sn_s0/snapshots/snapshot_iter_99.pt": b"not a snapshot"}, "is no snapshot of the study's runs"),
    ({"other/sn_s0/log.jsonl": b""}, "'other/sn_s0/log.jsonl' is not of the setting tiny"),
    ({"../outside": b""}, "only files and folders inside the study's root"),
    ({"tiny/sn_s0/done.json": b'{"iteration": 3}'}, "is no done record of the study's runs"),  # it would mark it done
])
def test_a_saved_state_from_elsewhere_is_checked_before_anything_is_unpacked(tmp_path, members, message):
    study = load_study(study_with_saved_state(tmp_path, 4))
    root, kept = tmp_path / "root", tmp_path / "kept"
    kept.mkdir()
    (kept / "chunks.jsonl").write_text(json.dumps({"runs": {}, "wall_s": 1}) + "\n")
    planted(kept, members)
    with pytest.raises(transfer.TransferError, match=message):
        saved.restore(study, root, kept)
    assert not (root / "chunks.jsonl").exists() and not (tmp_path / "outside").exists()
    assert not [path for path in root.rglob("*") if path.is_file()]


def test_a_saved_history_that_is_no_chunk_record_or_too_long_is_refused(tmp_path, monkeypatch):
    study = load_study(study_with_saved_state(tmp_path, 4))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "chunks.jsonl").write_text("[1]\n")
    with pytest.raises(transfer.TransferError, match="holds a line that is not a chunk's record"):
        saved.restore(study, tmp_path / "root", kept)
    monkeypatch.setattr(saved, "MOST_HISTORY", 2)
    with pytest.raises(transfer.TransferError, match="over the 2 a study's chunk history takes"):
        saved.newer(tmp_path / "root", kept, study)


def test_a_saved_state_travels_in_the_working_tree_and_comes_back_saved(tmp_path, monkeypatch, capsys):
    """carry packs no state of its own (the working tree holds it); the device unpacks the tree's saved state;
    take-back adds the device's chunk, and the saved state with it."""
    monkeypatch.setattr(transfer, "download_wheels", lambda carry: None)  # no package index needed here
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, 4, sn={}, lr={"set": ["adam_G.alpha=0.001"]})
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "saved_state": "kept"}, sort_keys=False))
    assert study_cli.main(["run", str(path), "--arm", "sn", "--budget", "600"]) == 0
    carry = tmp_path / "carry"
    assert study_cli.main(["carry", str(path), "--to", str(carry)]) == 0
    assert "the study's state in kept (in the working tree)" in capsys.readouterr().out
    assert not (carry / transfer.STATE).exists()
    recorded = json.loads((carry / study_cli.CARRY_CODE).read_text())  # the commit here, and the tree's digest
    assert recorded["commit"] == provenance.code_version()["commit"] and recorded["digest"]

    device = tmp_path / "device"  # the lent machine: a copy of the working tree, a root of its own
    shutil.copytree(tmp_path / "kept", device / "kept")
    monkeypatch.chdir(device)
    (device / "out").mkdir()
    assert study_cli.main(["device", str(path), "--carry", str(carry), "--out", str(device / "out"),
                           "--budget", "600"]) == 0
    progress = {row["run"]: row["status"] for row in json.loads((device / "out" / "progress.json").read_text())}
    assert progress == {"tiny/sn_s0": "done", "tiny/lr_s0": "done"}
    assert json.loads(os.environ[provenance.CODE_ENV]) == {**provenance.code_version(), "from": "carry"}
    assert len((device / "kept" / "chunks.jsonl").read_text().splitlines()) == 1  # the device saves nothing
    parts = b"".join(part.read_bytes() for part in sorted((device / "out").glob(transfer.PARTS + "*")))
    returned = transfer.extract(parts, tmp_path / "peek")
    assert "tiny/lr_s0/snapshots/snapshot_iter_4.pt" in returned  # trained there; sn's came from the saved state
    assert "tiny/sn_s0/snapshots/snapshot_iter_4.pt" not in returned

    monkeypatch.chdir(tmp_path)
    assert study_cli.main(["take-back", str(path), str(device / "out")]) == 0
    history = [json.loads(line) for line in (tmp_path / "kept" / "chunks.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["machine"]["device"] == provenance.cpu_model()  # what lr_s0 recorded
    assert history[1]["code"] == provenance.code_version()
    with tarfile.open(tmp_path / "kept" / "tiny.tar.xz") as archive:
        assert "tiny/lr_s0/done.json" in archive.getnames()  # trained there, done


def test_a_returned_snapshot_of_another_recipe_is_refused_and_one_of_other_arithmetic_taken(tmp_path):
    """A resume continues with its snapshot's config: a returned snapshot with another learning rate or loss would
    go on under the run's name, silently (found by a hostile review)."""
    path = write_study(tmp_path, 4, sn={})
    study = load_study(path)
    here = tmp_path / "here"
    assert study_cli.main(["run", str(path), "--root", str(here), "--budget", "600"]) == 0
    for number, (key, value, refused) in enumerate([("adam_G", {"alpha": 0.9}, True),
                                                   ("performance", {"compile": True}, False)]):
        there, out = tmp_path / f"there{number}", tmp_path / f"out{number}"
        shutil.copytree(here, there)
        before = transfer.listing(there)
        snapshot_path = there / "tiny/sn_s0/snapshots/snapshot_iter_4.pt"
        snapshot = torch_load(snapshot_path)
        snapshot["config"][key].update(value)
        torch.save(snapshot, snapshot_path)
        with open(there / "chunks.jsonl", "a") as history:
            history.write(json.dumps({"runs": {}, "wall_s": 1}) + "\n")
        out.mkdir()
        transfer.pack_changed(there, before, out, {"study": "study", "since_chunks": 1})
        if refused:
            with pytest.raises(transfer.TransferError, match=r"was trained with another recipe than its run's \(1 "
                                                             r"differ, e.g. adam_G.alpha: 0.9 -> 0.0002: the snapshot's, then"):
                transfer.take_back(out, here, "study", study)
        else:  # how the arithmetic runs is a chunk's choice
            assert "tiny/sn_s0/snapshots/snapshot_iter_4.pt" in transfer.take_back(out, here, "study", study)


def test_a_done_record_without_its_snapshot_cannot_train_on_and_a_damaged_one_says_so(tmp_path):
    study = load_study(study_with_saved_state(tmp_path, 6))
    (run,) = study.runs
    folder = state.run_folder(tmp_path, run)
    folder.mkdir(parents=True)
    (folder / state.DONE).write_text('{"iteration": 4}')  # done at 4 when saved; the study file now says 6
    with pytest.raises(DamagedLog, match="ended at iteration 4 .done.json. and its last snapshot was not kept"):
        state.status(study, tmp_path, run)
    (folder / state.DONE).write_text('{"iteration": "4"}')
    with pytest.raises(DamagedLog, match="is not a done run's record"):
        state.latest_iteration(folder)


def test_a_restore_replaces_what_the_history_does_not_record_and_a_failed_save_is_made_up(tmp_path, monkeypatch,
                                                                                          capsys):
    """From a review: a killed chunk's snapshots (no history line) mixed with a newer saved state, and prune kept the
    wrong lineage; a save cut short was never made up; a copied study file took another study's state."""
    monkeypatch.chdir(tmp_path)
    path = study_with_saved_state(tmp_path, 4)
    study = load_study(path)
    root, kept = tmp_path / "results" / "study", tmp_path / "kept"
    assert study_cli.main(["run", str(path), "--budget", "600"]) == 0
    archive = (kept / "tiny.tar.xz").read_bytes()
    (kept / "old.tar.xz").write_bytes(b"a setting the study file no longer names")
    saved.save(study, root, kept)
    assert (kept / "tiny.tar.xz").read_bytes() == archive and not (kept / "old.tar.xz").exists()  # nothing new

    with open(kept / "chunks.jsonl", "a") as history:  # another checkout's chunk, pulled
        history.write(json.dumps({"runs": {}, "wall_s": 1}) + "\n")
    orphan = root / "tiny/sn_s0/snapshots/snapshot_iter_5.pt"  # a chunk killed here before it was recorded
    orphan.write_bytes(b"another lineage")
    (root / "figures").mkdir()
    assert study_cli.main(["status", str(path)]) == 0
    assert "1 chunks more than here" in capsys.readouterr().out
    assert not orphan.exists() and (root / "figures").is_dir()  # the saved runs whole; the rest of the root stays
    assert (root / "chunks.jsonl").read_bytes() == (kept / "chunks.jsonl").read_bytes()

    with open(root / "chunks.jsonl", "a") as history:  # a chunk whose save failed (say, a full disk)
        history.write(json.dumps({"runs": {}, "wall_s": 2}) + "\n")
    assert study_cli.main(["status", str(path)]) == 0
    assert "which an earlier save did not finish" in capsys.readouterr().out
    assert (root / "chunks.jsonl").read_bytes() == (kept / "chunks.jsonl").read_bytes()

    (kept / "tiny.tar.xz").rename(tmp_path / "uncommitted")  # a history whose runs' archive was left out
    shutil.rmtree(root)
    assert study_cli.main(["status", str(path)]) == 2
    assert "its history trained runs of tiny but holds no tiny.tar.xz (not committed?)" in capsys.readouterr().err
    (tmp_path / "uncommitted").rename(kept / "tiny.tar.xz")
    shutil.copy(path, tmp_path / "copy.yaml")  # another study (its file's name) with the same saved_state
    assert study_cli.main(["status", str(tmp_path / "copy.yaml")]) == 2
    assert "holds the saved state of the study 'study', not 'copy'" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a folder")
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "saved_state": "file"}))
    assert study_cli.main(["run", str(path), "--budget", "600"]) == 2  # one line, and the folder keeps the state
    assert "the study's state was not saved into file" in capsys.readouterr().err
