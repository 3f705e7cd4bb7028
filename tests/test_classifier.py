"""The committed Fashion-MNIST classifier and its measures of a generator (source/metrics/classifier.py)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evaluation
from source.config import load_config
from source.datasets import FashionMNISTArgs, build_dataset
from source.metrics.classifier import (DEFAULT_WEIGHTS, ClassifierUnavailable, class_report, classify,
                                       load_classifier, mean_pairwise_distance, record_path, sha256)
from source.models import build_model
from test_training import CONFIGS, FASHION_MNIST

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / DEFAULT_WEIGHTS
TOLERANCE = 0.005  # the recorded accuracy was measured on the same 10000 images; only float noise may differ
needs_data = pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(WEIGHTS)


@pytest.fixture(scope="module")
def test_split():
    dataset = build_dataset("fashion_mnist", FashionMNISTArgs(split="test", dequantize=False))
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in items]), np.array([label for _, label in items])


def test_the_committed_weights_are_small_plain_and_recorded():
    record = json.loads(record_path(WEIGHTS).read_text())
    assert WEIGHTS.stat().st_size <= 3 * 2**20 and record["sha256"] == sha256(WEIGHTS)
    state = torch.load(WEIGHTS, weights_only=True)
    assert all(torch.is_tensor(value) for value in state.values())
    assert {"test_accuracy", "test_accuracy_per_class", "command", "seed", "epochs"} <= record.keys()
    assert record["command"].startswith("python -m source.metrics.classifier train")
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) < 500_000


@needs_data
def test_accuracy_on_the_real_test_split_is_the_recorded_one(classifier, test_split):
    model, record = classifier
    images, labels = test_split
    predicted = np.concatenate([classify(model, images[i:i + 2000])[1] for i in range(0, len(images), 2000)])
    accuracy = float(np.mean(predicted == labels))
    assert accuracy >= record["test_accuracy"] - TOLERANCE and record["test_accuracy"] >= 0.9


def test_damaged_or_replaced_weights_are_refused_in_one_line(tmp_path):
    copy = tmp_path / "fashion_mnist.pt"
    copy.write_bytes(WEIGHTS.read_bytes())
    record_path(copy).write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ClassifierUnavailable, match="does not match the sha256"):
        load_classifier(copy)
    with pytest.raises(ClassifierUnavailable, match="do not exist"):
        load_classifier(tmp_path / "missing.pt")
    with pytest.raises(ClassifierUnavailable, match=f"classifier weights {tmp_path}: a folder; name the weights file"):
        load_classifier(tmp_path)  # it said "do not exist"
    for record, message in (("[]", "not a classifier's record"), ("[" * 100000, "not a readable record")):
        record_path(copy).write_text(record)
        with pytest.raises(ClassifierUnavailable, match=message):
            load_classifier(copy)
    # no record: garbage, or a pickle of Python objects; the message never passes on torch's advice to load such a
    # file with weights_only=False (which would run its code)
    record_path(copy).unlink()
    torch.save({"weight": Path("x")}, tmp_path / "objects.pt")
    for content, message in ((b"garbage", "not a file written by torch.save"),
                             ((tmp_path / "objects.pt").read_bytes(), r"pickled Python objects \(pathlib")):
        copy.write_bytes(content)
        with pytest.raises(ClassifierUnavailable, match=message) as refused:
            load_classifier(copy)
        assert "weights_only" not in str(refused.value)


def test_weights_of_another_layout_are_named_and_huge_files_are_not_read(tmp_path):
    state = torch.load(WEIGHTS, weights_only=True)
    first = next(iter(state))
    copy = tmp_path / "c.pt"
    for changed, message in [({**state, first: state[first][:1]}, f"another shape (first: {first} is"),
                             ({**state, "extra": torch.zeros(1)}, "1 unexpected (first: extra)"),
                             ({**state, first: 3}, f"its entry '{first}' is a int, not a tensor"),
                             ([1, 2], "it holds a list, not a state dict")]:
        torch.save(changed, copy)
        with pytest.raises(ClassifierUnavailable, match=re.escape(message)):
            load_classifier(copy)
    with open(copy, "wb") as file:  # sparse: a 20 GB file costs nothing on disk; read or hashed, it would
        file.truncate(20 * 2**30)
    record_path(copy).write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ClassifierUnavailable, match="more than a SmallClassifier's weights ever holds"):
        load_classifier(copy)


class Replay(nn.Module):
    """A 'generator' that returns real images of the asked class (z picks which), or always the first one."""

    dim_z = 4

    def __init__(self, images: torch.Tensor, labels: np.ndarray, collapsed: bool = False):
        super().__init__()
        self.n_classes = 10
        self.by_class = [images[torch.from_numpy(labels == c)] for c in range(10)]
        self.collapsed = collapsed
        self.anchor = nn.Parameter(torch.zeros(1))  # a device for generate_uint8's callers

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        picks = torch.zeros(len(z), dtype=torch.long) if self.collapsed else (z[:, 0].abs() * 1e4).long()
        images = torch.stack([self.by_class[c][p % len(self.by_class[c])] for c, p in zip(y.tolist(), picks)])
        return (images.float() + 0.5) / 127.5 - 1  # to_uint8 truncates back to exactly these values


@needs_data
def test_real_images_score_as_accurate_and_as_diverse_as_the_data_and_a_collapsed_g_as_0(classifier, test_split):
    model, record = classifier
    images, labels = test_split[0][:2000], test_split[1][:2000]  # about 200 of each class
    real = torch.utils.data.TensorDataset(images, torch.from_numpy(labels))
    report = class_report(Replay(images, labels), model, real, samples_per_class=100, seed=0, repeats=2,
                          train_counts=[6000] * 5 + [80] * 3 + [20] * 2, kid_subsets=10)
    assert report["accuracy"] == pytest.approx(record["test_accuracy"], abs=0.05)
    assert report["diversity"] == pytest.approx(1.0, abs=0.1) and report["classifier_FID"] < 5
    assert report["group_classes"] == {"many": [0, 1, 2, 3, 4], "medium": [5, 6, 7], "few": [8, 9]}
    assert set(report["groups"]) == {"many", "medium", "few"} and len(report["repeats"]) == 2
    collapsed = class_report(Replay(images, labels, collapsed=True), model, real, samples_per_class=20, kid_subsets=10)
    assert collapsed["diversity"] == 0.0 and collapsed["classifier_FID"] > 10 * report["classifier_FID"]
    assert "repeats" not in collapsed and collapsed["group_classes"] == {}


def test_mean_pairwise_distance_is_over_distinct_pairs():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(points, chunk=2) == pytest.approx((5 + 5 + 0) * 2 / 6)


def write_snapshot(path: Path, *overrides: str) -> Path:
    config = load_config(CONFIGS / "demo.yaml", ["models.generator.args.ch=8", *overrides])
    torch.manual_seed(0)
    gen = build_model(config.models.generator.name, config.models.generator.args)
    torch.save({"iteration": 3, "config": config.to_dict(), "gen": gen.state_dict()}, path)
    return path


@needs_data
def test_classes_cli_prints_a_per_class_table_and_a_json_record(tmp_path, capsys):
    snapshot = write_snapshot(tmp_path / "snapshot_iter_3.pt", "dataset.args.long_tail.ratio=100")
    argv = ["classes", "--snapshot", str(snapshot), "--samples-per-class", "3", "--repeats", "2", "--device", "cpu",
            "--json"]
    assert evaluation.main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["train_counts"][0] == 6000 and record["train_counts"][9] == 60
    assert record["group_classes"] == {"many": [0, 1, 2, 3, 4, 5, 6, 7], "medium": [8, 9], "few": []}  # 99, 60
    assert record["protocol"]["real"] == "the balanced fashion_mnist test split"
    assert record["protocol"]["real_images"] == 10000
    assert record["protocol"]["generator"] == "raw" and record["protocol"]["seeds"] == [0, 1]
    assert 0 <= record["accuracy"] <= 1 and record["diversity"] > 0 and "repeat_std" in record
    assert "accuracy" in out and "few" in out and "(no class in this group)" in out and "classifier FID" in out


def test_classes_cli_refuses_data_the_classifier_cannot_read(tmp_path, capsys):
    snapshot = write_snapshot(tmp_path / "snapshot_iter_3.pt", "dataset.name=synthetic", "dataset.args.n_classes=3",
                              "models.generator.args.n_classes=3", "models.discriminator.args.n_classes=3")
    assert evaluation.main(["classes", "--snapshot", str(snapshot), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the classifier reads 10 classes of 1x32x32 images" in err and err.count("\n") == 1


def test_training_cli_writes_loadable_recorded_weights_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    from source.metrics.classifier import main
    from test_datasets import write_fashion_standin

    root = tmp_path / "fashion"
    write_fashion_standin(root, "train", count=40)
    write_fashion_standin(root, "t10k", count=20)
    out = tmp_path / "weights" / "small.pt"  # its folder made
    argv = ["train", "--root", str(root), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--shift", "2"]
    assert main(argv) == 0
    model, record = load_classifier(out)
    assert record["sha256"] == sha256(out) and record["epochs"] == 2 and record["test_images"] == 20
    assert 0 <= record["test_accuracy"] <= 1 and len(record["test_accuracy_per_class"]) == 10
    features, predicted = classify(model, torch.zeros(3, 1, 32, 32, dtype=torch.uint8))
    assert features.shape == (3, 128) and predicted.shape == (3,)
    for bad, message in ((["--batch-size", "0"], "argument --batch-size: must be in [1, 10000]"),  # ZeroDivisionError
                         (["--epochs", "-1"], "argument --epochs: must be in [1, 1000]"),  # a scheduler's ValueError
                         (["--lr", "nan"], "argument --lr: must be a number in (0, 10.0]"),
                         (["--shift", "-1"], "argument --shift: must be in [0, 16]"),  # torch's random_ error
                         (["--seed", str(2**70)], "argument --seed: must be in [0, 2^32)")):  # torch's overflow
        with pytest.raises(SystemExit):
            main(argv + bad)
        assert message in capsys.readouterr().err
    for args, message in ((["--root", str(tmp_path / "none"), "--out", str(out)], "Fashion-MNIST files"),
                          (["--root", str(root), "--out", str(tmp_path)], "is a folder; name the weights file")):
        assert main(["train", *args]) == 2  # a traceback; the folder one after the whole training
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
