"""Long-tail evaluation through evaluation.py: EMA preference, the balanced reference split and its cache
key, intra-FID per many/medium/few group, repeats as mean ± sample std, and the Evaluate extension's G.

Snapshots are written directly (a tiny G and its config); scores use a pixel-pooling stand-in for
Inception (exact and fast), one end-to-end test uses the real TF-Inception with the fid-helper weights.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation
import train
from source.config import load_config
from source.datasets import build_dataset, reference_args
from source.metrics import FID_HELPER, feature_statistics, frechet_distance
from source.metrics.generate import generated_features, sample_inputs
from source.metrics.groups import class_groups
from source.metrics.reference import dataset_reference_key, reference_cache_path, reference_data
from source.metrics.repeats import summarize
from source.models import build_model
from source.training.evaluate import load_generator
from test_evaluation import PixelBackbone
from test_training import CONFIGS, tiny_argv

CPU = torch.device("cpu")
# Synthetic gray data, 3 classes of 20 training images; ratio 4 keeps 20, 10, 5 of them.
DATA = ["dataset.name=synthetic", "dataset.args.count=60", "dataset.args.n_classes=3", "dataset.args.channels=1",
        "models.generator.args.n_classes=3", "models.discriminator.args.n_classes=3", "models.generator.args.ch=8",
        "models.discriminator.args.ch=8", "evaluation.batch_size=16"]
LONG_TAIL = ["dataset.args.long_tail.ratio=4", "evaluation.many_above=12", "evaluation.few_at_most=6"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pixels(monkeypatch):
    """evaluation.py scores with the pixel stand-in instead of Inception."""
    monkeypatch.setattr(evaluation, "load_backbone", lambda weights, device: (PixelBackbone(), None))


def config_of(tmp_path: Path, *extra: str):
    return load_config(CONFIGS / "demo.yaml", DATA + [f"evaluation.cache_dir={tmp_path / 'cache'}", *extra])


def random_generator(config, seed: int) -> torch.nn.Module:
    """A G whose classes differ (random conditional-BN embeddings) and whose weights depend on `seed`."""
    torch.manual_seed(seed)
    spec = config.models.generator
    gen = build_model(spec.name, spec.args)
    with torch.no_grad():
        for name, parameter in gen.named_parameters():
            if name.endswith(("gamma.weight", "beta.weight")):
                parameter.add_(torch.randn_like(parameter))
        gen(torch.randn(8, gen.dim_z), torch.arange(8) % gen.n_classes)  # SN vectors and BN statistics move
    return gen.eval()


def write_snapshot(tmp_path: Path, config, name: str = "snapshot_iter_5.pt", ema: bool = False,
                   export: bool = False) -> Path:
    raw = random_generator(config, seed=1).state_dict()
    average = random_generator(config, seed=2).state_dict()
    snapshot = {"iteration": 5, "config": config.to_dict(), "gen": average if export else raw}
    if ema and not export:
        snapshot["gen_ema"] = average
    if export:
        snapshot["gen_is_ema"] = True
    path = tmp_path / name
    torch.save(snapshot, path)
    return path


def run_json(argv: list[str], capsys) -> tuple[dict, str]:
    assert evaluation.main(argv + ["--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


# --- EMA ---------------------------------------------------------------------------------------


def test_the_ema_generator_is_preferred_and_named_in_the_protocol(tmp_path, pixels, capsys):
    config = config_of(tmp_path)
    path = write_snapshot(tmp_path, config, ema=True)
    ema, raw = load_generator(str(path), CPU), load_generator(str(path), CPU, raw=True)
    assert (ema.weights, raw.weights) == ("ema", "raw")
    expected = random_generator(config, seed=2).state_dict()
    assert all(torch.equal(ema.gen.state_dict()[k], v) for k, v in expected.items())
    assert any(not torch.equal(v, raw.gen.state_dict()[k]) for k, v in ema.gen.state_dict().items())

    base = ["metrics", "--snapshot", str(path), "--metrics", "fid", "--n-samples", "6"]
    record, out = run_json(base, capsys)
    assert record["protocol"]["generator"] == "ema" and "G: EMA weights" in out
    raw_record, out = run_json(base + ["--raw-generator"], capsys)
    assert raw_record["protocol"]["generator"] == "raw" and "G: raw weights" in out
    assert raw_record["FID"] != record["FID"]


def test_an_ema_export_is_scored_as_ema_and_refuses_raw(tmp_path, capsys):
    config = config_of(tmp_path)
    export = write_snapshot(tmp_path, config, name="generator_iter_5.pt", export=True)
    assert load_generator(str(export), CPU).weights == "ema"
    plain = write_snapshot(tmp_path, config, name="generator_iter_6.pt")
    assert load_generator(str(plain), CPU).weights == "raw"
    argv = ["samples", "--snapshot", str(export), "--n", "2", "--out", str(tmp_path / "png"), "--raw-generator"]
    assert evaluation.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds only G's EMA" in err and err.count("\n") == 1


def test_training_evaluates_the_ema_generator(tmp_path, monkeypatch):
    monkeypatch.setattr("source.training.evaluate.load_backbone", lambda weights, device: (PixelBackbone(), None))
    out = tmp_path / "run"
    argv = tiny_argv(out, 2, "updater.ema.enabled=true", "updater.ema.start_iteration=0", "evaluation_interval=2",
                     "evaluation.n_samples=6", "evaluation.metrics=[fid]", "evaluation.reference_images=8",
                     f"evaluation.cache_dir={tmp_path / 'cache'}")
    assert train.main(argv) == 0
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["protocol"]["generator"] == "ema" and record["protocol"]["reference_split"] is None


# --- the balanced reference split --------------------------------------------------------------


def test_reference_cache_keys_tell_long_tailed_training_data_from_the_balanced_split(tmp_path):
    plain = reference_data(config_of(tmp_path))
    long_tailed = reference_data(config_of(tmp_path, *LONG_TAIL))
    balanced = reference_data(config_of(tmp_path, *LONG_TAIL, "evaluation.reference_split=test"))
    assert balanced.split == "test" and len(balanced.dataset) == 60 and len(long_tailed.dataset) == 35
    keys = [dataset_reference_key(data, 30, per_class=False) for data in (plain, long_tailed, balanced)]
    assert "long_tail" not in keys[0]["extra"], "an inactive long tail leaves the key (and old caches) unchanged"
    assert keys[1]["extra"]["long_tail"]["ratio"] == 4 and "long_tail" not in keys[2]["extra"]
    assert [key["split"] for key in keys] == ["train", "train", "test"]
    paths = [reference_cache_path("cache", key) for key in keys]
    assert len(set(paths)) == 3 and Path(paths[1]).name == "synthetic_train_32px_30_lt4_tfinception.npz"
    assert Path(paths[2]).name == "synthetic_test_32px_30_tfinception.npz"


def test_metrics_against_the_balanced_split_name_it_and_match_its_statistics(tmp_path, pixels, capsys):
    config = config_of(tmp_path, *LONG_TAIL, "evaluation.reference_split=test")
    path = write_snapshot(tmp_path, config)
    record, out = run_json(["metrics", "--snapshot", str(path), "--metrics", "fid", "--n-samples", "9"], capsys)
    protocol = record["protocol"]
    assert protocol["reference_split"] == "test" and protocol["reference_key"]["split"] == "test"
    assert "synthetic test 32px, 60 images, the balanced reference split 'test'" in out
    test_split = build_dataset("synthetic", reference_args("synthetic", config.dataset.args, "test"))
    real = PixelBackbone().features(torch.stack([test_split[i][0] for i in range(60)])).pool3
    gen = load_generator(str(path), CPU).gen
    z, labels = sample_inputs(9, gen.dim_z, 3, config.seed)
    fake = generated_features(gen, PixelBackbone(), z, labels, 16, CPU).pool3
    assert record["FID"] == pytest.approx(frechet_distance(*feature_statistics(fake), *feature_statistics(real)))
    # the long-tailed training data would be another reference, in another file
    training, _ = run_json(["metrics", "--snapshot", str(path), "--metrics", "fid", "--n-samples", "9",
                            "--set", "evaluation.reference_split=null"], capsys)
    assert training["protocol"]["reference"] != protocol["reference"] and training["FID"] != record["FID"]


def test_a_split_the_data_set_lacks_is_a_one_line_error(tmp_path, capsys):
    path = write_snapshot(tmp_path, config_of(tmp_path))
    assert evaluation.main(["metrics", "--snapshot", str(path), "--set", "evaluation.reference_split=val"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.reference_split" in err and "no split 'val'" in err and err.count("\n") == 1


# --- groups ------------------------------------------------------------------------------------


def test_group_membership_follows_the_training_counts_and_thresholds():
    assert class_groups([5000, 101, 100, 41, 40, 1], 100, 40) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    with pytest.raises(ValueError, match="few_at_most"):
        class_groups([1, 2], 40, 40)


def test_group_fid_scores_each_group_against_its_real_images(tmp_path, pixels, capsys):
    config = config_of(tmp_path, *LONG_TAIL, "evaluation.reference_split=test")
    path = write_snapshot(tmp_path, config)
    record, out = run_json(["metrics", "--snapshot", str(path), "--metrics", "--intra-fid", "groups",
                            "--samples-per-class", "5"], capsys)
    protocol = record["protocol"]
    assert protocol["groups"] == {"many": [0], "medium": [1], "few": [2]}  # 20, 10, 5 training images
    assert protocol["intra_fid"] == "groups" and protocol["n_samples"] == 15 and "FID" not in record
    test_split = build_dataset("synthetic", reference_args("synthetic", config.dataset.args, "test"))
    gen = load_generator(str(path), CPU).gen
    for name, label in (("many", 0), ("medium", 1), ("few", 2)):
        real = torch.stack([test_split[i][0] for i in range(60) if test_split[i][1] == label])
        z, labels = sample_inputs(5, gen.dim_z, 3, config.seed, labels=torch.full((5,), label))
        fake = generated_features(gen, PixelBackbone(), z, labels, 16, CPU).pool3
        real_statistics = feature_statistics(PixelBackbone().features(real).pool3)
        expected = frechet_distance(*feature_statistics(fake), *real_statistics)
        assert record["group_FID"][name] == pytest.approx(expected, rel=1e-9)
    assert record["group_FID_mean"] == pytest.approx(np.mean(list(record["group_FID"].values())))
    assert "group FID many" in out and "(1 classes)" in out


def test_an_empty_group_is_skipped_with_a_note(tmp_path, pixels, capsys):
    config = config_of(tmp_path, *LONG_TAIL, "evaluation.many_above=8")  # 20 and 10 are many, 5 few
    path = write_snapshot(tmp_path, config)
    record, out = run_json(["metrics", "--snapshot", str(path), "--metrics", "fid", "--n-samples", "6",
                            "--intra-fid", "groups", "--samples-per-class", "4"], capsys)
    assert record["protocol"]["groups"] == {"many": [0, 1], "medium": [], "few": [2]}
    assert sorted(record["group_FID"]) == ["few", "many"] and "FID" in record
    assert "note: group 'medium' skipped: no class has 7..8 training images" in out
    assert "no medium classes" in out


# --- repeats -----------------------------------------------------------------------------------


def test_summarize_gives_means_and_sample_stds_of_nested_numbers():
    records = [{"FID": 1.0, "per_class": {"0": 2.0}, "name": "a"}, {"FID": 3.0, "per_class": {"0": 6.0}, "name": "b"}]
    summary = summarize(records, [7, 8])
    assert summary["FID"] == 2.0 and summary["per_class"] == {"0": 4.0} and summary["name"] == "a"
    assert summary["repeat_std"]["FID"] == pytest.approx(np.sqrt(2.0))  # sample std: ddof=1
    assert summary["repeat_std"]["per_class"] == {"0": pytest.approx(np.sqrt(8.0))}
    assert "name" not in summary["repeat_std"]
    assert [r["seed"] for r in summary["repeats"]] == [7, 8]
    assert summarize(records[:1], [7]) == records[0], "one repeat: today's record, unchanged"


def test_repeats_use_consecutive_seeds_and_report_mean_and_sample_std(tmp_path, pixels, capsys):
    path = write_snapshot(tmp_path, config_of(tmp_path))
    base = ["metrics", "--snapshot", str(path), "--metrics", "fid", "kid", "--n-samples", "6", "--seed", "10"]
    record, out = run_json(base + ["--repeats", "3", "--intra-fid", "--samples-per-class", "3"], capsys)
    assert [r["seed"] for r in record["repeats"]] == [10, 11, 12] and record["protocol"]["seeds"] == [10, 11, 12]
    singles = [run_json(base + ["--seed", str(seed), "--intra-fid", "--samples-per-class", "3"], capsys)[0]
               for seed in (10, 11, 12)]
    for name in ("FID", "KID", "intra_FID"):
        values = [single[name] for single in singles]
        assert [r[name] for r in record["repeats"]] == pytest.approx(values, rel=1e-12)
        assert record[name] == pytest.approx(np.mean(values))
        assert record["repeat_std"][name] == pytest.approx(np.std(values, ddof=1))
    per_class = [single["intra_FID_per_class"]["2"] for single in singles]
    assert record["intra_FID_per_class"]["2"] == pytest.approx(np.mean(per_class))
    assert record["protocol"]["repeat_std"].startswith("sample standard deviation")
    assert f"FID {record['FID']:.3f} ± {record['repeat_std']['FID']:.3f}" in out
    assert "mean ± sample std over 3 repeats (seeds 10..12)" in out


# --- end to end with the real TF-Inception -----------------------------------------------------


def test_group_fid_with_the_fid_helper_inception(tmp_path, capsys):
    config = config_of(tmp_path, "evaluation.reference_split=test", "dataset.args.count=4", "dataset.args.n_classes=2",
                       "models.generator.args.n_classes=2", "models.discriminator.args.n_classes=2",
                       f"evaluation.inception_weights={FID_HELPER}")
    path = write_snapshot(tmp_path, config)
    record, out = run_json(["metrics", "--snapshot", str(path), "--metrics", "--intra-fid", "groups",
                            "--samples-per-class", "2", "--repeats", "2"], capsys)
    assert record["protocol"]["weights"] == FID_HELPER and record["protocol"]["groups"]["few"] == [0, 1]
    assert np.isfinite(record["group_FID"]["few"]) and record["repeat_std"]["group_FID"]["few"] > 0
    assert len(record["repeats"]) == 2 and "group FID few" in out


@pytest.mark.parametrize("mode", ["classes", "groups"])
def test_intra_fid_of_an_unconditional_generator_is_refused_naming_intra_fid(tmp_path, mode):
    """A bare --intra-fid used to say "leave out --classes", which the user had not given."""
    from source.metrics.longtail import score_request

    with pytest.raises(ValueError, match=f"--intra-fid {mode}: this generator is unconditional"):
        score_request(config_of(tmp_path), 0, mode, None, 5)
