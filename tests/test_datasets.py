import gzip
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import struct
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from source.datasets import (
    DATASETS, CIFAR10Args, DatasetError, FashionMNISTArgs, ImageNetArgs, InfiniteBatchIterator, SyntheticArgs,
    build_dataset, check_dataset_args, download_pending)
from source.datasets.streams import derived_seeds
from test_training import CONFIGS

ROOT = CONFIGS.parent

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
RNG = np.random.default_rng(0)


def random_rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


def expected_square(path: str, size: int) -> np.ndarray:
    """Independent reference: numpy centre crop of the RGB pixels, then PIL bilinear; HWC uint8."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(pixels[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))


def chw_to_hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# ImageNet

@pytest.fixture
def imagenet_root(tmp_path):
    """Three synsets created out of order; one corrupt file ends the first class."""
    root = tmp_path / "train"
    for synset in ("n00000003", "n00000001", "n00000002", ".cache"):
        (root / synset).mkdir(parents=True)
    random_rgb(40, 30).save(root / "n00000001" / "a.JPEG")
    random_rgb(20, 50).save(root / "n00000001" / "b.jpg")
    Image.fromarray(RNG.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA").save(root / "n00000001" / "c.png")
    (root / "n00000001" / "z_corrupt.JPEG").write_bytes(RNG.integers(0, 256, 500, dtype=np.uint8).tobytes())
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "n00000002" / "cmyk.JPEG", quality=95)
    Image.fromarray(RNG.integers(0, 256, (33, 17), dtype=np.uint8), "L").save(root / "n00000002" / "gray.jpeg")
    (root / "n00000002" / "notes.txt").write_text("not an image")
    random_rgb(64, 64).save(root / "n00000003" / "d.JPG")
    random_rgb(64, 64).save(root / ".cache" / "hidden.JPEG")
    return root


def test_imagenet_folder_layout_labels_shapes_and_pixels(imagenet_root):
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(imagenet_root), size=16))
    assert (dataset.n_classes, dataset.channels, dataset.size, dataset.dequantize) == (3, 3, 16, True)
    assert dataset.classes == ["n00000001", "n00000002", "n00000003"]
    names = [os.path.relpath(dataset.path(i), imagenet_root) for i in range(len(dataset))]
    assert names == ["n00000001/a.JPEG", "n00000001/b.jpg", "n00000001/c.png", "n00000001/z_corrupt.JPEG",
                     "n00000002/cmyk.JPEG", "n00000002/gray.jpeg", "n00000003/d.JPG"]
    for index in (0, 1, 2, 4, 5, 6):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert label == int(names[index][8]) - 1
        np.testing.assert_array_equal(chw_to_hwc(image), expected_square(dataset.path(index), 16))


def test_imagenet_cmyk_and_grayscale_become_proper_rgb(imagenet_root):
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(imagenet_root), size=8))
    cmyk, _ = dataset[4]
    pil_rgb = np.asarray(Image.open(dataset.path(4)).convert("RGB"), dtype=float).mean((0, 1))
    np.testing.assert_allclose(cmyk.float().mean((1, 2)).numpy(), pil_rgb, atol=1.0)
    assert cmyk[0].float().mean() > 240 and cmyk[1:].float().mean() < 15  # red, not the raw C, M, Y planes
    gray, _ = dataset[5]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_imagenet_corrupt_file_is_counted_warned_once_and_replaced_by_next(imagenet_root, caplog):
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(imagenet_root), size=8))
    with caplog.at_level(logging.WARNING, logger="source.datasets.imagenet"):
        first = [dataset[i] for i in range(len(dataset))]
        second = [dataset[i] for i in range(len(dataset))]
    assert dataset.n_unreadable == 1
    assert [r.getMessage() for r in caplog.records if "z_corrupt.JPEG" in r.getMessage()] != []
    assert len(caplog.records) == 1
    substitute, label = first[3]
    assert torch.equal(substitute, first[4][0]) and label == 1  # the next readable file, with its own label
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, second))


def test_imagenet_unreadable_count_includes_dataloader_workers(imagenet_root):
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(imagenet_root), size=8))
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert sum(len(labels) for _, labels in batches) == 7
    assert dataset.n_unreadable == 1


def test_imagenet_center_crop_drops_side_bands(tmp_path):
    (tmp_path / "n0").mkdir()
    wide = np.zeros((20, 61, 3), dtype=np.uint8)
    wide[:, :20] = wide[:, 40:] = (255, 0, 0)
    wide[:, 20:40] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "n0" / "wide.png")
    Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))).save(tmp_path / "n0" / "tall.png")
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), size=8))
    for index in range(2):
        image, _ = dataset[index]
        assert image.shape == (3, 8, 8)
        assert torch.all(image[0] == 0) and torch.all(image[1] == 0) and torch.all(image[2] == 255)


def test_imagenet_list_file_layout(imagenet_root, tmp_path):
    (imagenet_root / "n00000003" / "with space.png").write_bytes((imagenet_root / "n00000001" / "c.png").read_bytes())
    list_file = tmp_path / "image_list.txt"
    list_file.write_text("n00000003/d.JPG 7\n\nn00000001/a.JPEG 2\nn00000003/with space.png 0\n")
    dataset = build_dataset("imagenet", ImageNetArgs(root=str(imagenet_root), list_file=str(list_file), size=12))
    assert len(dataset) == 3 and dataset.n_classes == 8
    assert [dataset[i][1] for i in range(3)] == [7, 2, 0]
    expected = expected_square(str(imagenet_root / "n00000001" / "a.JPEG"), 12)
    np.testing.assert_array_equal(chw_to_hwc(dataset[1][0]), expected)
    assert dataset[2][0].shape == (3, 12, 12)


def test_imagenet_user_errors_are_one_line_and_actionable(tmp_path):
    missing = tmp_path / "x" / "y"
    message = (f"dataset.args.root: {missing} does not exist; download ImageNet ILSVRC2012 train and point root "
               f"at the folder of nXXXXXXXX class folders (or set dataset.args.list_file)")
    assert check_dataset_args("imagenet", ImageNetArgs(root=str(missing))) == [message]
    with pytest.raises(DatasetError) as error:
        build_dataset("imagenet", ImageNetArgs(root=str(missing)))
    assert str(error.value) == message
    problems = check_dataset_args("imagenet", ImageNetArgs(root=str(tmp_path), list_file=str(tmp_path / "l.txt")))
    assert len(problems) == 1 and problems[0].startswith("dataset.args.list_file:")
    assert check_dataset_args("imagenet", ImageNetArgs(root=str(tmp_path))) == []
    with pytest.raises(DatasetError, match="no .JPEG/.jpeg/.jpg/.png images"):
        build_dataset("imagenet", ImageNetArgs(root=str(tmp_path)))
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("a.JPEG 1\nb.JPEG cat\n")
    with pytest.raises(DatasetError, match=r"bad.txt:2: expected 'relative/path.JPEG label'"):
        build_dataset("imagenet", ImageNetArgs(root=str(tmp_path), list_file=str(bad_list)))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST

def write_idx_gz(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_fashion_standin(folder, prefix="train", count=5):
    os.makedirs(folder, exist_ok=True)
    images = RNG.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    write_idx_gz(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx_gz(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return images, labels


@pytest.mark.parametrize("header, body, message", [
    (struct.pack(">BBBBI", 0, 0, 8, 1, 10**9), b"", "an idx header for (1000000000,): not Fashion-MNIST's"),
    (struct.pack(">BBBBI", 0, 0, 8, 1, 100), bytes(50 * 2**20), "expected 100 values for shape (100,), found 101 or more"),
    (struct.pack(">BBBB", 0, 0, 8, 3) + b"\0\0", b"", "a cut-off shape"),
    (struct.pack(">BBBB", 0, 0, 8, 0), b"\1", "a cut-off shape"),  # no dimensions
    (struct.pack(">BBBBIII", 0, 0, 8, 3, 2**30, 2**30, 16), b"", "not Fashion-MNIST's"),  # 2^64 values
])
def test_an_idx_file_is_read_no_further_than_its_header_says(tmp_path, header, body, message):
    from source.datasets.fashion_mnist import read_idx

    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(header + body))  # 50 MB of zeros in some 50 KB: never unpacked whole
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_idx(str(path))


def test_labels_of_another_shape_are_a_dataset_error(tmp_path):
    images, labels = write_fashion_standin(tmp_path)
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", np.stack([labels, labels], axis=1))  # numpy failed later
    with pytest.raises(DatasetError, match=re.escape("holds (5, 28, 28) images and (5, 2) labels; expected")):
        build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path)))


def test_a_broken_deflate_stream_behind_a_good_gzip_header_is_a_dataset_error(tmp_path):
    from source.datasets.fashion_mnist import read_idx

    packed = bytearray(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + bytes(range(100))))
    packed[12:20] = b"\xff" * 8  # past the 10-byte gzip header: the deflate data (zlib.error, not an OSError)
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(str(path))


@pytest.mark.skipif(not os.path.isfile(f"{DEBIAN_FASHION_MNIST}/t10k-images-idx3-ubyte.gz"),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_files():
    dataset = build_dataset("fashion_mnist", FashionMNISTArgs(split="test"))
    assert len(dataset) == 10000 and (dataset.n_classes, dataset.channels, dataset.size) == (10, 1, 32)
    with gzip.open(f"{DEBIAN_FASHION_MNIST}/t10k-images-idx3-ubyte.gz") as file:
        raw = np.frombuffer(file.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{DEBIAN_FASHION_MNIST}/t10k-labels-idx1-ubyte.gz") as file:
        labels = np.frombuffer(file.read(), dtype=np.uint8, offset=8)
    assert sorted(set(labels.tolist())) == list(range(10))
    for index in (0, 1234, 9999):
        image, label = dataset[index]
        assert image.shape == (1, 32, 32) and image.dtype == torch.uint8 and label == labels[index]
        np.testing.assert_array_equal(image[0, 2:30, 2:30].numpy(), raw[index])
    assert len(build_dataset("fashion_mnist", FashionMNISTArgs())) == 60000


def test_fashion_mnist_standin_padding_and_resize(tmp_path):
    images, labels = write_fashion_standin(tmp_path)
    dataset = build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path)))
    assert len(dataset) == 5
    image, label = dataset[3]
    assert image.shape == (1, 32, 32) and label == labels[3]
    padded = np.zeros((32, 32), dtype=np.uint8)
    padded[2:30, 2:30] = images[3]
    np.testing.assert_array_equal(image[0].numpy(), padded)
    resized = build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path), size=16))
    assert resized.size == 16
    expected = np.asarray(Image.fromarray(padded).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized[3][0][0].numpy(), expected)
    for data in (dataset, resized):  # the loader's batched read gives what stacking the items gives
        images, labels = data.batch([4, 0, 3])
        stacked = default_collate([data[i] for i in (4, 0, 3)])
        assert torch.equal(images, stacked[0]) and torch.equal(labels, stacked[1]) and labels.dtype == torch.int64


def test_fashion_mnist_reads_torchvision_download_folder(tmp_path):
    images, labels = write_fashion_standin(tmp_path / "FashionMNIST" / "raw", prefix="t10k", count=3)
    dataset = build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path), split="test"))
    assert len(dataset) == 3 and dataset[2][1] == labels[2]


def test_fashion_mnist_errors(tmp_path, monkeypatch):
    problems = check_dataset_args("fashion_mnist", FashionMNISTArgs(root=str(tmp_path)))
    assert len(problems) == 1 and "apt-get install dataset-fashion-mnist" in problems[0]
    assert "download: true" in problems[0]
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path)))

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetError, match="could not download Fashion-MNIST .*Error downloading"):
        build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path), download=True))
    with pytest.raises(DatasetError, match="dataset.args.split: must be 'train' or 'test'"):
        build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path), split="val"))
    write_fashion_standin(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as file:
        file.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + bytes(3))
    with pytest.raises(DatasetError, match="expected 5 values"):
        build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# CIFAR-10

def write_cifar_standin(root, per_batch=4, protocol=pickle.DEFAULT_PROTOCOL):
    """torchvision's on-disk layout with tiny batches: data N x 3072 (channel-major) and labels. Protocol 2 with
    numpy 1's module names, as the real files (Python 2) name numpy's array constructor."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, per_batch).tolist()
        pickled = pickle.dumps({"batch_label": name, "data": data, "labels": labels, "filenames": []}, protocol)
        (folder / name).write_bytes(pickled.replace(b"cnumpy._core.", b"cnumpy.core.") if protocol == 2 else pickled)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, file)
    return written


def test_cifar10_standin(tmp_path):
    written = write_cifar_standin(tmp_path)
    train = build_dataset("cifar10", CIFAR10Args(root=str(tmp_path), download=False))
    assert len(train) == 20 and (train.n_classes, train.channels, train.size) == (10, 3, 32)
    assert train.classes[0] == "airplane" and train.dequantize
    data, labels = written["data_batch_3"]
    image, label = train[2 * 4 + 1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == labels[1]
    np.testing.assert_array_equal(image[1].numpy(), data[1, 1024:2048].reshape(32, 32))  # green plane
    test = build_dataset("cifar10", CIFAR10Args(root=str(tmp_path), split="test"))
    assert len(test) == 4 and test[3][1] == written["test_batch"][1][3]


def test_cifar10_errors(tmp_path, monkeypatch):
    problems = check_dataset_args("cifar10", CIFAR10Args(root=str(tmp_path), download=False))
    assert len(problems) == 1 and "cifar-10-batches-py" in problems[0] and "download: true" in problems[0]
    assert check_dataset_args("cifar10", CIFAR10Args(root=str(tmp_path))) == []

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError) as error:
        build_dataset("cifar10", CIFAR10Args(root=str(tmp_path)))
    assert "could not download CIFAR-10" in str(error.value) and "'cifar-10-batches-py'" in str(error.value)
    assert "\n" not in str(error.value)
    assert download_pending("cifar10", CIFAR10Args(root=str(tmp_path)))  # what a dry run says instead of trying
    assert not download_pending("cifar10", CIFAR10Args(root=str(tmp_path), download=False))
    assert download_pending("fashion_mnist", FashionMNISTArgs(root=str(tmp_path), download=True))
    write_cifar_standin(tmp_path)
    assert not download_pending("cifar10", CIFAR10Args(root=str(tmp_path)))
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_2: not a readable CIFAR-10 pickle"):
        build_dataset("cifar10", CIFAR10Args(root=str(tmp_path)))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches_load_in_every_pickle_protocol_numpy_writes(tmp_path, protocol):
    written = write_cifar_standin(tmp_path, protocol=protocol)
    if protocol == 2:
        assert b"numpy.core.multiarray" in (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    images = build_dataset("cifar10", CIFAR10Args(root=str(tmp_path))).in_memory_images()
    np.testing.assert_array_equal(images.reshape(20, 3072).numpy(),
                                  np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]))


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    write_cifar_standin(tmp_path)
    marker = tmp_path / "ran_a_command"
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(
        pickle.dumps({"data": _RunsACommand(marker), "labels": [0]}))
    with pytest.raises(DatasetError, match=r"data_batch_4: not a readable CIFAR-10 pickle \(it calls \w+\.system"):
        build_dataset("cifar10", CIFAR10Args(root=str(tmp_path)))
    assert not marker.exists()


class _Constructs:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _shared_nest(depth: int) -> list:
    nest = [0, 0, 0, 0]
    for _ in range(depth):
        nest = [nest] * 4  # one list, referenced 4 times: a small pickle, 4^depth ints once numpy copies it out
    return nest


@pytest.mark.parametrize("batch, message", [
    ({"data": _Constructs(np.ndarray, ((50_000_000,), np.dtype(object))), "labels": [0]}, "not a plain number type"),
    ({"data": np.array([None] * 3, dtype=object), "labels": [0]}, "not a plain number type"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": _shared_nest(12)}, "'labels' (N ints)"),
    ({"data": np.zeros((4, 3071), np.uint8), "labels": [0] * 4}, "N x 3072 uint8"),
    (np.zeros(3, np.uint8), "not a CIFAR-10 batch"),
    ({k * (2**61 - 1): 0 for k in range(1, 100)}, "a hash flood"),  # one hash: 1 MB of such keys took 46 s
])
def test_a_cifar10_batch_that_would_allocate_without_bound_is_refused(tmp_path, batch, message):
    write_cifar_standin(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(pickle.dumps(batch))
    assert len((tmp_path / "cifar-10-batches-py" / "data_batch_5").read_bytes()) < 20000
    with pytest.raises(DatasetError, match=f"data_batch_5: .*{re.escape(message)}"):
        build_dataset("cifar10", CIFAR10Args(root=str(tmp_path)))


class _DtypeWithStringField:
    """np.dtype('V8', False, True) whose pickled state names a Python string as its field's dtype: numpy's C code
    then read the string as a dtype (a segmentation fault when the array using it was built)."""

    def __reduce__(self):
        return np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": ("O", 0)}, 8, 1, 1)


class _ArrayOfDtype:
    def __reduce__(self):
        return np.ndarray(0).__reduce__()[0], (np.ndarray, (0,), b"b"), (1, (2,), _DtypeWithStringField(), False,
                                                                          b"A" * 16)


def test_a_cifar10_batch_whose_dtype_state_would_corrupt_memory_is_refused(tmp_path):
    write_cifar_standin(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(
        pickle.dumps({"data": _ArrayOfDtype(), "labels": [0, 1]}, protocol=2))
    code = ("import sys; from source.datasets import build_dataset, CIFAR10Args, DatasetError\n"
            "try: build_dataset('cifar10', CIFAR10Args(root=sys.argv[1]))\n"
            "except DatasetError as error: print(error)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"status {result.returncode}: {result.stderr[-500:]}"  # -11 before the fix
    assert "data_batch_5: not a readable CIFAR-10 pickle (a numpy dtype 'V8'" in result.stdout


# ---------------------------------------------------------------------------------------------
# Synthetic

def test_synthetic_is_deterministic_varied_and_class_dependent():
    args = SyntheticArgs(n_classes=4, size=16, channels=3, count=400, seed=3)
    dataset, again = build_dataset("synthetic", args), build_dataset("synthetic", args)
    other_seed = build_dataset("synthetic", SyntheticArgs(n_classes=4, size=16, count=400, seed=4))
    assert dataset[17][0].shape == (3, 16, 16) and dataset[17][0].dtype == torch.uint8
    assert all(torch.equal(dataset[i][0], again[i][0]) for i in range(10))
    assert not torch.equal(dataset[5][0], other_seed[5][0])
    assert [dataset[i][1] for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert not torch.equal(dataset[0][0], dataset[4][0])  # same class, different sample
    means = torch.stack([torch.stack([dataset[i][0].float().mean((1, 2)) for i in range(c, 400, 4)]).mean(0)
                         for c in range(4)])
    distances = torch.cdist(means, means) + torch.eye(4) * 1e9
    assert distances.min() > 10  # class colours differ by more than 10 grey levels
    huge = build_dataset("synthetic", SyntheticArgs(count=10**9, channels=1, size=8))
    assert len(huge) == 10**9 and huge[10**9 - 1][0].shape == (1, 8, 8)


def test_synthetic_rejects_bad_args():
    assert check_dataset_args("synthetic", SyntheticArgs(count=0, seed=-1)) == [
        "dataset.args.count: must be positive, got 0", "dataset.args.seed: must be >= 0, got -1"]
    with pytest.raises(DatasetError, match="dataset.args.size"):
        build_dataset("synthetic", SyntheticArgs(size=0))


def test_registry_names_and_unknown_dataset():
    assert set(DATASETS) == {"imagenet", "imagenet_prepared", "fashion_mnist", "cifar10", "stl10", "synthetic", "lsun",
                             "inaturalist"}
    with pytest.raises(DatasetError, match="unknown dataset 'imagenett'; known: cifar10, fashion_mnist, imagenet, "
                                           "imagenet_prepared, inaturalist, lsun, stl10, synthetic"):
        build_dataset("imagenett", SyntheticArgs())
    with pytest.raises(TypeError, match="needs a SyntheticArgs"):
        build_dataset("synthetic", ImageNetArgs(root="/"))


# ---------------------------------------------------------------------------------------------
# Iterator

class IndexImages(Dataset):
    """Image pixels and label both encode the index, so batches can be traced back to indices."""

    n_classes, channels, size = 1000, 1, 2

    def __init__(self, count: int, dequantize: bool):
        self.count, self.dequantize = count, dequantize

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return torch.full((1, 2, 2), index % 256, dtype=torch.uint8), index


def draw(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_iterator_values_epochs_and_determinism():
    dataset = IndexImages(50, dequantize=False)
    iterator = InfiniteBatchIterator(dataset, batch_size=8, seed=1)
    assert iterator.batches_per_epoch == 6 and iterator.epoch == 0
    batches = draw(iterator, 12)
    assert iterator.epoch == 1
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (8, 1, 2, 2) and y.dtype == torch.int64
    torch.testing.assert_close(x, (y % 256).float().view(8, 1, 1, 1).expand(8, 1, 2, 2) / 127.5 - 1, rtol=0, atol=0)
    epoch0, epoch1 = torch.cat([y for _, y in batches[:6]]), torch.cat([y for _, y in batches[6:]])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48  # no repeats, 2 dropped
    assert not torch.equal(epoch0, epoch1)
    assert_same_batches(batches, draw(InfiniteBatchIterator(dataset, batch_size=8, seed=1), 12))
    assert not torch.equal(next(InfiniteBatchIterator(dataset, batch_size=8, seed=2))[1], batches[0][1])


def test_iterator_dequantization_noise_range():
    dataset = IndexImages(40, dequantize=True)
    x, y = next(InfiniteBatchIterator(dataset, batch_size=16, seed=0))
    # The original's scaling: (x + U[0, 1)) / 128 - 1, so values stay in [-1, 1).
    noise = (x + 1) * 128 - (y % 256).float().view(16, 1, 1, 1)
    assert noise.min() >= -1e-4 and noise.max() < 1 + 1e-4 and x.max() < 1
    assert noise.std() > 0.2 and len(torch.unique(noise)) > 50  # uniform-ish, independent per pixel


@pytest.mark.parametrize("stream, seed, epoch, start", [(1, 0, 0, 0), (2, 7, 3, 1000), (1, 2**32 - 1, 2**31, 2**32 - 70),
                                                       (0, 2**40, 1, 5), (1, 3, 0, 2**32 - 10)])  # last two: slow path
def test_derived_seeds_are_numpys_seed_sequence_bit_for_bit(stream, seed, epoch, start):
    """The noise and flips of every run so far came from SeedSequence per sample: the vectorized seeds must equal it."""
    positions = range(start, start + 64)
    expected = [int(np.random.SeedSequence((stream, seed, epoch, p)).generate_state(1, np.uint64)[0]) for p in positions]
    assert derived_seeds(stream, seed, epoch, positions) == expected


@pytest.mark.parametrize("stop_after", [2, 5, 6, 7])  # mid-epoch, before, at and after the epoch boundary
def test_iterator_resume_is_exact(stop_after):
    dataset = IndexImages(50, dequantize=True)
    uninterrupted = draw(InfiniteBatchIterator(dataset, batch_size=8, seed=5), stop_after + 6)
    interrupted = InfiniteBatchIterator(dataset, batch_size=8, seed=5)
    draw(interrupted, stop_after)
    state = interrupted.state_dict()
    resumed = InfiniteBatchIterator(dataset, batch_size=8, seed=5)
    resumed.load_state_dict(state)
    assert_same_batches(draw(resumed, 6), uninterrupted[stop_after:])
    assert resumed.epoch == (stop_after + 6 - 1) // 6  # the epoch of the last batch drawn


def test_iterator_rank_union_equals_single_process():
    dataset = IndexImages(70, dequantize=True)
    single = draw(InfiniteBatchIterator(dataset, batch_size=16, seed=3), 6)
    ranks = [draw(InfiniteBatchIterator(dataset, batch_size=8, seed=3, rank=r, world_size=2), 6) for r in range(2)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)


def test_iterator_workers_match_main_process_and_leave_global_rng_alone():
    dataset = build_dataset("synthetic", SyntheticArgs(n_classes=3, size=8, count=40, dequantize=True))
    rng_state = torch.get_rng_state()
    in_process = draw(InfiniteBatchIterator(dataset, batch_size=8, seed=0), 7)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert_same_batches(draw(InfiniteBatchIterator(dataset, batch_size=8, seed=0, num_workers=2), 7), in_process)


def test_iterator_uses_at_most_one_worker_per_usable_cpu(monkeypatch):
    """num_workers 4 on a 2-CPU machine (the demo's default on our CI): 2 workers, the same batches, and no
    DataLoader warning about too many workers."""
    dataset = build_dataset("synthetic", SyntheticArgs(n_classes=3, size=8, count=40, dequantize=True))
    in_process = draw(InfiniteBatchIterator(dataset, batch_size=8, seed=0), 5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    capped = InfiniteBatchIterator(dataset, batch_size=8, seed=0, num_workers=4)
    assert capped.num_workers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_batches(draw(capped, 5), in_process)


def test_iterator_resume_with_other_global_batch_keeps_position():
    dataset = IndexImages(96, dequantize=False)
    old = InfiniteBatchIterator(dataset, batch_size=8, seed=0)
    draw(old, 3)  # 24 samples consumed
    new = InfiniteBatchIterator(dataset, batch_size=6, seed=0, world_size=2)
    new.load_state_dict(old.state_dict())
    reference = draw(InfiniteBatchIterator(dataset, batch_size=12, seed=0), 3)
    assert torch.equal(next(new)[1], reference[2][1][:6])


def test_iterator_rejects_data_smaller_than_a_global_batch():
    with pytest.raises(DatasetError, match="fewer than one global micro-batch of 8 x 2 ranks"):
        InfiniteBatchIterator(IndexImages(10, dequantize=False), batch_size=8, seed=0, world_size=2)


class StopSignalProbe(IndexImages):
    """Label 1 where the process that read the image ignores Ctrl-C (a loader worker should), else 0."""

    def __getitem__(self, index):
        return torch.zeros((1, 2, 2), dtype=torch.uint8), int(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)


def test_loader_workers_leave_ctrl_c_to_the_training_process():
    """Forked with the trainer's handler, every worker printed its own stop message on one Ctrl-C."""
    previous = signal.signal(signal.SIGINT, lambda *_: None)  # as the trainer's, inherited by the workers at fork
    try:
        batches = InfiniteBatchIterator(StopSignalProbe(16, dequantize=False), batch_size=4, seed=0, num_workers=2)
        assert [int(y.min()) for _, y in draw(batches, 3)] == [1, 1, 1]
        assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # the training process keeps its own
    finally:
        signal.signal(signal.SIGINT, previous)
