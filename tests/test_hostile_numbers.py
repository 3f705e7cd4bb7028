"""Files from someone else that hold NaN, infinite or impossible values are refused in one line, never scored
(a second hostile-input review: each of these printed a number before)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation
from source.metrics import to_uint8
from source.metrics.classifier import DEFAULT_WEIGHTS, ClassifierUnavailable, load_classifier
from source.metrics.fid import frechet_distance
from source.metrics.reference import ReferenceUnavailable, file_reference
from source.metrics.statistics import save_stats
from source.training import checkpoint
from source.training.evaluate import load_generator
from test_hardening import one_line_error
from test_training import tiny_argv

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mu, sigma, message", [
    (np.zeros(4), -1000 * np.eye(4), "not symmetric with variances >= 0"),  # printed FID -2047770.598
    (np.full(4, np.inf), np.eye(4), "NaN or infinite"),  # printed FID inf
    (np.zeros(4), np.full((4, 4), np.nan), "NaN or infinite"),
    (np.zeros(3), np.eye(4), r"are not \(D,\) and \(D, D\)"),
    (np.zeros(4), np.triu(np.ones((4, 4))), "not symmetric"),
])
def test_statistics_that_cannot_be_a_mean_and_covariance_are_refused(tmp_path, mu, sigma, message):
    path = str(tmp_path / "ref.npz")
    save_stats(path, mu, sigma, {})
    with pytest.raises(ReferenceUnavailable, match=message):
        file_reference(path)


def test_a_meta_count_that_is_not_a_count_is_refused(tmp_path):
    path = str(tmp_path / "ref.npz")
    save_stats(path, np.zeros(4), np.eye(4), {"n_images": [1, 2]})
    with pytest.raises(ReferenceUnavailable, match="n_images"):
        file_reference(path)


def test_a_distance_below_zero_beyond_rounding_is_an_error_not_an_fid():
    assert frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="not a mean and covariance"):
        frechet_distance(np.zeros(3), np.diag([1.0, 1.0, -50.0]), np.zeros(3), np.eye(3))


def test_nan_images_are_not_quantized_to_black_and_scored():
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 127, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))


def test_a_generator_with_nan_weights_is_refused_before_it_draws(tmp_path, capsys):
    run = tmp_path / "run"
    import train
    assert train.main(tiny_argv(run, 2, "evaluation.metrics=[]")) == 0
    export = run / "snapshots" / "generator_iter_2.pt"
    state = checkpoint.load_snapshot(export)
    name = next(key for key, value in state["gen"].items() if value.is_floating_point())
    state["gen"][name].fill_(float("nan"))
    torch.save(state, export)
    with pytest.raises(ValueError, match=f"hold NaN or infinite values \\({name}"):
        load_generator(str(export), torch.device("cpu"))
    assert evaluation.main(["metrics", "--snapshot", str(export), "--n-samples", "8", "--device", "cpu"]) == 2
    one_line_error(capsys, "hold NaN or infinite values")


def test_a_classifier_with_nan_weights_is_refused(tmp_path):
    state = torch.load(ROOT / DEFAULT_WEIGHTS, weights_only=True)
    bias = next(key for key in state if key.endswith("bias"))
    state[bias][0] = float("nan")  # class 0 read as 100 % accurate before
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ClassifierUnavailable, match=f"NaN or infinite values in {bias}"):
        load_classifier(tmp_path / "nan.pt")


def test_inception_weights_that_are_tensors_of_another_network_are_one_line(tmp_path, capsys):
    import train
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 2, "evaluation.metrics=[]")) == 0
    argv = ["metrics", "--snapshot", str(run / "snapshots" / "generator_iter_2.pt"), "--n-samples", "8",
            "--device", "cpu", "--metrics", "fid", "--inception-weights", str(ROOT / DEFAULT_WEIGHTS)]  # tensors
    assert evaluation.main(argv) == 2
    one_line_error(capsys, "does not hold the Inception network's weights")
