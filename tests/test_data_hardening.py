"""Hostile inputs to the data sets (issue 8, item 6): each must give correct pixels, a counted skip
or a one-line DatasetError, never a traceback or silently wrong data."""
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import source.datasets.imagenet as imagenet
from source.datasets import (
    DATASETS, CIFAR10Args, DatasetError, FashionMNISTArgs, ImageNetArgs, SyntheticArgs, build_dataset, download_pending)
from test_datasets import write_cifar_standin, write_fashion_standin

LOGGER = "source.datasets.imagenet"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png16(path, samples: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): H x W grey or H x W x 3 RGB."""
    height, width = samples.shape[:2]
    colour_type = 2 if samples.ndim == 3 else 0
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter byte 0: raw row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
                     + png_chunk(b"IEND", b""))


def one_line_error(args: ImageNetArgs) -> str:
    with pytest.raises(DatasetError) as error:
        build_dataset("imagenet", args)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_16_bit_grey_png_is_scaled_not_clipped_to_white(tmp_path):
    (tmp_path / "n0").mkdir()
    write_png16(tmp_path / "n0" / "grey.png", np.full((6, 6), 32768, dtype=np.uint16))
    write_png16(tmp_path / "n0" / "ramp.png", np.array([[0, 257 * 7, 257 * 200, 65535]] * 4, dtype=np.uint16))
    assert Image.open(tmp_path / "n0" / "grey.png").mode.startswith("I")  # the mode that convert("RGB") clips
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), size=4))
    grey, _ = dataset[0]
    assert grey.unique().tolist() == [128]
    ramp, _ = dataset[1]  # 4 x 4 already, so no resampling mixes the columns
    assert ramp[:, 0].tolist() == [[0, 7, 200, 255]] * 3  # v * 257 is how 8 bits widen to 16: undone exactly


def test_32_bit_integer_image_is_read_as_16_bit_data(tmp_path):
    # Pillow only writes mode "I" as TIFF; the loader goes by content, not by the .png suffix
    (tmp_path / "n0").mkdir()
    Image.fromarray(np.full((5, 5), 32768, dtype=np.int32), "I").save(tmp_path / "n0" / "int32.png", format="TIFF")
    assert Image.open(tmp_path / "n0" / "int32.png").mode == "I"
    image, _ = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), size=5))[0]
    assert image.unique().tolist() == [128]


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    # Pillow already reduces 48-bit PNGs to RGB itself; this pins that the 16-bit path leaves them alone
    (tmp_path / "n0").mkdir()
    write_png16(tmp_path / "n0" / "rgb48.png", np.broadcast_to(np.array([65535, 32768, 0], dtype=np.uint16), (3, 3, 3)))
    image, _ = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), size=3))[0]
    assert image[:, 1, 1].tolist() == [255, 128, 0]


def test_broken_and_looping_symlinks_are_skipped_counted_and_warned(tmp_path, caplog):
    root = tmp_path / "train"
    for synset in ("n01", "n03"):
        (root / synset).mkdir(parents=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(root / synset / "a.png")
    (root / "n01" / "parent").symlink_to(root / "n01")  # a cycle only for a recursive walk: ignored silently
    (root / "n01" / "self.JPEG").symlink_to(root / "n01" / "self.JPEG")  # ELOOP on stat
    (root / "n02").symlink_to(root / "n02")  # a class folder that loops
    (root / "n04").symlink_to(root / "nowhere")  # a broken class folder
    (root / "n03" / "gone.jpg").symlink_to(root / "n03" / "missing.jpg")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = build_dataset("imagenet", ImageNetArgs(root=str(root), size=4))
    assert dataset.classes == ["n01", "n03"] and len(dataset) == 2
    assert dataset.n_skipped == 4
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset.args.root: skipped 4 broken or looping symlinks under {root}: n02, n04, n01/self.JPEG, n03/gone.jpg"]


def test_empty_class_folders_are_an_error_naming_them(tmp_path):
    for synset in ("n01", "n02", "n03"):
        (tmp_path / synset).mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "n01" / "a.png")
    (tmp_path / "n03" / "notes.txt").write_text("no image here")
    message = one_line_error(ImageNetArgs(root=str(tmp_path), size=4))
    assert message == (f"dataset.args.root: class folders with no images: n02, n03 (under {tmp_path}); "
                       f"remove them or add .JPEG/.jpeg/.jpg/.png images")


def test_list_file_label_gaps_are_warned_with_the_missing_labels(tmp_path, caplog):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png 0\na.png 1\na.png 5\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), list_file=str(list_file), size=4))
    assert dataset.n_classes == 6 and dataset.n_skipped == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset.args.list_file: {list_file}: labels 2, 3, 4 have no images, yet n_classes is 6 "
        f"(the largest label + 1) and a conditional model samples them all"]


def test_list_file_label_gap_warning_stays_short_for_a_huge_label(tmp_path, caplog):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png 1\na.png 99999\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), list_file=str(list_file), size=4))
    assert "labels 0, 2, 3, 4, 5 and 99993 more have no images" in caplog.records[0].getMessage()


@pytest.mark.parametrize("label", ["²", "٣", "-1", "1.0", "100000", "999999999", "9" * 5000])
def test_non_ascii_digit_and_huge_labels_are_a_one_line_error(tmp_path, label):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"a.png 0\nb.png {label}\n", encoding="utf-8")
    message = one_line_error(ImageNetArgs(root=str(tmp_path), list_file=str(list_file)))
    assert message == (f"{list_file}:2: expected 'relative/path.JPEG label' with a label of 0 to 99999, "
                       f"got {f'b.png {label}'[:200]!r}")


def test_a_path_longer_than_a_file_system_allows_is_a_one_line_error(tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png 0\n" + "b" * 5000 + ".png 1\n")  # 5 kB that would widen every line's entry
    assert one_line_error(ImageNetArgs(root=str(tmp_path), list_file=str(list_file))) == (
        f"{list_file}:2: a path of 5004 bytes, over the 4096 a file system allows")


@pytest.mark.parametrize("path", ["/etc/hostname", "../elsewhere.png", "n0/../../elsewhere.png"])
def test_a_list_file_cannot_name_images_outside_the_root(tmp_path, path):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"a.png 0\n{path} 1\n", encoding="utf-8")
    message = one_line_error(ImageNetArgs(root=str(tmp_path), list_file=str(list_file)))
    assert message.startswith(f"{list_file}:2: {path!r}: a list file names images inside the root")


def test_non_utf8_list_file_is_a_one_line_error_with_its_position(tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_bytes(b"\xef\xbb\xbfa.png 0\r\nb.png 1\nd\xe9j\xe0.png 2\n")  # Latin-1 accents after a BOM
    message = one_line_error(ImageNetArgs(root=str(tmp_path), list_file=str(list_file)))
    assert message == f"{list_file}:3: not UTF-8 (byte 0xe9 at offset 21); save the list file as UTF-8"


def test_list_file_with_byte_order_mark_and_old_mac_line_ends(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    list_file = tmp_path / "list.txt"
    list_file.write_bytes(b"\xef\xbb\xbfa.png 0\ra.png 1\r")
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), list_file=str(list_file), size=4))
    assert dataset.path(0) == os.path.join(str(tmp_path), "a.png") and len(dataset) == 2
    assert dataset[0][0].shape == (3, 4, 4) and dataset.n_unreadable == 0


def test_image_over_the_pixel_limit_is_unreadable_and_never_decoded(tmp_path, monkeypatch, caplog):
    (tmp_path / "n0").mkdir()
    Image.new("RGB", (30, 20), (200, 0, 0)).save(tmp_path / "n0" / "a_big.png")
    Image.new("RGB", (20, 20), (0, 0, 200)).save(tmp_path / "n0" / "b_small.png")
    monkeypatch.setattr(imagenet, "MAX_IMAGE_PIXELS", 500)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename) or real_load(self))
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), size=4))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        image, _ = dataset[0]
    assert image[:, 0, 0].tolist() == [0, 0, 200]  # the next readable image stands in
    assert dataset.n_unreadable == 1
    assert {os.path.basename(name) for name in decoded} == {"b_small.png"}
    assert "30x20 = 600 pixels, over the MAX_IMAGE_PIXELS limit of 500" in caplog.records[0].getMessage()


def test_an_image_in_a_format_that_runs_a_program_is_unreadable_and_never_opened_as_such(tmp_path, monkeypatch):
    # an EPS file under a .JPEG name: Pillow would hand its PostScript to Ghostscript (where installed) to decode it
    from PIL import EpsImagePlugin

    (tmp_path / "n0").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "n0" / "a.JPEG", format="EPS")
    Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "n0" / "b.png")
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("opened as EPS"))
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), size=4))
    image, _ = dataset[0]
    assert dataset.n_unreadable == 1 and image[:, 0, 0].tolist() == [0, 0, 200]


def test_every_dataset_exposes_n_unreadable(tmp_path):
    write_cifar_standin(tmp_path / "cifar")
    write_fashion_standin(str(tmp_path / "fashion"))
    (tmp_path / "imagenet" / "n0").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "imagenet" / "n0" / "a.png")
    args = {"imagenet": ImageNetArgs(root=str(tmp_path / "imagenet"), size=4),
            "cifar10": CIFAR10Args(root=str(tmp_path / "cifar"), download=False),
            "fashion_mnist": FashionMNISTArgs(root=str(tmp_path / "fashion")), "synthetic": SyntheticArgs()}
    # their n_unreadable: tests/test_prepared.py, tests/test_longtail_data.py, tests/test_stl10.py
    assert set(args) == set(DATASETS) - {"imagenet_prepared", "lsun", "inaturalist", "stl10"}
    for name, dataset_args in args.items():
        assert build_dataset(name, dataset_args).n_unreadable == 0, name


def test_a_fifo_among_cifar10s_files_is_no_missing_file_to_download_over(tmp_path, monkeypatch):
    """torchvision's extraction would open the FIFO to write the batch and block for good."""
    monkeypatch.setattr("source.datasets.cifar10.download_cifar10", lambda root: pytest.fail("downloaded"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    os.mkfifo(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    args = CIFAR10Args(root=str(tmp_path))
    assert not download_pending("cifar10", args)
    with pytest.raises(DatasetError, match="data_batch_3 is there but is no regular file; CIFAR-10's files are plain"):
        build_dataset("cifar10", args)
