"""A study's archives from another machine (source/study/archive.py, transfer.take_back): nothing is unpacked
until every member is checked, within bounds of memory, members and bytes."""
import hashlib
import io
import json
import lzma
import tarfile
import tracemalloc

import pytest

from source.study import archive, processes, transfer
from source.study.spec import load_study
from source.study.state import PIDS
from test_study import write_study


def xz_tar(members: list[tuple[str, bytes | None, str | None]], form: int = tarfile.PAX_FORMAT) -> bytes:
    """An xz tar of (name, content, link target): a file when content is given, a folder when the target is "/",
    else a symbolic link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", format=form, preset=0) as archive:
        for name, content, target in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.linkname = (tarfile.DIRTYPE, "") if target == "/" else (tarfile.SYMTYPE, target)
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize("members", [
    [("b64/sn_s0/log.jsonl", b"{}", None), ("b64/link", None, "/etc")],  # a link, even one that leads nowhere used
    [("b64/sn_s0/log.jsonl", b"{}", None), ("../outside.txt", b"x", None)],
    [("b64/sn_s0/log.jsonl", b"{}", None), ("/tmp/absolute.txt", b"x", None)],
    [("b64/sn_s0/log.jsonl", b"{}", None), ("planted/through_a_link.txt", b"x", None)],  # root/planted -> elsewhere
    [("b64/sn_s0/log.jsonl", b"{}", None), ("b64/" + "x" * 300, b"x", None)],  # a name no file system takes
    [("b64/sn_s0/log.jsonl", b"{}", None), ("/".join(["d"] * (archive.MOST_DEPTH + 1)), b"x", None)],
    [("b64/sn_s0/log.jsonl", b"{}", None), ("b64/new\nline", b"x", None)],
    [("b64/sn_s0/log.jsonl", b"{}", None), ("b64/caf\u00e9", b"x", None)],
])
def test_an_archive_with_a_link_or_a_name_outside_the_study_unpacks_nothing(tmp_path, members):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "planted").symlink_to(elsewhere)
    with pytest.raises(transfer.TransferError, match="only files and folders inside the study's root"):
        transfer.extract(xz_tar(members), root)
    assert not (root / "b64").exists() and not list(elsewhere.iterdir()) and not (tmp_path / "outside.txt").exists()


def test_an_archive_unpacks_within_a_size_and_never_another_machines_process_ids(tmp_path, monkeypatch):
    members = [("b64/sn_s0/log.jsonl", b"{}", None), (PIDS, b'{"b64/sn_s0": [1, 1]}', None)]
    assert transfer.extract(xz_tar(members), tmp_path) == ["b64/sn_s0/log.jsonl"]
    assert not (tmp_path / PIDS).exists()
    monkeypatch.setattr(archive, "MOST_MEMBERS", 3)  # many empty files: a small archive, a flood of them
    with pytest.raises(transfer.TransferError, match="more than 3 members"):
        transfer.extract(xz_tar([(f"b64/{index}", b"", None) for index in range(4)]), tmp_path / "many")
    assert not (tmp_path / "many").exists()
    monkeypatch.setattr(archive, "MOST_UNPACKED", 10)
    with pytest.raises(transfer.TransferError, match="unpacks to over 0 MiB"):
        transfer.extract(xz_tar([("b64/big.bin", b"x" * 11, None)]), tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_long_name_record_is_refused_before_tarfile_reads_it(tmp_path, form):
    """tarfile reads a GNU long-name or pax record whole, whatever it claims (a 78 KB archive claimed 512 MiB and
    took 4.8 GB): refused at its header. Were the header hook no longer called, the name check would still refuse
    it, but only after the record was in memory: the peak tells the two apart."""
    data = xz_tar([("b64/" + "a" * 2**23, b"x", None)], form)
    assert len(data) < 2**16
    tracemalloc.start()
    try:
        with pytest.raises(transfer.TransferError, match="only files and folders"):
            transfer.extract(data, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**21 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("members, here", [
    ([("b64", b"file", None), ("b64/sn_s0/log.jsonl", b"{}", None)], None),  # a file, then a folder of that name
    ([("b64/sn_s0/log.jsonl", b"{}", None), ("chunks.jsonl", None, "/")], "chunks.jsonl"),  # over the history file
    ([("b64/sn_s0/log.jsonl", b"{}", None), ("b64", b"file", None)], "b64/"),  # a file over a folder here
])
def test_a_member_of_the_other_kind_than_the_archive_or_the_study_has_there_unpacks_nothing(tmp_path, members, here):
    if here:
        (tmp_path / here).mkdir() if here.endswith("/") else (tmp_path / here).write_text("{}\n")
    with pytest.raises(transfer.TransferError, match="nothing was unpacked"):
        transfer.extract(xz_tar(members), tmp_path)
    assert not (tmp_path / "b64" / "sn_s0").exists()


@pytest.mark.parametrize("second", ["chunks.jsonl", "./chunks.jsonl", "b64//../chunks.jsonl"])
def test_a_path_named_twice_or_spelled_otherwise_unpacks_nothing(tmp_path, second):
    """The history check reads "chunks.jsonl"; a second member of that path, unpacked after it, rolled the study's
    history back with every check passing."""
    members = [("chunks.jsonl", b'{"chunk": 1}\n{"chunk": 2}\n', None), (second, b'{"chunk": "rolled back"}\n', None)]
    with pytest.raises(transfer.TransferError, match="nothing was unpacked"):
        transfer.extract(xz_tar(members), tmp_path)
    assert not list(tmp_path.iterdir())


def test_unpacking_that_fails_after_the_checks_says_the_study_may_hold_part_of_it(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tarfile.TarFile, "extractall", full_disk)
    with pytest.raises(transfer.TransferError, match="stopped part-way .*No space left.* may hold part"):
        transfer.extract(xz_tar([("b64/sn_s0/log.jsonl", b"{}", None)]), tmp_path)


def returned(folder, members, since=0):
    """A device call's returned files as pack_changed writes them: one part and its manifest."""
    data = xz_tar(members)
    folder.mkdir()
    (folder / f"{transfer.PARTS}00").write_bytes(data)
    (folder / transfer.MANIFEST).write_text(json.dumps(
        {"parts": 1, "sha256": hashlib.sha256(data).hexdigest(), "study": "s", "since_chunks": since}))
    return folder


def test_take_back_bounds_the_parts_and_the_history_and_reads_only_chunk_records(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    good = [("chunks.jsonl", b'{"chunk": 1}\n', None), ("b64/sn_s0/log.jsonl", b"{}", None)]
    # the history unpacked last: a take-back cut short (a full disk) is taken back again, not refused as done
    assert transfer.take_back(returned(tmp_path / "good", good), root, "s") == ["b64/sn_s0/log.jsonl", "chunks.jsonl"]
    (tmp_path / "good" / transfer.MANIFEST).unlink()
    unpacked = (root / "chunks.jsonl").read_bytes()
    for name, history in (("garbage", b'{"chunk": 1}\n{"chunk": 2}\nnot json\n'), ("list", b'{"chunk": 1}\n[2]\n')):
        with pytest.raises(transfer.TransferError, match="not a chunk's record; nothing unpacked"):
            transfer.take_back(returned(tmp_path / name, [("chunks.jsonl", history, None)], since=1), root, "s")
    monkeypatch.setattr(transfer, "MOST_HISTORY", 20)
    with pytest.raises(transfer.TransferError, match="chunks.jsonl holds 26 bytes, over the 20"):
        transfer.take_back(returned(tmp_path / "long", [("chunks.jsonl", b'{"chunk": 1}\n{"chunk": 2}\n', None)],
                                    since=1), root, "s")
    monkeypatch.setattr(transfer, "RETURN_LIMIT", 100)
    with pytest.raises(transfer.TransferError, match="over the 0 MiB a device call returns; nothing unpacked"):
        transfer.take_back(returned(tmp_path / "big", [("b64/x", bytes(range(256)) * 40, None)], since=1), root, "s")
    assert (root / "chunks.jsonl").read_bytes() == unpacked and not (root / "b64" / "x").exists()


def test_take_back_refuses_a_snapshot_that_is_not_what_its_name_says_and_a_manifest_without_its_origin(tmp_path):
    """Pruning keeps each run's newest snapshot by name: a planted snapshot_iter_999999.pt would delete the real ones
    and mark the run done. A manifest must name its study and the chunk it continues (removing them skipped the
    checks that refuse another study's files and files taken back twice)."""
    root = tmp_path / "root"
    (root / "b64" / "sn_s0" / "snapshots").mkdir(parents=True)
    real = root / "b64" / "sn_s0" / "snapshots" / "snapshot_iter_2.pt"
    real.write_bytes(b"the run's own")
    history = [("chunks.jsonl", b'{"chunk": 1}\n', None)]
    planted = returned(tmp_path / "planted", history + [("b64/sn_s0/snapshots/snapshot_iter_999999.pt", b"junk", None)])
    with pytest.raises(transfer.TransferError, match=r"snapshot_iter_999999.pt is not the snapshot of iteration 999999 "
                                                     r"its name says \(it is not a readable snapshot"):
        transfer.take_back(planted, root, "s")
    # the third campaign's: a folder of that name (it passed as no file, and pruning kept it as the newest), and
    # snapshots outside the study's runs or past a run's end (a well-formed one of iteration 4e9 passed)
    study = load_study(write_study(tmp_path, 4, sn={}))  # the run tiny/sn_s0, 4 iterations
    for index, (name, form, message) in enumerate([
                                ("tiny/sn_s0/snapshots/snapshot_iter_999999.pt", None, "is not a file"),
                                ("tiny/sn_s0/snapshots/snapshot_iter_5.pt", b"junk", "is no snapshot of the study"),
                                ("tiny/zz_s0/snapshots/snapshot_iter_2.pt", b"junk", "is no snapshot of the study"),
                                ("tiny/sn_s0/snapshot_iter_2.pt", b"junk", "is no snapshot of the study")]):
        folder = returned(tmp_path / f"planted{index}", history + [(name, form, "/")])
        with pytest.raises(transfer.TransferError, match=message):
            transfer.take_back(folder, root, "s", study)
    assert [p.name for p in real.parent.iterdir()] == ["snapshot_iter_2.pt"]
    for key in ("study", "since_chunks"):
        folder = returned(tmp_path / key, history)
        manifest = json.loads((folder / transfer.MANIFEST).read_text())
        del manifest[key]
        (folder / transfer.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(transfer.TransferError, match="is not a manifest of parts as a device call writes it"):
            transfer.take_back(folder, root, "s")
    assert not (root / "chunks.jsonl").exists()


def test_a_folder_where_the_study_keeps_its_process_ids_is_refused(tmp_path, capsys):
    """Unpacked, every later command ended in IsADirectoryError until it was deleted by hand."""
    with pytest.raises(transfer.TransferError, match="only files and folders inside the study's root"):
        transfer.extract(xz_tar([(f"{PIDS}/x", b"", None)]), tmp_path / "root")
    (tmp_path / "root" / PIDS).mkdir(parents=True)
    with pytest.raises(processes.StudyFolderError, match="running.json is not a file as a chunk writes it"):
        processes.stop_leftovers(tmp_path / "root", 1.0, print)


def test_a_part_that_is_not_a_plain_file_is_not_read(tmp_path):
    """A part linked to /dev/zero was read until memory ran out (a FIFO would block for ever)."""
    folder = returned(tmp_path / "zero", [("chunks.jsonl", b'{"chunk": 1}\n', None)])
    (folder / f"{transfer.PARTS}00").unlink()
    (folder / f"{transfer.PARTS}00").symlink_to("/dev/zero")
    with pytest.raises(transfer.TransferError, match="part00 is not a plain file as a device call returns"):
        transfer.take_back(folder, tmp_path / "root", "s")


def test_a_log_or_a_carried_data_file_past_its_bound_is_refused_without_holding_it(tmp_path, monkeypatch):
    """A 20 KB archive's 128 MiB log.jsonl took 4 minutes and 3.3 GB in every later status; 78 KB of carried xz
    unpacked to 512 MiB in memory."""
    monkeypatch.setattr(archive, "MOST_LOG", 100)
    with pytest.raises(transfer.TransferError, match="'b64/sn_s0/log.jsonl' holds 101 bytes, over the 100"):
        transfer.extract(xz_tar([("b64/sn_s0/log.jsonl", b"\n" * 101, None)]), tmp_path / "root")
    (tmp_path / "carry" / "data").mkdir(parents=True)
    (tmp_path / "carry" / "data" / "train-images-idx3-ubyte.xz").write_bytes(lzma.compress(bytes(3 * 2**20)))
    monkeypatch.setattr(transfer, "MOST_DATA", 2 * 2**20)
    with pytest.raises(transfer.TransferError, match="unpacks to over 2 MiB"):
        transfer.unpack_data(tmp_path / "carry", tmp_path / "data")
    assert not list((tmp_path / "data").iterdir())  # nothing half-written
    (tmp_path / "carry" / "data" / "train-images-idx3-ubyte.xz").write_bytes(b"not xz")  # was an LZMAError traceback
    with pytest.raises(transfer.TransferError, match="is not a whole xz file as carry writes it"):
        transfer.unpack_data(tmp_path / "carry", tmp_path / "data")


@pytest.mark.parametrize("python_has_filters", [True, False])
def test_unpacked_files_keep_no_special_mode_bits_with_or_without_tarfiles_filters(tmp_path, monkeypatch,
                                                                                   python_has_filters):
    """tarfile's "data" filter drops setuid and group/other write bits; Pythons before 3.10.12 and 3.11.4 have no
    filters (extractall takes no filter argument): the study then drops them itself."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", format=tarfile.PAX_FORMAT, preset=0) as tar:
        for name, mode, content in (("b64", 0o7777, None), ("b64/log.jsonl", 0o6777, b"{}")):
            info = tarfile.TarInfo(name)
            info.mode = mode
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    if not python_has_filters:
        extract_all = tarfile.TarFile.extractall

        def without_filters(self, path=".", members=None, *, numeric_owner=False, **filter_given):
            if filter_given:
                raise TypeError(f"extractall() got an unexpected keyword argument {next(iter(filter_given))!r}")
            return extract_all(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

        monkeypatch.delattr(tarfile, "data_filter")
        monkeypatch.setattr(tarfile.TarFile, "extractall", without_filters)
    assert transfer.extract(buffer.getvalue(), tmp_path) == ["b64", "b64/log.jsonl"]
    assert (tmp_path / "b64/log.jsonl").read_bytes() == b"{}"
    for path in (tmp_path / "b64", tmp_path / "b64/log.jsonl"):
        assert path.stat().st_mode & 0o7022 == 0, oct(path.stat().st_mode)
