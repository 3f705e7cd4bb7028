"""Prepared ImageNet (issue 9, part 3): ``python -m source.datasets.prepare`` and ``imagenet_prepared``."""
import hashlib
import io
import json
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import source.datasets.prepare as prepare
import train
from source.config import load_config
from source.datasets import (
    DatasetError, ImageNetArgs, InfiniteBatchIterator, PreparedImageNetArgs, build_dataset, check_dataset_args)
from source.datasets.prepared import PREPARE_HINT
from source.training.checkpoint import load_snapshot
from test_data_hardening import write_png16
from test_training import CONFIGS, make_jpeg_folder, tensors_equal


@pytest.fixture
def jpeg_root(tmp_path) -> Path:
    """RGB JPEGs of several shapes, a CMYK and a grey JPEG, a 16-bit PNG, a corrupt file, a broken symlink."""
    root = tmp_path / "imagenet"
    make_jpeg_folder(root)
    ramp = np.linspace(0, 65535, 30 * 20, dtype=np.uint16).reshape(30, 20)
    write_png16(root / "n01440764" / "grey16.png", ramp)
    (root / "n01443537" / "gone.JPEG").symlink_to(root / "missing.JPEG")
    return root


def prepared(source: Path, out: Path, size: int, *extra: str) -> Path:
    argv = ["imagenet", "--root", str(source), "--size", str(size), "--out", str(out), "--workers", "2", *extra]
    assert prepare.main(argv) == 0
    return out


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def one_line_error(folder: Path, **args) -> str:
    with pytest.raises(DatasetError) as error:
        build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(folder), **args))
    assert "\n" not in str(error.value)
    return str(error.value)


def cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert prepare.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("prepare: error: ")
    return lines[-1]


def test_prepared_images_are_bit_identical_to_the_jpeg_path(jpeg_root, tmp_path):
    out = prepared(jpeg_root, tmp_path / "prepared", 24)
    manifest = manifest_of(out)
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert skipped == {"n01443537/gone.JPEG": prepare.SYMLINK_REASON,
                       "n01443537/corrupt.JPEG": skipped["n01443537/corrupt.JPEG"]}
    assert skipped["n01443537/corrupt.JPEG"].startswith("UnidentifiedImageError")
    jpeg = build_dataset("imagenet", ImageNetArgs(root=str(jpeg_root), size=24))
    readable = [index for index in range(len(jpeg)) if os.path.relpath(jpeg.path(index), jpeg_root) not in skipped]
    data = build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(out), size=24))
    assert len(data) == len(readable) == manifest["images"] == 9  # 6 RGB, CMYK, grey, 16-bit grey
    for position, index in enumerate(readable):
        (image, label), (expected, expected_label) = data[position], jpeg[index]
        assert image.dtype == torch.uint8 and torch.equal(image, expected), jpeg.path(index)
        assert label == expected_label
    assert jpeg.n_unreadable == 0, "the JPEG path never met the corrupt file"
    assert (data.n_classes, data.channels, data.size, data.dequantize, data.n_unreadable) == (2, 3, 24, True, 0)
    assert manifest["classes"] == jpeg.classes and manifest["class_counts"] == [5, 4]
    images = np.load(out / "images.npy", allow_pickle=False)  # a plain .npy, readable without this code
    assert images.shape == (9, 3, 24, 24)
    assert manifest["sha256"]["images"] == hashlib.sha256(images.tobytes()).hexdigest()
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]


def test_list_file_source_keeps_its_labels_and_lists_missing_files(jpeg_root, tmp_path):
    list_file = tmp_path / "train.txt"
    list_file.write_text("n01440764/n01440764_0.JPEG 7\nn01443537/gray.JPEG 3\nn01443537/nowhere.JPEG 1\n")
    out = prepared(jpeg_root, tmp_path / "prepared", 8, "--list-file", str(list_file))
    manifest = manifest_of(out)
    assert (manifest["images"], manifest["n_classes"], manifest["classes"]) == (2, 8, [])
    assert manifest["source"]["list_file"] == str(list_file)
    assert [entry["path"] for entry in manifest["skipped"]] == ["n01443537/nowhere.JPEG"]
    assert manifest["skipped"][0]["reason"].startswith("FileNotFoundError")
    data = build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(out)))
    assert [data[0][1], data[1][1]] == [7, 3]


def test_sr_imagenet_config_switched_to_prepared_data_validates(tmp_path):
    config = load_config(CONFIGS / "sr_imagenet.yaml", ["dataset.name=imagenet_prepared",
                                                        f"dataset.args.path={tmp_path}"])
    assert config.dataset.args == PreparedImageNetArgs(path=str(tmp_path), size=None, dequantize=True)


def test_training_on_prepared_data_resumes_bit_exactly_with_two_workers(jpeg_root, tmp_path):
    out = prepared(jpeg_root, tmp_path / "prepared", 128)
    overrides = ["dataset.name=imagenet_prepared", f"dataset.args.path={out}", "models.generator.args.ch=2",
                 "models.discriminator.args.ch=2", "models.generator.args.n_classes=2",
                 "models.discriminator.args.n_classes=2", "batchsize=4", "micro_batchsize=2", "iteration=4",
                 "num_workers=2", "snapshot_interval=2", "deterministic=true"]

    def argv(run: Path) -> list[str]:
        return ["--config", str(CONFIGS / "sr_imagenet.yaml"), "--out", str(run)] + [
            a for o in overrides for a in ("--set", o)]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(argv(straight)) == 0
    assert train.main(argv(resumed) + ["--resume", str(straight / "snapshots" / "snapshot_iter_2.pt")]) == 0
    a = load_snapshot(straight / "snapshots" / "snapshot_iter_4.pt")
    b = load_snapshot(resumed / "snapshots" / "snapshot_iter_4.pt")
    assert a["data"] == b["data"] and a["data"]["epoch"] == 1, "4 iterations x 2 micro-batches span two epochs"
    assert tensors_equal(a["gen"], b["gen"]) and tensors_equal(a["dis"], b["dis"])
    for key in ("opt_gen", "opt_dis"):
        assert all(tensors_equal(a[key]["state"][p], b[key]["state"][p]) for p in a[key]["state"])
    assert a["config"]["dataset"]["args"]["path"] == str(out)


def test_workers_and_pickling_never_copy_the_image_array(jpeg_root, tmp_path):
    data = build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(prepared(jpeg_root, tmp_path / "p", 64))))
    pickled = pickle.dumps(data)
    assert len(pickled) < data.images.nbytes / 4, "a spawned worker maps the file instead of receiving its bytes"
    copy = pickle.loads(pickled)
    assert torch.equal(copy[8][0], data[8][0]) and copy[8][1] == data[8][1]
    spawned = DataLoader(data, batch_size=3, num_workers=1, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([images for images, _ in spawned]), torch.from_numpy(np.array(data.images)))
    batches = [InfiniteBatchIterator(data, batch_size=2, seed=3, num_workers=workers) for workers in (0, 2)]
    for _ in range(6):  # more than one epoch of 4 batches
        (x0, y0), (x2, y2) = next(batches[0]), next(batches[1])
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_truncated_or_mismatched_files_are_one_line_errors(jpeg_root, tmp_path):
    out = prepared(jpeg_root, tmp_path / "prepared", 8)
    assert "holds 8 px images" in one_line_error(out, size=16)
    manifest = manifest_of(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "images": 10}))
    assert "holds uint8 (9, 3, 8, 8) but the manifest says uint8 (10, 3, 8, 8)" in one_line_error(out)
    # counts that size tables before any image is read (2*10^8 classes took 5.3 GB in --dry-run), or no count
    for wrong, message in (({"n_classes": 2 * 10**8}, "lacks valid n_classes"), ({"n_classes": True}, "lacks valid "
                           "n_classes"), ({"size": 0}, "lacks valid size"), ({"classes": ["one"]}, "names 1 classes "
                           "for its n_classes 2")):
        (out / "manifest.json").write_text(json.dumps({**manifest, **wrong}))
        assert message in one_line_error(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    labels = out / "labels.npy"
    original_labels = labels.read_bytes()
    header = io.BytesIO()  # 8 TB of labels claimed by a 128-byte file: refused before anything is allocated
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
    labels.write_bytes(header.getvalue())
    assert "may be truncated" in one_line_error(out)
    labels.write_bytes(original_labels)
    images = out / "images.npy"
    images.write_bytes(images.read_bytes()[:-100])
    assert "may be truncated" in one_line_error(out)
    (out / "manifest.json").write_text("{")
    assert "cannot read" in one_line_error(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": "1\nall checksums match"}))
    assert "has format version '1\\nall checksums" in one_line_error(out)  # quoted: one line
    (out / "manifest.json").unlink()
    assert "has no manifest.json" in one_line_error(out)
    # a manifest that is no regular file: a link to /dev/zero filled the memory, a FIFO blocked for good
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading the manifest blocked"))
    for make in (lambda path: path.symlink_to("/dev/zero"), os.mkfifo):
        make(out / "manifest.json")
        signal.alarm(20)
        try:
            assert "manifest.json is not a regular file" in one_line_error(out)
            with pytest.raises(DatasetError, match="not a prepared folder"):
                prepare.check_output(str(out), force=True)
        finally:
            signal.alarm(0)
        (out / "manifest.json").unlink()
    assert check_dataset_args("imagenet_prepared", PreparedImageNetArgs(path=str(tmp_path / "none"))) == [
        f"dataset.args.path: {tmp_path / 'none'} does not exist; it must be a folder made by {PREPARE_HINT}"]


def test_cli_errors_are_one_line_and_leave_no_partial_output(jpeg_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "prepared"
    missing = cli_error(["imagenet", "--root", str(tmp_path / "none"), "--out", str(out)], capsys)
    assert "--root: " in missing and "(or set --list-file)" in missing  # the option, not the config key
    assert "--workers" in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(out), "--size", "7",
                                     "--workers", "0"], capsys)
    assert prepare.main(["imagenet", "--root", str(jpeg_root), "--out", str(out), "--size", "7", "--workers", "0"]) == 2
    assert "note: the models are built for 32, 48, 64, 128 px; no generator trains on 7 px" in capsys.readouterr().err
    assert "--workers: " in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(out), "--workers", "0"],
                                      capsys)
    # a pool of 10^20 processes kept starting them; 10^5 px images were 30 GB each, and 10^20 px an OverflowError
    for option, value, message in (("--workers", "10" * 10, "--workers: must be in [1, 512]"),
                                   ("--size", "100000", "--size: must be in [1, 4096] pixels"),
                                   ("--size", "9" * 20, "--size: must be in [1, 4096] pixels")):
        assert message in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(out), option, value], capsys)
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(tmp_path / "file")], capsys)
    assert "cannot write" in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(tmp_path / "file" / "x")],
                                       capsys)
    assert "not empty" in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(jpeg_root)], capsys)
    assert "not a prepared folder" in cli_error(
        ["imagenet", "--root", str(jpeg_root), "--out", str(jpeg_root), "--force"], capsys)
    (tmp_path / "other_project").mkdir()
    (tmp_path / "other_project" / "manifest.json").write_text('{"format": "some other tool"}')
    assert "not a prepared folder" in cli_error(  # a manifest.json of something else is not ours to delete
        ["imagenet", "--root", str(jpeg_root), "--out", str(tmp_path / "other_project"), "--force"], capsys)
    assert (tmp_path / "other_project" / "manifest.json").is_file()
    assert "FOLDER: " in cli_error(["verify", str(tmp_path)], capsys)
    prepared(jpeg_root, out, 8)
    assert "not empty" in cli_error(["imagenet", "--root", str(jpeg_root), "--out", str(out)], capsys)
    prepared(jpeg_root, out, 16, "--force")
    assert manifest_of(out)["size"] == 16

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "move_into_place", interrupt)
    argv = ["imagenet", "--root", str(jpeg_root), "--out", str(tmp_path / "interrupted"), "--workers", "1"]
    assert prepare.main(argv) == 130
    assert sorted(os.listdir(tmp_path)) == ["file", "imagenet", "other_project", "prepared"], "no OUT, no staging"


def test_verify_detects_a_flipped_byte(jpeg_root, tmp_path, capsys):
    out = prepared(jpeg_root, tmp_path / "prepared", 8)
    assert prepare.main(["verify", str(out)]) == 0
    with open(out / "images.npy", "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)[0]
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last ^ 1]))
    capsys.readouterr()
    assert prepare.main(["verify", str(out)]) == 1
    assert "images: sha256 " in capsys.readouterr().out
    build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(out)))  # opening does not hash
