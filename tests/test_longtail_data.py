"""Long-tailed data for gSR (issue part 3): the profile, the per-class choice, LSUN LMDBs, iNaturalist lists,
class counts and the balanced reference split, through the public entry points."""
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

import source.datasets.prepare as prepare
from source.config import ConfigError, config_from_dict, load_config
from source.datasets import (
    CIFAR10Args, DatasetError, FashionMNISTArgs, ImageNetArgs, INaturalistArgs, LongTailArgs, LSUNArgs,
    PreparedImageNetArgs, SyntheticArgs, build_dataset, check_dataset_args, class_counts, describe_class_counts,
    reference_args)
from source.datasets.longtail import profile

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
FASHION_LT_100 = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
needs_fashion = pytest.mark.skipif(not os.path.isfile(f"{DEBIAN_FASHION_MNIST}/train-labels-idx1-ubyte.gz"),
                                   reason="apt-get install dataset-fashion-mnist")


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# The profile

def test_profiles_of_the_release():
    assert profile(5000, 10, 100) == CIFAR10_LT_100 and sum(CIFAR10_LT_100) == 12406
    assert profile(6000, 10, 100) == FASHION_LT_100
    assert profile(50000, 5, 100, exponent_offset=1e-9) == [50000, 15811, 5000, 1581, 500]
    assert profile(50000, 5, 1000, exponent_offset=1e-9) == [50000, 8891, 1581, 281, 50]
    assert profile(7, 1, 100) == [7] and profile(10, 3, 1) == [10, 10, 10]


def write_cifar(root: Path, per_class: int = 5000) -> np.ndarray:
    """CIFAR-10's on-disk format (5 pickled train batches, a test batch, batches.meta); labels cycle
    through a fixed shuffle and each image's first 4 bytes hold its index, so the choice can be traced."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), per_class))
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    data[:, :4] = np.arange(len(labels), dtype="<u4").view(np.uint8).reshape(-1, 4)
    for number, batch in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        with open(folder / f"data_batch_{number}", "wb") as file:
            pickle.dump({"data": data[batch], "labels": labels[batch].tolist()}, file)
    with open(folder / "test_batch", "wb") as file:
        pickle.dump({"data": data[:100], "labels": (np.arange(100) % 10).tolist()}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, file)
    return labels


def source_index(image: torch.Tensor) -> int:
    return int(image.flatten()[:4].numpy().view("<u4")[0])


def release_choice(labels: np.ndarray, counts: list[int], seed: int) -> list[int]:
    """The release's code path: seed numpy's global generator once, shuffle each class's indices in turn."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        chosen = []
        for label, count in zip(np.unique(labels), counts):
            indices = np.where(labels == label)[0]
            np.random.shuffle(indices)
            chosen.extend(indices[:count].tolist())
        return chosen
    finally:
        np.random.set_state(state)


def test_cifar10_lt_counts_and_the_release_choice(tmp_path):
    labels = write_cifar(tmp_path)
    args = CIFAR10Args(root=str(tmp_path), download=False, long_tail=LongTailArgs(ratio=100))
    data = build_dataset("cifar10", args)
    assert class_counts(data) == CIFAR10_LT_100 and len(data) == 12406
    assert describe_class_counts(data) == "per class: 5000 2997 1796 1077 645 387 232 139 83 50 (rho 100.0)"
    kept = [source_index(data[i][0]) for i in range(len(data))]
    assert kept == release_choice(labels, CIFAR10_LT_100, seed=0)
    assert all(data[i][1] == labels[kept[i]] for i in range(0, len(data), 97))
    other = build_dataset("cifar10", CIFAR10Args(root=str(tmp_path), download=False,
                                                 long_tail=LongTailArgs(ratio=100, seed=1)))
    assert class_counts(other) == CIFAR10_LT_100
    assert set(kept) != {source_index(other[i][0]) for i in range(len(other))}
    reference = reference_args("cifar10", args, "test")
    assert reference == CIFAR10Args(root=str(tmp_path), download=False, split="test")
    assert class_counts(build_dataset("cifar10", reference)) == [10] * 10


@needs_fashion
def test_fashion_mnist_lt_on_the_real_data_is_deterministic_and_seeded():
    args = FashionMNISTArgs(long_tail=LongTailArgs(ratio=100))
    data, again = build_dataset("fashion_mnist", args), build_dataset("fashion_mnist", args)
    assert class_counts(data) == FASHION_LT_100 and len(data) == sum(FASHION_LT_100)
    np.testing.assert_array_equal(data.labels, again.labels)
    assert all(torch.equal(data[i][0], again[i][0]) for i in (0, 6000, len(data) - 1))
    reseeded = build_dataset("fashion_mnist", FashionMNISTArgs(long_tail=LongTailArgs(ratio=100, seed=7)))
    assert class_counts(reseeded) == FASHION_LT_100
    assert not all(torch.equal(data[i][0], reseeded[i][0]) for i in range(6000, 6010))
    capped = build_dataset("fashion_mnist", FashionMNISTArgs(long_tail=LongTailArgs(n_max=100)))
    assert class_counts(capped) == [100] * 10  # ratio 1 with n_max: a balanced subset
    assert class_counts(build_dataset("fashion_mnist", reference_args("fashion_mnist", args, "test"))) == [1000] * 10


@needs_fashion
@pytest.mark.parametrize("long_tail, expected", [
    (LongTailArgs(ratio=0.01), "dataset.args.long_tail.ratio: must be a finite number >= 1 (n_max / n_min; 1 = off), "
                               "got 0.01; the release's imb_factor 0.01 is ratio 100"),
    (LongTailArgs(n_max=0), "dataset.args.long_tail.n_max: must be >= 1 or null"),
    (LongTailArgs(seed=-1), "dataset.args.long_tail.seed: must be in 0..4294967295, got -1"),
    (LongTailArgs(ratio=100, n_max=60), "dataset.args.long_tail: class 9 would keep int(n_max * ratio ** "
                                        "(-i / (K - 1))) = 0 images with n_max 60 and ratio 100"),
    (LongTailArgs(ratio=100, n_max=50), "dataset.args.long_tail: classes 8..9 would keep"),
    (LongTailArgs(ratio=10000, n_max=500), "dataset.args.long_tail: classes 7..9 would keep"),
])
def test_long_tail_errors_are_one_line_before_reading(long_tail, expected):
    args = FashionMNISTArgs(long_tail=long_tail)
    assert expected in check_dataset_args("fashion_mnist", args)[0]
    with pytest.raises(DatasetError) as error:
        build_dataset("fashion_mnist", args)
    assert expected in one_line(error)


@needs_fashion
def test_n_max_above_a_class_count_is_an_error_naming_the_class():
    with pytest.raises(DatasetError) as error:
        build_dataset("fashion_mnist", FashionMNISTArgs(long_tail=LongTailArgs(ratio=2, n_max=6001)))
    assert one_line(error) == ("dataset.args.long_tail: class 0 has 6000 images but the profile wants 6001 "
                               "(n_max 6001, ratio 2; 1 of 10 classes fall short); lower n_max or ratio")


def test_config_reads_long_tail_and_the_lsun_categories(tmp_path):
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    raw["dataset"]["args"]["long_tail"] = {"ratio": 100, "n_max": 6000}
    config = config_from_dict(raw, ["dataset.args.long_tail.seed=3"])
    assert config.dataset.args.long_tail == LongTailArgs(ratio=100.0, n_max=6000, seed=3)
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    config = config_from_dict(raw, ["dataset.name=lsun", "dataset.args.root=/data/lsun",
                                    "dataset.args.categories=[kitchen, bedroom]", "dataset.args.long_tail.ratio=1e2"])
    assert config.dataset.args == LSUNArgs(root="/data/lsun", categories=["kitchen", "bedroom"], size=32,
                                           long_tail=LongTailArgs(ratio=100.0))  # size: the demo's models'
    with pytest.raises(ConfigError, match=r"dataset.args.long_tail.rho: unknown key \(did you mean 'ratio'\?\)"):
        config_from_dict(yaml.safe_load((CONFIGS / "demo.yaml").read_text()), ["dataset.args.long_tail.rho=100"])
    with pytest.raises(ConfigError, match="dataset.args.long_tail.n_max: expected int or null, got str 'all'"):
        config_from_dict(yaml.safe_load((CONFIGS / "demo.yaml").read_text()), ["dataset.args.long_tail.n_max=all"])


# ---------------------------------------------------------------------------------------------
# Synthetic, ImageNet folders, prepared shards

def test_synthetic_long_tail_and_its_test_split():
    args = SyntheticArgs(n_classes=4, size=8, count=400, long_tail=LongTailArgs(ratio=8))
    data = build_dataset("synthetic", args)
    assert class_counts(data) == [100, 50, 25, 12] and len(data) == 187
    assert all(data[i][1] == data.labels[i] for i in range(len(data)))
    test = build_dataset("synthetic", reference_args("synthetic", args, "test"))
    assert class_counts(test) == [100] * 4
    train = build_dataset("synthetic", SyntheticArgs(n_classes=4, size=8, count=400))
    assert [test[i][1] for i in range(8)] == [train[i][1] for i in range(8)]
    assert not any(torch.equal(test[i][0], train[i][0]) for i in range(8))
    wide = build_dataset("synthetic", SyntheticArgs(n_classes=1000, size=4, count=100_000,
                                                    long_tail=LongTailArgs(ratio=10)))
    line = describe_class_counts(wide)
    assert line.startswith("per class (1000 classes, ") and "median" in line and line.endswith("(rho 10.0)")
    assert len(line) < 150
    assert class_counts(build_dataset("synthetic", SyntheticArgs(n_classes=3, count=10**12)))[0] == 10**12 // 3 + 1


def jpeg(colour, size=(10, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_class_folders(root: Path, per_class: list[int]) -> None:
    for label, count in enumerate(per_class):
        (root / f"n{label:08d}").mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (12, 8), (40 * label, 10 * index, 0)).save(root / f"n{label:08d}" / f"{index}.png")


def test_imagenet_folders_long_tail_and_val_split(tmp_path):
    write_class_folders(tmp_path / "train", [6, 6, 6])
    write_class_folders(tmp_path / "val", [2, 2, 2])
    args = ImageNetArgs(root=str(tmp_path / "train"), size=4, long_tail=LongTailArgs(ratio=4))
    data = build_dataset("imagenet", args)
    assert class_counts(data) == [6, 3, 1] and data.labels.tolist() == [0] * 6 + [1] * 3 + [2]
    again = build_dataset("imagenet", args)
    assert [data.path(i) for i in range(len(data))] == [again.path(i) for i in range(len(again))]
    with pytest.raises(DatasetError) as error:
        reference_args("imagenet", args, "val")
    assert one_line(error) == ("dataset 'imagenet': split 'val' needs dataset.args.val_root "
                               "(the validation images' folder)")
    with pytest.raises(DatasetError, match="dataset 'imagenet' has no split 'test'; its splits: train, val"):
        reference_args("imagenet", args, "test")
    args.val_root = str(tmp_path / "val")
    val = build_dataset("imagenet", reference_args("imagenet", args, "val"))
    assert class_counts(val) == [2, 2, 2] and val.path(0).startswith(str(tmp_path / "val"))
    assert check_dataset_args("imagenet", ImageNetArgs(root=str(tmp_path), split="val")) == [
        "dataset.args.val_root: split 'val' needs the folder of validation images (class folders named like root's, "
        "or paths relative to it in val_list_file)"]
    (tmp_path / "empty_val" / "n00000000").mkdir(parents=True)  # a val folder whose class folder has no images
    with pytest.raises(DatasetError, match=r"^dataset.args.val_root: no .JPEG"):
        build_dataset("imagenet", ImageNetArgs(root=str(tmp_path / "train"), split="val",
                                               val_root=str(tmp_path / "empty_val")))


def test_prepared_shards_long_tail_reads_only_the_kept_rows(tmp_path):
    write_class_folders(tmp_path / "train", [4, 4])
    out = tmp_path / "prepared"
    assert prepare.main(["imagenet", "--root", str(tmp_path / "train"), "--size", "4", "--out", str(out),
                         "--workers", "1"]) == 0
    full = build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(out)))
    data = build_dataset("imagenet_prepared", PreparedImageNetArgs(path=str(out), long_tail=LongTailArgs(ratio=4)))
    assert class_counts(full) == [4, 4] and class_counts(data) == [4, 1]
    rows = [next(j for j in range(len(full)) if torch.equal(full[j][0], data[i][0])) for i in range(len(data))]
    assert [full[row][1] for row in rows] == data.labels.tolist() and len(set(rows)) == 5
    with pytest.raises(DatasetError, match="split 'val' needs dataset.args.val_path"):
        reference_args("imagenet_prepared", PreparedImageNetArgs(path=str(out)), "val")
    (tmp_path / "not_prepared").mkdir()
    assert check_dataset_args("imagenet_prepared", PreparedImageNetArgs(
        path=str(out), split="val", val_path=str(tmp_path / "not_prepared")))[0].startswith("dataset.args.val_path: ")


# ---------------------------------------------------------------------------------------------
# LSUN LMDB folders

CATEGORIES = ["bedroom", "kitchen", "tower"]
PER_CATEGORY = 12
CORRUPT_KEY = b"kitchen-003"


def write_lsun(root: Path) -> None:
    """One <category>_train_lmdb per category, keys '<category>-NNN' (cursor order = NNN), solid-colour JPEGs
    whose green level is 20 * NNN; kitchen-003 holds bytes that are no image."""
    import lmdb

    for label, category in enumerate(CATEGORIES):
        with lmdb.open(str(root / f"{category}_train_lmdb"), map_size=2**22) as env, env.begin(write=True) as txn:
            for index in reversed(range(PER_CATEGORY)):  # written out of order: the cursor sorts keys
                key = f"{category}-{index:03d}".encode()
                txn.put(key, b"\xff\xd8 truncated" if key == CORRUPT_KEY else jpeg((80 * label, 20 * index, 0)))


@pytest.fixture
def lsun_root(tmp_path) -> Path:
    write_lsun(tmp_path)
    return tmp_path


def keys_of(data) -> list[bytes]:
    return [data.key(i) for i in range(len(data))]


def test_lsun_lt_keeps_the_first_images_of_each_category_and_reads_them(lsun_root):
    args = LSUNArgs(root=str(lsun_root), categories=CATEGORIES, size=4, eval_images=2,
                    long_tail=LongTailArgs(ratio=4, n_max=8))
    data = build_dataset("lsun", args)
    assert (data.n_classes, data.channels, data.size, data.classes) == (3, 3, 4, CATEGORIES)
    assert class_counts(data) == [8, 4, 2] and describe_class_counts(data) == "per class: 8 4 2 (rho 4.0)"
    assert keys_of(data) == ([f"bedroom-{i:03d}".encode() for i in range(8)]
                             + [f"kitchen-{i:03d}".encode() for i in range(4)] + [b"tower-000", b"tower-001"])
    image, label = data[9]  # kitchen-001
    assert image.dtype == torch.uint8 and image.shape == (3, 4, 4) and label == 1
    assert abs(int(image[0, 0, 0]) - 80) <= 3 and abs(int(image[1, 0, 0]) - 20) <= 3
    assert data.n_unreadable == 0
    image, label = data[11]  # kitchen-003 is corrupt: the next item, tower-000, stands in
    assert data.n_unreadable == 1 and label == 2 and abs(int(image[0, 0, 0]) - 160) <= 3
    loaded = [label for _, labels in DataLoader(data, batch_size=5, num_workers=2) for label in labels.tolist()]
    assert loaded == [0] * 8 + [1] * 3 + [2] * 3


def test_lsun_eval_split_is_held_out_unless_overlap_is_asked_for(lsun_root):
    args = LSUNArgs(root=str(lsun_root), categories=CATEGORIES, size=4, eval_images=3)
    train = build_dataset("lsun", args)
    evaluation = build_dataset("lsun", reference_args("lsun", args, "eval"))
    assert class_counts(train) == [9, 9, 9] and class_counts(evaluation) == [3, 3, 3]
    assert not set(keys_of(train)) & set(keys_of(evaluation))
    assert keys_of(evaluation)[:3] == [b"bedroom-009", b"bedroom-010", b"bedroom-011"]  # the last 3, in order
    assert train[0][1] == 0 and evaluation[8][1] == 2  # two data sets read the same LMDBs in one process
    args.eval_overlap = True  # the release: eval = the first images of the same train LMDBs
    train = build_dataset("lsun", args)
    evaluation = build_dataset("lsun", reference_args("lsun", args, "eval"))
    assert class_counts(train) == [12, 12, 12] and class_counts(evaluation) == [3, 3, 3]
    assert set(keys_of(evaluation)) < set(keys_of(train))
    assert keys_of(evaluation)[:3] == [b"bedroom-000", b"bedroom-001", b"bedroom-002"]


def test_lsun_errors_are_one_line(lsun_root, monkeypatch):
    def error_of(**changes) -> str:
        with pytest.raises(DatasetError) as error:
            build_dataset("lsun", LSUNArgs(**{"root": str(lsun_root), "categories": CATEGORIES, **changes}))
        return one_line(error)

    assert error_of(eval_images=12) == ("dataset.args.eval_images: bedroom has 12 images, too few to take 12 for the "
                                        "eval split and train on the rest; lower eval_images")
    assert "bedroom has 12 images, too few to take 13 for the eval split;" in error_of(eval_images=13,
                                                                                       eval_overlap=True)
    assert "no church_train_lmdb folder in" in error_of(categories=["bedroom", "church"])
    assert "class 0 has 10 images but the profile wants 11 (n_max 11, ratio 1; 3 of 3 classes fall short)" in (
        error_of(eval_images=2, long_tail=LongTailArgs(n_max=11)))
    assert error_of(split="val") == "dataset.args.split: must be 'train' or 'eval', got 'val'"
    with pytest.raises(DatasetError, match="dataset 'lsun' has no split 'test'; its splits: train, eval"):
        reference_args("lsun", LSUNArgs(root=str(lsun_root)), "test")
    with monkeypatch.context() as patch:  # a database whose count is more than its cursor walks
        patch.setattr("source.datasets.lsun.entry_count", lambda env: PER_CATEGORY + 5)
        assert error_of(eval_images=2) == ("dataset.args.root: the bedroom LMDB counts 17 entries, but its cursor gave 12 of "
                              "positions 0..14; the database is damaged (rebuild or download it again)")
    monkeypatch.setitem(__import__("sys").modules, "lmdb", None)
    assert error_of() == ("dataset 'lsun' reads LMDB folders with the lmdb package, which is not installed: "
                          "pip install lmdb")


# ---------------------------------------------------------------------------------------------
# iNaturalist 2019 lists

def write_inaturalist(root: Path, per_class: list[int], name: str) -> None:
    lines = []
    for label, count in enumerate(per_class):
        folder = root / "train_val2019" / "Plants" / str(400 + label)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = np.zeros((8, 16, 3), dtype=np.uint8)
            pixels[:, 4:12] = (30 * label, 20 * index, 200)  # the centred 8 x 8 square; black side bands
            Image.fromarray(pixels).save(folder / f"{name}{index}.png")
            lines.append(f"train_val2019/Plants/{400 + label}/{name}{index}.png {label}")
    (root / f"iNaturalist19_{name}.txt").write_text("\n".join(lines) + "\n")


def test_inaturalist_lists_crop_resize_classes_and_val_reference(tmp_path):
    write_inaturalist(tmp_path, [5, 3, 2, 1], "train")
    write_inaturalist(tmp_path, [1, 1, 1, 1], "val")
    args = INaturalistArgs(root=str(tmp_path), size=4)
    data = build_dataset("inaturalist", args)
    assert data.n_unreadable == 0 and data.n_classes == 1010
    assert len(class_counts(data)) == 1010 and class_counts(data)[:5] == [5, 3, 2, 1, 0]
    image, label = data[6]  # class 1, image 1
    assert label == 1 and image.shape == (3, 4, 4)
    assert image[:, :, 0].tolist() == [[30] * 4, [20] * 4, [200] * 4]  # the centre square only: no black bands
    inferred = build_dataset("inaturalist", INaturalistArgs(root=str(tmp_path), n_classes=None))
    assert class_counts(inferred) == [5, 3, 2, 1] and describe_class_counts(inferred) == "per class: 5 3 2 1 (rho 5.0)"
    tailed = build_dataset("inaturalist", INaturalistArgs(root=str(tmp_path), n_classes=None,
                                                          long_tail=LongTailArgs(ratio=2, n_max=3)))
    assert class_counts(tailed) == [3, 2, 1, 1]
    val = build_dataset("inaturalist", reference_args("inaturalist", args, "val"))
    assert class_counts(val)[:4] == [1, 1, 1, 1] and len(val) == 4
    with pytest.raises(DatasetError) as error:
        build_dataset("inaturalist", INaturalistArgs(root=str(tmp_path), n_classes=3))
    assert "dataset.args.n_classes: " in one_line(error) and "has label 3, but n_classes is 3" in one_line(error)
    assert check_dataset_args("inaturalist", INaturalistArgs(root=str(tmp_path), val_list="none.txt", split="val")) == [
        f"dataset.args.val_list: {tmp_path}/none.txt does not exist; write one 'relative/path.jpg label' line per "
        f"image (the release's iNaturalist19_val.txt)"]


def test_random_flip_mirrors_a_seeded_half_of_the_samples():
    from source.datasets.iterator import InfiniteBatchIterator

    class Striped(torch.utils.data.Dataset):
        n_classes, channels, size, dequantize, random_flip = 1, 1, 4, False, True

        def __len__(self):
            return 64

        def __getitem__(self, index):
            image = torch.zeros(1, 4, 4, dtype=torch.uint8)
            image[0, :, 0] = 255  # a bright left column
            return image, 0

    def flipped(seed):
        x, _ = next(InfiniteBatchIterator(Striped(), batch_size=64, seed=seed))
        return x[:, 0, 0, -1] > 0  # the bright column moved to the right

    first = flipped(0)
    assert 16 < int(first.sum()) < 48
    assert torch.equal(first, flipped(0)) and not torch.equal(first, flipped(1))


# The official LSUN train LMDBs' entry counts (bedroom, conference room, dining room, kitchen, living room).
LSUN_TRAIN_COUNTS = [3033042, 229069, 657571, 2212277, 1315802]


@pytest.mark.parametrize("name", ["lsun_lt_sngan", "lsun_lt_biggan"])
def test_lsun_lt_configs_give_the_released_profile_on_the_official_lmdbs(name):
    """Without n_max the head would be bedroom's 3 M images and the tail classes could not follow the profile."""
    from source.datasets.longtail import target_counts
    from source.datasets.lsun import EXPONENT_OFFSET

    args = load_config(CONFIGS / "gsr" / f"{name}.yaml").dataset.args
    train = [count - args.eval_images for count in LSUN_TRAIN_COUNTS]  # eval_overlap: false holds the last ones out
    assert target_counts(train, args.long_tail, EXPONENT_OFFSET) == [50000, 15811, 5000, 1581, 500]
