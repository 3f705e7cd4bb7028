"""Nearest-class mode measures on constructed data (source/metrics/modes.py)."""
import numpy as np
import pytest

from source.metrics.modes import mean_pairwise_distance, mode_report, nearest_labels


def real_set(rng, per_class=30, n_classes=4):
    """Class c = a bright square at position c, plus noise: an easy 4-class data set."""
    images, labels = [], []
    for c in range(n_classes):
        base = np.full((1, 8, 8), -1.0)
        base[0, 2 * c:2 * c + 2, 2 * c:2 * c + 2] = 1.0
        images.append(base + 0.2 * rng.standard_normal((per_class, 1, 8, 8)))
        labels += [c] * per_class
    return np.concatenate(images).astype(np.float32), np.array(labels)


def test_nearest_labels_match_brute_force():
    rng = np.random.default_rng(0)
    real, labels = real_set(rng)
    samples = rng.standard_normal((17, 1, 8, 8)).astype(np.float32)
    brute = labels[((samples[:, None] - real[None]) ** 2).sum((2, 3, 4)).argmin(1)]
    np.testing.assert_array_equal(nearest_labels(samples, real, labels, chunk=5), brute)


def test_mean_pairwise_distance_known_value():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])  # distances 5, 0, 5
    assert np.isclose(mean_pairwise_distance(points), 10 / 3)


def test_real_data_scores_as_diverse_and_complete():
    rng = np.random.default_rng(1)
    real, labels = real_set(rng)
    held_out, held_labels = real_set(rng)
    report = mode_report(held_out, held_labels, real, labels)
    assert report.modes == 4 and report.label_agreement == 1.0
    assert np.isclose(report.entropy, np.log(4)) and 0.9 < report.diversity < 1.1


def test_collapsed_generator_is_caught():
    rng = np.random.default_rng(2)
    real, labels = real_set(rng)
    one_image = np.repeat(real[:1], 40, axis=0)  # every class produces the same class-0 image
    report = mode_report(one_image, np.repeat(np.arange(4), 10), real, labels)
    assert report.modes == 1 and report.entropy == 0 and report.diversity < 1e-5
    assert report.class_counts == (40, 0, 0, 0)
    assert np.isclose(report.label_agreement, 0.25)


def test_unconditional_samples_compare_with_the_whole_data_set():
    rng = np.random.default_rng(3)
    real, labels = real_set(rng)
    held_out, _ = real_set(rng)
    report = mode_report(held_out[rng.permutation(len(held_out))], None, real, labels)
    assert report.modes == 4 and np.isnan(report.label_agreement) and 0.9 < report.diversity < 1.1


def test_collapse_figure_cli_scores_every_generator_snapshot_once(tmp_path):
    import train
    from figures import collapse
    from source.training.runlog import read_jsonl
    from test_training import tiny_argv

    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 4, "spectra_interval=2", "evaluation.metrics=[]")) == 0
    out = collapse.main([str(run), "--per-class", "3", "--out", str(tmp_path / "collapse.png")])
    assert out.stat().st_size > 10_000
    records = read_jsonl(run / collapse.CACHE)
    assert [r["iteration"] for r in records] == [2, 4]
    assert all(sum(r["class_counts"]) == 3 * 3 and len(r["class_counts"]) == 3 for r in records)
    collapse.main([str(run), "--per-class", "3", "--out", str(tmp_path / "again.png")])
    assert len(read_jsonl(run / collapse.CACHE)) == 2, "cached measures are reused"
    history = collapse.mode_history(run, 2)  # another count: measured again, not the 3 per class read back
    assert [sum(r["class_counts"]) for r in history] == [3 * 2, 3 * 2] and len(read_jsonl(run / collapse.CACHE)) == 4
    assert [sum(r["class_counts"]) for r in collapse.mode_history(run, 3)] == [9, 9]


def test_per_class_counts_out_of_range_are_usage_errors(capsys):
    from figures import collapse

    for value in ("1", str(10**20)):  # 10^20: torch's overflow, after the run's snapshots were read
        with pytest.raises(SystemExit):
            collapse.main(["never-read-run", "--per-class", value])
        assert "argument --per-class: must be in [2, 10000] (diversity compares pairs" in capsys.readouterr().err
