"""STL-10 at 48 px (SRGANs' STL-10 setting): the binary release's reader, the 48 px models, the config's run."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from source.datasets import (STL10Args, build_dataset, check_dataset_args, class_counts, download_pending,
                             reference_args, value_problems)
from source.datasets.longtail import LongTailArgs
from source.datasets.transforms import DatasetError
from source.models import ResNetGenerator, SNResNetProjectionDiscriminator
from source.training.checkpoint import load_snapshot

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_split(root: Path, split: str, images_hwc: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Files as the release stores them: per image, channel by channel, each channel column by column
    (Matlab's order); labels one byte each, numbered from 1."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images_hwc.transpose(0, 3, 2, 1)).tobytes())
    if labels is not None:
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 96, 96, 3), dtype=np.uint8)


def write_standin(root: Path, count: int = 12) -> tuple[np.ndarray, np.ndarray]:
    images, labels = random_images(count), np.arange(count) % 10
    write_split(root, "train", images, labels)
    write_split(root, "unlabeled", random_images(count, seed=1))
    return images, labels


def test_an_image_keeps_its_orientation_and_colours(tmp_path):
    """A red top row and a green left column: read column by column as rows, the image would be transposed."""
    image = np.zeros((1, 96, 96, 3), dtype=np.uint8)
    image[0, 0, :, 0] = 255  # top row red
    image[0, :, 0, 1] = 200  # left column green
    image[0, 95, 95, 2] = 77  # one blue pixel at the bottom right
    write_split(tmp_path, "train", image, np.array([3]))
    data = build_dataset("stl10", STL10Args(root=str(tmp_path), split="train", size=96, download=False))
    item, label = data[0]
    assert item.shape == (3, 96, 96) and item.dtype == torch.uint8 and label == 3
    assert (item[0, 0] == 255).all() and item[0, 1:].sum() == 0
    assert (item[1, :, 0] == 200).all() and item[1, :, 1:].sum() == 0
    assert item[2, 95, 95] == 77 and item[2].sum() == 77


def test_48_px_images_are_torchvisions_resize_of_the_release_pixels(tmp_path):
    from torchvision.transforms import Resize

    images, labels = write_standin(tmp_path)
    data = build_dataset("stl10", STL10Args(root=str(tmp_path), split="train", download=False))
    assert len(data) == 12 and data.size == 48 and data.channels == 3 and data.n_classes == 10
    assert data.n_unreadable == 0
    for index in (0, 7, 11):
        expected = np.asarray(Resize((48, 48))(Image.fromarray(images[index]))).transpose(2, 0, 1)
        item, label = data[index]
        assert np.array_equal(item.numpy(), expected) and label == labels[index]
    assert np.array_equal(data.in_memory_images()[7].numpy(), data[7][0].numpy())
    assert data.classes[labels[7]] == "monkey" and class_counts(data) == [2, 2] + [1] * 8


def test_the_unlabeled_split_is_one_class_and_the_training_default(tmp_path):
    write_standin(tmp_path)
    data = build_dataset("stl10", STL10Args(root=str(tmp_path), download=False))
    assert STL10Args().split == "unlabeled" and data.n_classes == 1 and list(data.labels) == [0] * 12
    expected = np.asarray(Image.fromarray(random_images(12, seed=1)[4]).resize((48, 48), Image.Resampling.BILINEAR))
    assert np.array_equal(data[4][0].numpy(), expected.transpose(2, 0, 1))
    assert reference_args("stl10", STL10Args(), "test").split == "test"


def test_its_batches_on_the_device_are_the_loaders(tmp_path):
    from source.datasets import InfiniteBatchIterator
    from source.datasets.device_batches import DeviceBatchIterator
    from test_datasets import draw

    write_standin(tmp_path)
    data = build_dataset("stl10", STL10Args(root=str(tmp_path), split="train", download=False, dequantize=False))
    loader = draw(InfiniteBatchIterator(data, batch_size=4, seed=3), 7)
    device = draw(DeviceBatchIterator(data, batch_size=4, seed=3, device="cpu"), 7)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(loader, device))
    assert loader[0][0].shape == (4, 3, 48, 48)


def test_a_long_tail_needs_labels(tmp_path):
    write_standin(tmp_path)
    tail = LongTailArgs(ratio=2)
    assert value_problems("stl10", STL10Args(split="unlabeled", long_tail=tail)) == [
        "dataset.args.long_tail: the unlabeled split has no labels; a long tail needs split train or test"]
    data = build_dataset("stl10", STL10Args(root=str(tmp_path), split="train", download=False,
                                            long_tail=LongTailArgs(ratio=2, n_max=2)))
    assert class_counts(data) == [2, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_missing_damaged_and_offline_files_are_one_line_errors(tmp_path, monkeypatch):
    args = STL10Args(root=str(tmp_path), split="train", download=False)
    assert check_dataset_args("stl10", args) == [
        f"dataset.args.root: train_X.bin, train_y.bin not found in {tmp_path / 'stl10_binary'}; set "
        f"dataset.args.download: true, or extract stl10_binary.tar.gz "
        f"(http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz) into {tmp_path}"]
    assert value_problems("stl10", STL10Args(split="validation"))[0].startswith(
        "dataset.args.split: must be one of unlabeled, train, test")
    assert download_pending("stl10", STL10Args(root=str(tmp_path))) and check_dataset_args(
        "stl10", STL10Args(root=str(tmp_path))) == []

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match=r"could not download STL-10 into .*copy the extracted 'stl10_binary'"
                       ) as error:
        build_dataset("stl10", STL10Args(root=str(tmp_path)))
    assert "\n" not in str(error.value)

    write_split(tmp_path, "train", random_images(3), np.array([0, 1, 2]))
    folder = tmp_path / "stl10_binary"
    (folder / "train_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DatasetError, match="train_y.bin: 2 labels for 3 images"):
        build_dataset("stl10", args)
    (folder / "train_y.bin").write_bytes(bytes([1, 11, 2]))
    with pytest.raises(DatasetError, match=r"labels 1..11; STL-10 numbers its classes 1..10"):
        build_dataset("stl10", args)
    (folder / "train_X.bin").write_bytes(bytes(27648 * 3 - 1))
    with pytest.raises(DatasetError, match="82943 bytes is not a whole number of STL-10 images"):
        build_dataset("stl10", args)


def test_48_px_models_are_the_32_px_ones_but_for_generators_first_map():
    """SRGANs' STL-10 D has CIFAR's 10 convs; G draws its first map at 6 x 6 instead of 4 x 4."""
    gen48 = ResNetGenerator(ch=4, bottom_width=6, resolution=48).state_dict()
    gen32 = ResNetGenerator(ch=4, bottom_width=4, resolution=32).state_dict()
    assert gen48.keys() == gen32.keys()
    assert [k for k in gen48 if gen48[k].shape != gen32[k].shape] == ["l1.weight", "l1.bias"]
    assert gen48["l1.weight"].shape == (36 * 4, 128)
    dis48 = SNResNetProjectionDiscriminator(ch=4, resolution=48, head_bias=False)
    dis32 = SNResNetProjectionDiscriminator(ch=4, resolution=32, head_bias=False)
    assert {k: v.shape for k, v in dis48.state_dict().items()} == {k: v.shape for k, v in dis32.state_dict().items()}
    assert dis48(torch.zeros(2, 3, 48, 48)).shape == (2,)


def test_the_stl10_config_trains_48_px_models_with_static_SR(tmp_path):
    root, out = tmp_path / "stl10", tmp_path / "run"
    write_standin(root)
    overrides = [f"dataset.args.root={root}", "dataset.args.download=false", "models.generator.args.ch=8",
                 "models.discriminator.args.ch=8", "batchsize=8", "gen_batchsize=16", "micro_batchsize=4",
                 "iteration=1", "num_workers=0", "snapshot_interval=1", "evaluation.metrics=[]"]
    argv = ["--config", str(CONFIGS / "stl10" / "sr_stl10.yaml"), "--out", str(out)] + [
        a for o in overrides for a in ("--set", o)]
    assert train.main(argv) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"iteration": 0, "event": "sr_start", "mode": "static"} in events
    snapshot = load_snapshot(out / "snapshots" / "snapshot_iter_1.pt")
    assert snapshot["gen"]["l1.weight"].shape == (36 * 8, 128)
    convs = [k for k, v in snapshot["dis"].items() if k.endswith("weight.original") and v.dim() == 4]
    assert len(convs) == 10
    for name in convs:  # static SR ran after the last D step: the top half of each spectrum at 1
        s = torch.linalg.svdvals(snapshot["dis"][name].double().flatten(1))
        torch.testing.assert_close(s[: len(s) // 2], torch.ones(len(s) // 2, dtype=torch.float64))


def test_dry_runs_say_what_the_stl10_config_would_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("source.datasets.stl10.download_stl10", lambda root: pytest.fail("a dry run downloaded"))
    settings = [f"dataset.args.root={tmp_path}", "batchsize=8", "gen_batchsize=16", "micro_batchsize=4",
                "models.generator.args.ch=4", "models.discriminator.args.ch=4", "iteration=1"]
    config = ["--config", str(CONFIGS / "stl10" / "sr_stl10.yaml")] + [a for s in settings for a in ("--set", s)]
    assert train.main(config + ["--dry-run"]) == 0
    assert f"stl10: not in {tmp_path} yet; the run downloads it there first" in capsys.readouterr().out
    write_standin(tmp_path)
    assert train.main(config + ["--dry-run"]) == 0
    assert "stl10: 12 images, 1 class, 48px" in capsys.readouterr().out
    conditional = config + ["--set", "models.generator.args.n_classes=10",
                            "--set", "models.discriminator.args.n_classes=10", "--out", str(tmp_path / "run")]
    assert train.main(conditional) == 2
    assert ("models.generator.args.n_classes: 10 but the dataset has 1 class; it has no labels: set the models' "
            "n_classes to 0 (unconditional)") in capsys.readouterr().err


def test_files_larger_than_the_release_or_not_plain_are_refused_before_reading(tmp_path, monkeypatch):
    """A sparse file of 100,001 images (2.8 GB, no block written) or a 300 GB labels file: one line, nothing
    allocated; a FIFO or folder where a file belongs is no missing file (a download would extract into it)."""
    monkeypatch.setattr("source.datasets.stl10.download_stl10", lambda root: pytest.fail("downloaded"))
    folder = tmp_path / "stl10_binary"
    write_split(tmp_path, "train", random_images(3), np.array([0, 1, 2]))
    os.truncate(folder / "train_y.bin", 300 * 2**30)
    with pytest.raises(DatasetError, match=r"train_y.bin: 322122547200 labels for 3 images"):
        build_dataset("stl10", STL10Args(root=str(tmp_path), split="train"))
    (folder / "unlabeled_X.bin").touch()
    os.truncate(folder / "unlabeled_X.bin", 100_001 * 27648)
    with pytest.raises(DatasetError, match="unlabeled_X.bin: 100001 images; the release's unlabeled split has 100000"):
        build_dataset("stl10", STL10Args(root=str(tmp_path)))
    os.remove(folder / "unlabeled_X.bin")
    os.mkfifo(folder / "unlabeled_X.bin")
    assert not download_pending("stl10", STL10Args(root=str(tmp_path)))
    assert check_dataset_args("stl10", STL10Args(root=str(tmp_path))) == [
        f"dataset.args.root: {folder / 'unlabeled_X.bin'} is there but is no regular file; STL-10's files are plain "
        f"files"]
    (folder / "test_X.bin").mkdir()
    with pytest.raises(DatasetError, match="test_X.bin is there but is no regular file"):
        build_dataset("stl10", STL10Args(root=str(tmp_path), split="test"))


def test_a_file_that_shrinks_while_it_is_read_is_a_one_line_error(tmp_path, monkeypatch):
    write_standin(tmp_path, count=3)
    monkeypatch.setattr("source.datasets.stl10.count_images", lambda path, split: 4)  # measured before it shrank
    with pytest.raises(DatasetError, match="unlabeled_X.bin: ends within image 3; read it again"):
        build_dataset("stl10", STL10Args(root=str(tmp_path), download=False))


def test_a_size_that_is_not_the_models_is_refused_before_any_image_is_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("source.datasets.stl10.read_resized", lambda *args: pytest.fail("read the images"))
    write_standin(tmp_path)
    argv = ["--config", str(CONFIGS / "stl10" / "sr_stl10.yaml"), "--dry-run", "--set", f"dataset.args.root={tmp_path}",
            "--set", "dataset.args.size=480"]
    assert train.main(argv) == 2
    assert ("dataset.args.size: 480 but the generator is built for 48 px; set dataset.args.size=48"
            in capsys.readouterr().err)


def test_another_configs_data_become_stl10_at_its_models_size_and_held_out_split():
    from source.config import load_config

    moved = load_config(CONFIGS / "gsr" / "lsun_lt_sngan.yaml", ["dataset.name=stl10", "dataset.args.split=train"])
    assert moved.evaluation.reference_split == "test"  # LSUN's eval
    assert moved.dataset.args.size == 64 and moved.dataset.args.long_tail.ratio == 100  # the models' 64 px
    chosen = load_config(CONFIGS / "cifar" / "sr_cifar10.yaml", ["dataset.name=stl10", "dataset.args.size=32"])
    assert (chosen.dataset.args.size, chosen.dataset.args.split, chosen.evaluation.reference_split) == (
        32, "unlabeled", None)
