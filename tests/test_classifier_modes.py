"""The collapse study's classifier measures: the pure function, and the Modes extension through train.py."""
import json
import re

import numpy as np
import pytest

import train
from source.metrics.classifier_modes import RealReference, mode_measures
from test_training import CONFIGS, FASHION_MNIST

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def clusters(n_per_class: np.ndarray, spread: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features around 10 well-separated class centres, n_per_class[c] of class c."""
    labels = np.repeat(np.arange(10), n_per_class)
    centres = np.eye(10, 16) * 100
    return centres[labels] + spread * rng.standard_normal((len(labels), 16)), labels


def reference(rng) -> RealReference:
    features, labels = clusters(np.full(10, 200), 1.0, rng)
    from source.metrics.classifier import mean_pairwise_distance
    return RealReference(features, labels, {c: mean_pairwise_distance(features[labels == c]) for c in range(10)})


def test_data_like_samples_cover_every_mode_and_a_collapsed_generator_one():
    rng = np.random.default_rng(0)
    real = reference(rng)
    features, labels = clusters(np.full(10, 100), 1.0, rng)
    healthy = mode_measures(features, labels, real, kid_subsets=5)
    assert healthy["modes"] == 10 and healthy["entropy"] == pytest.approx(np.log(10))
    assert healthy["diversity"] == pytest.approx(1.0, abs=0.05) and healthy["classifier_FID"] < 1
    assert healthy["class_counts"] == [100] * 10 and "accuracy" not in healthy
    # nine classes dropped, the last one drawn as (almost) one image
    collapsed = mode_measures(np.tile(features[-1:], (1000, 1)) + 1e-3, np.full(1000, 9), real, kid_subsets=5)
    assert collapsed["modes"] == 1 and collapsed["entropy"] == 0 and collapsed["diversity"] < 0.01
    assert collapsed["classifier_FID"] > 1000 * healthy["classifier_FID"]


def test_modes_count_classes_above_the_share_and_diversity_weights_groups_by_size():
    rng = np.random.default_rng(1)
    real = reference(rng)
    counts = np.array([500, 480, 19, 1, 0, 0, 0, 0, 0, 0])  # 19 of 1000 is under 2 %, 1 sample has no pairs
    features, labels = clusters(counts, 1.0, rng)
    features[labels == 1] = features[labels == 1][:1]  # class 1 collapsed onto one image
    record = mode_measures(features, labels, real, kid_subsets=5)
    assert record["modes"] == 2 and record["class_counts"][:4] == [500, 480, 19, 1]
    assert record["diversity"] == pytest.approx((500 * 1 + 480 * 0 + 19 * 1) / 999, abs=0.05)
    # conditional: groups are the classes asked for, and accuracy is reported
    requested = labels.copy()
    requested[:250] = 5  # half of class 0's samples were asked as class 5
    record = mode_measures(features, labels, real, requested=requested, kid_subsets=5)
    assert record["accuracy"] == pytest.approx(750 / 1000)


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST is not installed")
def test_training_writes_the_measures_every_interval(tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["models.generator.args.ch=8", "models.discriminator.args.ch=8", "batchsize=8", "micro_batchsize=8",
            "num_workers=0", "evaluation.metrics=[]", "evaluation.modes_interval=2", "evaluation.modes_samples=40",
            "snapshot_interval=2", "spectra_interval=100", "preview_interval=100", "iteration=4"]
    argv = ["--config", str(CONFIGS / "demo.yaml"), "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert train.main(argv) == 0
    records = [json.loads(line) for line in (out / "classifier_modes.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    first = records[0]
    assert sum(first["class_counts"]) == 40 and 1 <= first["modes"] <= 10 and 0 <= first["accuracy"] <= 1
    assert first["protocol"]["real"] == "the balanced fashion_mnist test split"
    assert first["protocol"]["real_images"] == 10000 and first["protocol"]["samples"] == 40
    # one console line per measurement, with its time (the first one's includes loading the classifier and data)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("modes at iteration")]
    assert [line.split(" (")[0] for line in lines] == ["modes at iteration 2", "modes at iteration 4"]
    assert all(re.search(rf"\([0-9]+\.[0-9] s\): {r['modes']} modes, ", line) for line, r in zip(lines, records))
