"""Evaluation: generation, sharding, reference cache, protocol records, the Evaluate extension and evaluation.py.

Most tests use a pixel-pooling stand-in for Inception (cheap, and it shows exactly which images
arrived); the end-to-end tests run the real TF-Inception on a handful of images with the offline
fid-helper weights.
"""
import contextlib
import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import evaluation
import train
from source import provenance
from source.config import ConfigError, EvaluationConfig, load_config
from source.datasets import build_dataset
from source.metrics import (
    FID_HELPER,
    InceptionFeatures,
    ReferenceStats,
    StatsMismatch,
    feature_statistics,
    inception,
)
from figures.grids import tile
from source.metrics.describe import describe
from source.metrics.generate import generated_features, sample_inputs, shard_bounds
from source.metrics.reference import (
    SUBSET_SEED,
    Reference,
    ReferenceUnavailable,
    dataset_reference,
    features_path,
    reference_data,
    require_reference_before_distributed_training,
)
from source.metrics.scoring import intra_fid_score, load_backbone, protocol_record
from source.models import build_model
from source.training.checkpoint import load_snapshot
from source.training.distributed import World
from source.training.evaluate import check_settings, gather_features, load_generator, weights_disagreement
from test_training import CONFIGS, _ddp_worker, _free_port, end_finished_rank, tiny_argv

CPU = torch.device("cpu")


class PixelBackbone:
    """Stand-in for Inception: 4x4 average-pooled pixels as the 'pool3' features."""

    has_logits = False
    weights = "pixels"

    def features(self, images: torch.Tensor) -> InceptionFeatures:
        assert images.dtype == torch.uint8, "the backbone must receive quantized images"
        return InceptionFeatures(F.adaptive_avg_pool2d(images.float(), 4).flatten(1).double().numpy(), None)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_generator(n_classes: int = 3) -> torch.nn.Module:
    """A small G whose classes differ (initial conditional-BN embeddings are the same for every class)."""
    torch.manual_seed(0)
    gen = build_model("ResNetGenerator", dict(dim_z=8, ch=8, n_classes=n_classes, resolution=32, channels=1,
                                              spectral_norm=True))
    with torch.no_grad():
        for name, parameter in gen.named_parameters():
            if name.endswith(("gamma.weight", "beta.weight")):
                parameter.add_(torch.randn_like(parameter))
        gen(torch.randn(16, 8), torch.randint(n_classes, (16,)))  # moves BN statistics and SN vectors from init
    return gen


def tiny_config(tmp_path: Path, *extra: str):
    overrides = ["dataset.name=synthetic", "dataset.args.count=40", "dataset.args.n_classes=3",
                 "dataset.args.dequantize=true", "models.generator.args.n_classes=3",
                 "models.discriminator.args.n_classes=3", f"evaluation.cache_dir={tmp_path / 'cache'}",
                 "evaluation.batch_size=7", *extra]
    return load_config(CONFIGS / "demo.yaml", overrides)


# --- generation and sharding -------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 10, 5000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_the_evaluation_set_in_rank_order(n, world_size):
    bounds = [shard_bounds(n, rank, world_size) for rank in range(world_size)]
    assert [i for start, end in bounds for i in range(start, end)] == list(range(n))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_generation_runs_G_in_eval_mode_and_leaves_it_unchanged():
    gen = tiny_generator().train()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    rng = torch.get_rng_state()
    z, labels = sample_inputs(10, 8, 3, seed=5)
    features = generated_features(gen, PixelBackbone(), z, labels, batch_size=4, device=CPU)
    assert torch.equal(torch.get_rng_state(), rng), "evaluation must not move the training's global RNG"
    assert gen.training, "the training mode must be restored"
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items()), "BN statistics / SN u changed"
    with torch.no_grad():
        eval_images = (gen.eval()(z, labels) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
        train_images = (gen.train()(z, labels) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    np.testing.assert_allclose(features.pool3, PixelBackbone().features(eval_images).pool3, rtol=1e-12)
    assert not np.allclose(features.pool3, PixelBackbone().features(train_images).pool3)


def test_sample_inputs_are_seeded_uniform_labels_or_the_given_ones():
    z, labels = sample_inputs(3000, 4, 10, seed=1)
    z2, labels2 = sample_inputs(3000, 4, 10, seed=1)
    assert torch.equal(z, z2) and torch.equal(labels, labels2)
    assert abs(z.std().item() - 1) < 0.05 and np.bincount(labels.numpy(), minlength=10).min() > 240
    assert sample_inputs(3, 4, 0, seed=1)[1] is None
    assert sample_inputs(3, 4, 10, seed=1, labels=torch.tensor([7, 7, 7]))[1].tolist() == [7, 7, 7]


def _gather_worker(rank: int, world_size: int, port: int, n: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    world = World(rank=rank, local_rank=rank, size=world_size, device=CPU)
    gen = tiny_generator()
    z, labels = sample_inputs(n, 8, 3, seed=3)
    start, end = shard_bounds(n, rank, world_size)
    local = generated_features(gen, PixelBackbone(), z[start:end], labels[start:end], 2, CPU)
    gathered = gather_features(local, world)
    if world.is_main:
        np.save(out, gathered.pool3)
    else:
        assert gathered is None
    dist.barrier()  # as train.py's ranks: none tears gloo down while another is still in a collective
    dist.destroy_process_group()
    end_finished_rank()


def test_features_gathered_over_two_gloo_ranks_equal_the_single_process_set(tmp_path):
    n, out = 7, tmp_path / "gathered.npy"
    mp.spawn(_gather_worker, args=(2, _free_port(), n, str(out)), nprocs=2, join=True)
    z, labels = sample_inputs(n, 8, 3, seed=3)
    # in the ranks' batches (rank 0: 2 + 2, rank 1: 2 + 1): other batches round G's output differently, and a pixel
    # on a quantisation boundary would then differ
    single = generated_features(tiny_generator(), PixelBackbone(), z, labels, 2, CPU)
    np.testing.assert_allclose(np.load(out), single.pool3, rtol=1e-5)


# --- reference statistics ----------------------------------------------------------------------


def test_dataset_reference_uses_uint8_images_without_noise_and_is_cached(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    dataset = build_dataset(config.dataset.name, config.dataset.args)
    assert dataset.dequantize, "the training data are dequantized; the reference must not be"
    rng = torch.get_rng_state()
    reference = dataset_reference(config, reference_data(config, dataset), PixelBackbone(), n_images=12)
    assert torch.equal(torch.get_rng_state(), rng), "computing a reference must not move the global RNG"
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))[:12]
    images = torch.stack([dataset[int(i)][0] for i in chosen])
    expected = PixelBackbone().features(images).pool3
    np.testing.assert_allclose(reference.stats.mu, expected.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(reference.stats.sigma, np.cov(expected, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(reference.features, expected, rtol=1e-6)
    assert Path(reference.path) == tmp_path / "cache" / "synthetic_train_32px_12_tfinception.npz"
    assert reference.key["extra"]["n_classes"] == 3 and reference.key["n_images"] == 12

    monkeypatch.setattr("source.metrics.reference.compute_dataset_reference", pytest.fail)
    cached = dataset_reference(config, reference_data(config, dataset), PixelBackbone(), n_images=12)
    np.testing.assert_array_equal(cached.stats.sigma, reference.stats.sigma)
    np.testing.assert_array_equal(cached.features, reference.features)
    monkeypatch.undo()
    Path(features_path(reference.path)).unlink()  # statistics without their features: KID would be lost
    again = dataset_reference(config, reference_data(config, dataset), PixelBackbone(), n_images=12)
    np.testing.assert_array_equal(again.features, reference.features)
    assert Path(features_path(reference.path)).is_file()


def _dry_run_rank(rank: int, world_size: int, port: int, argv: list[str], printed: str) -> None:
    with open(f"{printed}.{rank}", "w") as out, contextlib.redirect_stdout(out):
        _ddp_worker(rank, world_size, port, argv)


def test_a_torchrun_dry_run_says_the_reference_is_to_be_computed_first(tmp_path):
    """The README's step 1 dry-ran under torchrun without a word of the reference that the run then asked for."""
    settings = ["evaluation.reference_images=8", f"evaluation.cache_dir={tmp_path / 'cache'}",
                "evaluation.metrics=[fid]",
                "evaluation.inception_weights=fid-helper", "evaluation.n_samples=8", "evaluation.batch_size=8",
                "evaluation_interval=1"]
    argv = tiny_argv(tmp_path / "run", 2, *settings) + ["--dry-run"]
    printed = tmp_path / "printed"

    def dry_run_on_two_ranks() -> str:
        mp.spawn(_dry_run_rank, args=(2, _free_port(), argv, str(printed)), nprocs=2, join=True)
        assert printed.with_suffix(".1").read_text() == ""  # rank 0 alone speaks
        return printed.with_suffix(".0").read_text()

    summary = dry_run_on_two_ranks()
    assert "reference  NOT AVAILABLE: evaluation: the reference " in summary
    assert "with torchrun compute them first: `python evaluation.py ref-stats --config CONFIG`" in summary
    assert "data  synthetic: 64 images" in summary
    ref_stats = ["ref-stats", "--config", str(CONFIGS / "demo.yaml")] + [
        a for item in [s for s in argv if "=" in s and not s.startswith("iteration=")] for a in ("--set", item)]
    assert evaluation.main(ref_stats) == 0
    assert not any(line.split()[0] == "reference" for line in dry_run_on_two_ranks().splitlines())  # computed now


def test_a_torchrun_dry_run_reports_a_reference_split_it_cannot_read(tmp_path):
    """The reference check read the split's images, and its DatasetError ended the dry run (exit 2) on 2 ranks."""
    from test_own_images import write_images

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_images(tmp_path / "train" / name, 4, rng)
    write_images(tmp_path / "val", 2, rng)  # loose images: not a readable split
    settings = ["dataset.name=imagenet", f"dataset.args.root={tmp_path / 'train'}", f"dataset.args.val_root="
                f"{tmp_path / 'val'}", "evaluation.reference_split=val", "dataset.args.long_tail.ratio=1",
                "models.generator.args.n_classes=2", "models.discriminator.args.n_classes=2",
                "models.generator.args.channels=3", "models.discriminator.args.channels=3", "evaluation_interval=1"]
    argv = tiny_argv(tmp_path / "run", 2, *settings) + ["--dry-run"]
    printed = tmp_path / "printed"
    mp.spawn(_dry_run_rank, args=(2, _free_port(), argv, str(printed)), nprocs=2, join=True)  # both ranks exit 0
    summary = printed.with_suffix(".0").read_text()
    assert "data  imagenet: 8 images, 2 classes" in summary
    assert f"reference  NOT AVAILABLE: dataset.args.val_root: the images lie in {tmp_path / 'val'} itself" in summary


def test_torchrun_training_requires_the_reference_to_be_computed_first(tmp_path):
    config = tiny_config(tmp_path)
    dataset = build_dataset(config.dataset.name, config.dataset.args)
    require_reference_before_distributed_training(config, dataset, world_size=1)  # computed at the first evaluation
    with pytest.raises(ConfigError, match="python evaluation.py ref-stats --config CONFIG"):
        require_reference_before_distributed_training(config, dataset, world_size=2)
    with pytest.raises(ReferenceUnavailable, match="is not cached at .*; compute it first"):  # what ranks meet
        dataset_reference(config, reference_data(config, dataset), PixelBackbone(), config.evaluation.reference_images,
                          compute=False)
    reference = dataset_reference(config, reference_data(config, dataset), PixelBackbone(),
                                  config.evaluation.reference_images)
    require_reference_before_distributed_training(config, dataset, world_size=2)
    Path(features_path(reference.path)).unlink()  # rank 0 would compute the whole reference again for KID's features
    with pytest.raises(ConfigError, match=f"the reference {features_path(reference.path)} do not exist yet"):
        require_reference_before_distributed_training(config, dataset, world_size=2)
    with pytest.raises(ReferenceUnavailable, match="again: its features file"):
        dataset_reference(config, reference_data(config, dataset), PixelBackbone(), config.evaluation.reference_images,
                          compute=False)


def test_a_cached_reference_of_another_setup_is_refused_with_the_differing_fields(tmp_path):
    config = tiny_config(tmp_path)
    dataset_reference(config, reference_data(config), PixelBackbone(), 8)
    other = tiny_config(tmp_path, "dataset.args.n_classes=4", "models.generator.args.n_classes=4",
                        "models.discriminator.args.n_classes=4")
    with pytest.raises(StatsMismatch) as error:
        dataset_reference(other, reference_data(other), PixelBackbone(), 8)
    message = str(error.value)
    assert "extra.n_classes: cached 3, expected 4" in message and "\n" not in message


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(), reason="make data")
def test_a_standard_data_sets_files_moved_elsewhere_keep_its_cached_reference(tmp_path, monkeypatch):
    """Fashion-MNIST's root says where its files lie, not what they hold: a run moved to a machine that keeps them
    elsewhere (it continues in place, tests/test_training.py) finds its reference, also one cached when the key
    still named the root, instead of a mismatch that would end its evaluations."""
    from source.metrics import reference

    moved = tmp_path / "moved"
    moved.mkdir()
    for path in FASHION_MNIST.iterdir():
        (moved / path.name).symlink_to(path)
    here, there = (load_config(CONFIGS / "demo.yaml", [f"evaluation.cache_dir={tmp_path / 'cache'}", *root])
                   for root in ([], [f"dataset.args.root={moved}"]))
    with monkeypatch.context() as before:
        before.setattr(reference, "LOCATION", ())  # the key as this version's predecessors wrote it
        written = dataset_reference(here, reference_data(here), PixelBackbone(), 8)
    assert written.key["extra"]["root"] == str(FASHION_MNIST)
    found = dataset_reference(there, reference_data(there), PixelBackbone(), 8)
    assert found.path == written.path and np.array_equal(found.stats.mu, written.stats.mu)
    assert "root" not in found.key["extra"]


def test_intra_fid_is_zero_against_the_generators_own_class_statistics():
    gen, backbone = tiny_generator(), PixelBackbone()

    def class_statistics(label: int):
        z, labels = sample_inputs(6, 8, 3, seed=2, labels=torch.full((6,), label))
        return feature_statistics(generated_features(gen, backbone, z, labels, 4, CPU).pool3)

    own = {label: class_statistics(label) for label in range(3)}
    reference = Reference("own", {}, _stats_with_classes(own), None)
    value, per_class = intra_fid_score(gen, backbone, reference, [0, 1, 2], 6, 4, CPU, seed=2)
    assert set(per_class) == {0, 1, 2} and abs(value) < 1e-6
    swapped = Reference("swapped", {}, _stats_with_classes({0: own[1], 1: own[2], 2: own[0]}), None)
    assert intra_fid_score(gen, backbone, swapped, [0, 1, 2], 6, 4, CPU, seed=2)[0] > 1.0


def _stats_with_classes(per_class: dict) -> ReferenceStats:
    mu, sigma = per_class[0]
    return ReferenceStats(mu, sigma, 0, per_class)


# --- weights, settings, protocol ---------------------------------------------------------------


def test_offline_backbone_falls_back_to_the_fid_helper_copy_and_says_so(tmp_path, monkeypatch):
    def offline(url, destination):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(inception, "_download_weights", offline)
    rng = torch.get_rng_state()
    backbone, note = load_backbone(None, CPU)
    assert torch.equal(torch.get_rng_state(), rng), "loading must not move the training's global RNG"
    assert backbone.weights == FID_HELPER and not backbone.has_logits
    assert "download failed" in note and "no IS" in note and "\n" not in note


@pytest.mark.parametrize("change, key", [
    ({"metrics": ["fid", "inception"]}, "evaluation.metrics"),
    ({"n_samples": 1}, "evaluation.n_samples"),
    ({"splits": 11, "n_samples": 10}, "evaluation.splits"),
    ({"inception_weights": "/nonexistent/weights.pth"}, "evaluation.inception_weights"),
    ({"reference_stats": "/nonexistent/stats.npz"}, "evaluation.reference_stats"),
])
def test_impossible_settings_are_rejected_before_training(change, key):
    with pytest.raises(ConfigError, match=key):
        check_settings(EvaluationConfig(**change), world_size=1)


def test_n_samples_must_give_every_rank_a_sample():
    check_settings(EvaluationConfig(n_samples=4), world_size=4)
    with pytest.raises(ConfigError, match="one per rank"):
        check_settings(EvaluationConfig(n_samples=3), world_size=4)


def test_printed_scores_state_their_protocol_and_comparability():
    key = {"dataset": "imagenet", "split": "all", "resolution": 128, "n_images": 1281167}
    reference = Reference("ref.npz", key, None, np.zeros((20000, 2048)))
    small = protocol_record(PixelBackbone(), ["is", "fid", "kid"], 5000, 1, reference)
    line = describe({"IS": 20.0, "IS_std": 0.0, "FID": 71.0, "KID": 0.05, "KID_std": 0.01, "protocol": small})
    assert "IS 20.000 over 1 split (no spread)" in line and "FID 71.000" in line
    assert "KID 0.05000 ± 0.01000 (100 subsets of 1000; reference features of 20000 of its 1281167 images)" in line
    assert "N=5000 generated vs imagenet all 128px, 1281167 images (ref.npz)" in line and "weights pixels" in line
    assert "not comparable" in line and "N=5000 < 50000" in line and "IS over 1 split(s)" in line
    # subsets clipped to the generated set hold all of it in each: their spread is the reference draw's alone
    clipped = protocol_record(PixelBackbone(), ["kid"], 250, 1, Reference("ref.npz", key, None, np.zeros((1000, 2))))
    line = describe({"KID": 0.05, "KID_std": 0.003, "protocol": clipped})
    assert "(100 subsets of 250; each holds all 250 generated: ± the reference draw's spread only;" in line
    whole = protocol_record(PixelBackbone(), ["kid"], 250, 1, Reference("ref.npz", key, None, np.zeros((250, 2))))
    assert "KID 0.05000 (every subset both whole sets of 250: no spread)" in describe(
        {"KID": 0.05, "KID_std": 1e-16, "protocol": whole})
    # sngan's intra-FID is over 5000 samples per class: fewer are biased upward, whatever the FID's N
    intra = protocol_record(PixelBackbone(), ["fid"], 50000, 10, Reference("ttur.npz", {}, None, None))
    intra.update(intra_fid="classes", samples_per_class=500)
    line = describe({"FID": 20.0, "intra_FID": 90.0, "intra_FID_per_class": [90.0] * 1000, "protocol": intra})
    assert "not comparable with published numbers (intra-FID over 500 < 5000 samples per class" in line
    published = protocol_record(PixelBackbone(), ["is", "fid"], 50000, 10, Reference("ttur.npz", {}, None, None))
    line = describe({"IS": 20.0, "IS_std": 0.3, "FID": 71.0, "protocol": published})
    assert "published protocol of SNGAN/SRGANs" in line and "ttur.npz (external statistics)" in line
    # gSR: a balanced reference split of 10000 images, IS over 1 split
    for splits, images, expected in ((1, 10000, "published protocol of gSR"),
                                     (10, 10000, "IS over 10 split(s), gSR published over 1"),
                                     (1, 2000, "(a reference of 2000 images, gSR's of 10000)")):
        balanced = dict(key, dataset="cifar10", split="test", n_images=images)
        gsr = protocol_record(PixelBackbone(), ["is", "fid"], 50000, splits, Reference("ref.npz", balanced, None, None),
                              reference_split="test")
        assert expected in describe({"IS": 8.0, "IS_std": 0.0, "FID": 30.0, "protocol": gsr})


# --- end to end with the real TF-Inception (offline fid-helper weights) ------------------------

EVALUATION = ["evaluation_interval=2", "evaluation.n_samples=6", "evaluation.reference_images=8",
              "evaluation.metrics=[is, fid, kid]", f"evaluation.inception_weights={FID_HELPER}",
              "evaluation.batch_size=6"]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A 2-iteration tiny run, evaluated at iteration 2 with IS asked of pool3-only weights."""
    root = tmp_path_factory.mktemp("evaluation")
    out = root / "run"
    argv = tiny_argv(out, 2, *EVALUATION, f"evaluation.cache_dir={root / 'cache'}")
    assert train.main(argv) == 0
    return out


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_evaluates_fid_and_kid_and_skips_is_without_logits(evaluated_run):
    (record,) = read_metrics(evaluated_run)
    assert record["iteration"] == 2 and "IS" not in record
    assert math.isfinite(record["FID"]) and record["FID"] > 0 and math.isfinite(record["KID"])
    protocol = record["protocol"]
    assert protocol["weights"] == FID_HELPER and protocol["n_samples"] == 6 and protocol["kid_subset_size"] == 6
    assert protocol["backbone"] == inception.PROTOCOL and protocol["reference_key"]["n_images"] == 8
    assert Path(protocol["reference"]).is_file()
    assert list((evaluated_run / "tb").iterdir()), "tensorboardX scalars"


def test_resume_across_an_evaluation_is_bit_exact(tmp_path, capsys):
    """Evaluating (Inception load, reference, sampling) must not shift the training's random streams.

    Evaluations at 2, 4 and 6, a snapshot at 3: the resumed run's first evaluation (weights and
    reference loaded anew) falls between the resume point and the compared iteration 6."""
    cache = f"evaluation.cache_dir={tmp_path / 'cache'}"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(tiny_argv(straight, 6, *EVALUATION, cache)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluation at iteration")]
    # the Inception network and the reference statistics (seconds) are counted in the first evaluation, and said
    assert len(lines) == 3 and "s of it loading the network and reference statistics, once)" in lines[0]
    assert not any("once" in line for line in lines[1:])
    argv = tiny_argv(resumed, 6, *EVALUATION, cache) + ["--resume", str(straight / "snapshots" / "snapshot_iter_3.pt")]
    assert train.main(argv) == 0
    a = load_snapshot(straight / "snapshots" / "snapshot_iter_6.pt")
    b = load_snapshot(resumed / "snapshots" / "snapshot_iter_6.pt")
    for net in ("gen", "dis"):
        assert a[net].keys() == b[net].keys() and all(torch.equal(a[net][k], b[net][k]) for k in a[net])
    assert read_metrics(straight)[-1]["FID"] == read_metrics(resumed)[-1]["FID"]


def test_metrics_cli_reproduces_the_training_evaluation_of_a_snapshot(evaluated_run, capsys):
    snapshot = evaluated_run / "snapshots" / "generator_iter_2.pt"
    assert evaluation.main(["metrics", "--snapshot", str(snapshot), "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    assert "IS skipped" in out and "needs the full TF-Inception weights" in out
    assert "N=6 generated vs synthetic train 32px, 8 images" in out and "weights fid-helper" in out
    record = json.loads(out.strip().splitlines()[-1])
    (trained,) = read_metrics(evaluated_run)
    assert record["iteration"] == 2
    assert record["code"] == provenance.code_version() and record["machine"]["device"] == provenance.cpu_model()
    assert record["FID"] == pytest.approx(trained["FID"], rel=1e-9)
    assert record["KID"] == pytest.approx(trained["KID"], rel=1e-9)


def test_metrics_refuses_a_reference_of_another_resolution_than_the_generators(evaluated_run, capsys):
    """Inception resizes both to 299 px: 32 px fakes against 16 px reals gave a number, labelled 16px, without a word."""
    snapshot = evaluated_run / "snapshots" / "generator_iter_2.pt"
    argv = ["metrics", "--snapshot", str(snapshot), "--device", "cpu", "--metrics", "fid", "--set",
            "dataset.args.size=16"]
    assert evaluation.main(argv) == 2
    err = capsys.readouterr().err
    assert "dataset.args.size: 16 but the generator is built for 32 px" in err and err.count("\n") == 1


def test_a_reference_file_on_the_command_line_replaces_the_snapshots_reference_split(evaluated_run, capsys):
    """gSR's configs score against a balanced split (evaluation.reference_split): --reference replaces it, as it
    replaces the training data (before, every gSR snapshot refused --reference with a message about config keys)."""
    (stats,) = (evaluated_run.parent / "cache").glob("*.npz")
    snapshot = evaluated_run / "snapshots" / "generator_iter_2.pt"
    argv = ["metrics", "--snapshot", str(snapshot), "--device", "cpu", "--metrics", "fid", "--json",
            "--set", "evaluation.reference_split=test", "--reference", str(stats)]
    assert evaluation.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["protocol"]["reference"] == str(stats) and record["protocol"]["reference_split"] is None
    assert record["FID"] == pytest.approx(read_metrics(evaluated_run)[0]["FID"], rel=1e-9)


def test_metrics_cli_computes_the_inception_score_with_full_weights(evaluated_run, full_inception_weights, capsys):
    snapshot = evaluated_run / "snapshots" / "generator_iter_2.pt"
    argv = ["metrics", "--snapshot", str(snapshot), "--device", "cpu", "--inception-weights",
            str(full_inception_weights), "--metrics", "is", "fid", "--splits", "2", "--json"]
    assert evaluation.main(argv) == 0
    out = capsys.readouterr().out
    assert "IS skipped" not in out and "over 2 split(s)" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert 1.0 < record["IS"] < 1000.0 and record["IS_std"] > 0.0  # 2 splits of 3 images give two values
    assert record["protocol"]["weights"] == str(full_inception_weights) and record["protocol"]["splits"] == 2
    # IS from its definition on the same images: logits = pool3 W^T + b of the file's fc (with its bias), softmax
    # over all 1008, columns 1..1000 kept unrenormalised, exp(mean KL(p(y|x) || p(y))) per split, mean of splits
    loaded = load_generator(str(snapshot), torch.device("cpu"))
    z, labels = sample_inputs(6, loaded.gen.dim_z, loaded.gen.n_classes, record["protocol"]["seed"])
    backbone, _ = load_backbone(str(full_inception_weights), torch.device("cpu"))
    pool3 = generated_features(loaded.gen, backbone, z, labels, 6, torch.device("cpu")).pool3.astype(np.float64)
    fc = torch.load(full_inception_weights)
    logits = pool3 @ fc["fc.weight"].double().numpy().T + fc["fc.bias"].double().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True))[:, 1:1001]
    splits = [np.exp((part * (np.log(part) - np.log(part.mean(0)))).sum(1).mean()) for part in (p[:3], p[3:])]
    assert record["IS"] == pytest.approx(np.mean(splits), rel=1e-5) and record["IS_std"] == pytest.approx(
        np.std(splits), rel=1e-4)
    (trained,) = read_metrics(evaluated_run)  # scored with the pool3-only copy: the same features
    assert record["FID"] == pytest.approx(trained["FID"], rel=1e-6)


def test_intra_fid_cli_scores_every_class_against_per_class_reference_statistics(evaluated_run, capsys):
    snapshot = evaluated_run / "snapshots" / "generator_iter_2.pt"
    argv = ["metrics", "--snapshot", str(snapshot), "--metrics", "--intra-fid", "--samples-per-class", "2",
            "--set", "evaluation.reference_images=12", "--json"]
    assert evaluation.main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads(out.strip().splitlines()[-1])
    per_class = record["intra_FID_per_class"]
    assert sorted(per_class) == ["0", "1", "2"] and all(value > 0 for value in per_class.values())
    assert record["intra_FID"] == pytest.approx(np.mean(list(per_class.values())))
    assert "FID" not in record and record["protocol"]["samples_per_class"] == 2
    assert Path(record["protocol"]["reference"]).name == "synthetic_train_32px_12_tfinception_perclass.npz"
    assert "intra-FID" in out and "over 3 classes of 2 samples" in out
    # with FID too, in batch mode: the record's batch is FID's (6 images), each class's 2 images are a batch of 2
    argv = ["metrics", "--snapshot", str(snapshot), "--metrics", "fid", "--intra-fid", "--samples-per-class", "2",
            "--set", "evaluation.reference_images=12", "--g-batchnorm", "batch", "--json"]
    assert evaluation.main(argv) == 0
    protocol = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"]
    assert protocol["g_batchnorm_batch_size"] == 6 and protocol["intra_fid_g_batchnorm_batch_size"] == 2


def test_ref_stats_cli_reuses_its_cache_and_refuses_another_setups(evaluated_run, capsys):
    cache = evaluated_run.parent / "cache"
    base = tiny_argv(evaluated_run, 2, *EVALUATION, f"evaluation.cache_dir={cache}")[4:]  # the --set pairs
    assert evaluation.main(["ref-stats", "--config", str(CONFIGS / "demo.yaml"), *base, "--n-images", "8"]) == 0
    out = capsys.readouterr().out
    assert "computing" not in out and "synthetic_train_32px_8_tfinception.npz (8 images" in out
    changed = base + ["--set", "dataset.args.count=32"]
    assert evaluation.main(["ref-stats", "--config", str(CONFIGS / "demo.yaml"), *changed, "--n-images", "8"]) == 2
    err = capsys.readouterr().err
    assert "extra.count: cached 64, expected 32" in err and "delete the file" in err and err.count("\n") == 1


def test_training_turns_evaluation_off_instead_of_crashing_on_a_mismatching_cache(evaluated_run, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny_argv(out, 2, *EVALUATION, f"evaluation.cache_dir={evaluated_run.parent / 'cache'}",
                     "dataset.args.count=32")
    assert train.main(argv) == 0
    assert "EVALUATION OFF from iteration 2" in capsys.readouterr().out
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e.get("event") == "evaluation_disabled"]
    assert "extra.count" in event["reason"]
    assert not (out / "metrics.jsonl").exists()
    assert (out / "snapshots" / "snapshot_iter_2.pt").is_file()


def _evaluating_ddp_worker(rank: int, world_size: int, port: int, argv: list[str], rank_1_weights: str | None) -> None:
    """A torchrun rank of a tiny run evaluated at iteration 2; rank 1 loads ``rank_1_weights`` when given (as a node
    whose file of the same name differs)."""
    import os

    from source.training import evaluate

    if rank == 1 and rank_1_weights:
        evaluate.load_backbone = lambda weights, device: load_backbone(rank_1_weights, device)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train.main(argv) == 0
    end_finished_rank()


def test_torchrun_evaluation_scores_the_single_process_set_and_refuses_ranks_with_other_weights(
        evaluated_run, full_inception_weights, tmp_path, capsys):
    """Two gloo ranks each score half the evaluation set; rank 0 gathers and scores what one process would. A rank
    whose Inception weights differ (here: one conv perturbed) turns evaluation off on every rank, naming both."""
    cache = f"evaluation.cache_dir={evaluated_run.parent / 'cache'}"  # the reference, computed before torchrun
    other = torch.load(full_inception_weights)
    other["Conv2d_1a_3x3.conv.weight"] = other["Conv2d_1a_3x3.conv.weight"] * 1.01
    torch.save(other, tmp_path / "other.pth")
    for name, rank_1_weights in (("same", None), ("other", str(tmp_path / "other.pth"))):
        argv = tiny_argv(tmp_path / name, 2, *EVALUATION, cache)
        mp.spawn(_evaluating_ddp_worker, args=(2, _free_port(), argv, rank_1_weights), nprocs=2, join=True)
    (ddp,) = read_metrics(tmp_path / "same")
    capsys.readouterr()
    snapshot = tmp_path / "same" / "snapshots" / "generator_iter_2.pt"
    assert evaluation.main(["metrics", "--snapshot", str(snapshot), "--device", "cpu", "--json"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # that G, scored in one process
    assert ddp["protocol"] == read_metrics(evaluated_run)[0]["protocol"]  # a single-process run's
    assert ddp["FID"] == pytest.approx(single["FID"], rel=1e-6) and ddp["KID"] == pytest.approx(single["KID"], rel=1e-6)
    assert not (tmp_path / "other" / "metrics.jsonl").exists()
    events = [json.loads(line) for line in (tmp_path / "other" / "log.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e.get("event") == "evaluation_disabled"]
    assert "different Inception weights" in event["reason"] and "rank 1: " in event["reason"]
    # one file under two paths (each node's own cache) is the same network
    assert weights_disagreement([("/node0/w.pth", "ab12"), ("/node1/w.pth", "ab12")]) == []
    assert weights_disagreement([("w.pth", "ab12"), ("w.pth", "cd34")])


def test_grids_write_one_rows_by_columns_png_per_class(evaluated_run, capsys):
    snapshot = evaluated_run / "snapshots" / "snapshot_iter_2.pt"
    argv = ["grids", "--snapshot", str(snapshot), "--classes", "0", "2", "0", "--rows", "2", "--columns", "3"]
    assert evaluation.main(argv) == 0
    assert capsys.readouterr().out.count("class_0.png") == 1  # a class named twice: drawn once
    folder = evaluated_run / "figures" / "grids_iter_2"
    assert sorted(p.name for p in folder.iterdir()) == ["class_0.png", "class_2.png"]
    with Image.open(folder / "class_0.png") as first, Image.open(folder / "class_2.png") as second:
        assert first.size[0] == 3 * 32 + 2 * 2 and first.size[1] > 2 * 32 + 2 and first.mode == "L"  # padding, title
        assert not np.array_equal(np.asarray(first), np.asarray(second)), "classes must differ"
    assert evaluation.main(argv[:3] + ["--classes", "3"]) == 2


def test_tile_places_sample_r_times_columns_plus_c_at_row_r_column_c():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 3).contiguous()
    grid = tile(images, rows=2, columns=3)
    assert grid.shape == (1, 4, 9)
    assert grid[0, ::2, ::3].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_samples_export_png_folder_and_npz(evaluated_run, tmp_path):
    snapshot = str(evaluated_run / "snapshots" / "snapshot_iter_2.pt")
    assert evaluation.main(["samples", "--snapshot", snapshot, "--n", "5", "--out", str(tmp_path / "png")]) == 0
    files = sorted((tmp_path / "png").iterdir())
    assert len(files) == 5 and files[0].name.startswith("000000_class")
    with Image.open(files[0]) as image:
        assert image.size == (32, 32)
    npz = tmp_path / "samples.npz"
    assert evaluation.main(["samples", "--snapshot", snapshot, "--n", "5", "--format", "npz", "--out", str(npz)]) == 0
    with np.load(npz) as data:
        assert data["arr_0"].shape == (5, 32, 32, 1) and data["arr_0"].dtype == np.uint8
        assert data["labels"].shape == (5,) and set(data["labels"]) <= {0, 1, 2}
        np.testing.assert_array_equal(np.asarray(Image.open(files[0])), data["arr_0"][0, :, :, 0])
    kept = npz.read_bytes()  # another snapshot's export into the same place: kept unless --force
    for out, extra in ((npz, ["--format", "npz"]), (tmp_path / "png", [])):
        assert evaluation.main(["samples", "--snapshot", snapshot, "--n", "5", "--seed", "9", "--out", str(out),
                                *extra]) == 2
    assert npz.read_bytes() == kept
    assert evaluation.main(["samples", "--snapshot", snapshot, "--n", "5", "--seed", "9", "--out", str(npz),
                            "--format", "npz", "--force"]) == 0 and npz.read_bytes() != kept
    # without the suffix: numpy adds it, and the export kept is that file (it was replaced, and named without it)
    kept = npz.read_bytes()
    assert evaluation.main(["samples", "--snapshot", snapshot, "--n", "5", "--out", str(tmp_path / "samples"),
                            "--format", "npz"]) == 2 and npz.read_bytes() == kept


def test_user_errors_are_one_line_messages(evaluated_run, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a snapshot")
    snapshot = str(evaluated_run / "snapshots" / "snapshot_iter_2.pt")
    elsewhere = ["--set", f"evaluation.cache_dir={tmp_path / 'refs'}"]
    cases = [
        (["metrics", "--snapshot", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
        (["metrics", "--snapshot", str(evaluated_run / "snapshots" / "snapshot_iter_4000.pt")],
         "snapshot_iter_4000.pt does not exist; its folder's newest is snapshot_iter_2.pt"),  # a mistyped iteration
        (["grids", "--snapshot", str(bad)], "is not a readable snapshot"),
        (["metrics", "--snapshot", snapshot, "--inception-weights", "/nonexistent.pth"], "no file at /nonexistent"),
        (["metrics", "--snapshot", snapshot, "--reference", str(tmp_path / "none.npz")], "none.npz"),
        # nothing to score: said before the reference statistics' minutes (their cache folder stays unmade)
        (["metrics", "--snapshot", snapshot, "--metrics", *elsewhere], "no metrics requested: --metrics names none"),
        (["metrics", "--snapshot", snapshot, "--set", "evaluation.metrics=[]", *elsewhere],
         "the snapshot's evaluation.metrics is []"),
        (["metrics", "--snapshot", snapshot, "--metrics", "is", "is", *elsewhere],
         "none of the requested metrics can be computed"),  # IS of the pool3-only weights
        (["grids", "--snapshot", snapshot, "--device", "cpu:0x"], "--device 'cpu:0x': not a device"),  # tracebacks
        (["grids", "--snapshot", snapshot, "--rows", "100000", "--columns", "100000"], "at most 10,000"),  # OOM
        (["samples", "--snapshot", snapshot, "--n", "2", "--out", str(bad)], f"--out {bad} is a file; name a folder"),
        (["grids", "--snapshot", snapshot, "--out", str(bad)], f"--out {bad} is a file; name a folder"),
        (["samples", "--snapshot", snapshot, "--n", "2", "--format", "npz", "--out", str(tmp_path)], "is a folder"),
    ] + ([] if torch.cuda.is_available() else [
        (["metrics", "--snapshot", snapshot, "--device", "cuda"], "--device cuda: no CUDA GPU is visible here")])
    for argv, expected in cases:
        assert evaluation.main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "refs").exists()


def test_ctrl_c_ends_evaluation_and_the_figures_with_one_line(evaluated_run, capsys, monkeypatch):
    """A KeyboardInterrupt during the minutes of Inception passes (or a figure): one line and status 130."""
    from figures.common import command_line

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "load_backbone", interrupted)
    snapshot = str(evaluated_run / "snapshots" / "snapshot_iter_2.pt")
    assert evaluation.main(["metrics", "--snapshot", snapshot]) == 130
    assert capsys.readouterr().err == "stopped (Ctrl-C)\n"
    assert command_line(interrupted) == 130 and capsys.readouterr().err == "stopped (Ctrl-C)\n"


def test_a_received_snapshots_cache_folder_is_not_made_here(evaluated_run, tmp_path, capsys, monkeypatch):
    """Its evaluation.cache_dir names a folder of the machine it came from: the reference goes to the default one."""
    snapshot = load_snapshot(evaluated_run / "snapshots" / "snapshot_iter_2.pt")
    theirs = tmp_path / "their" / "cache"
    snapshot["config"]["evaluation"]["cache_dir"] = str(theirs)
    foreign = tmp_path / "snapshot_iter_2.pt"
    torch.save(snapshot, foreign)
    monkeypatch.chdir(tmp_path)  # the default folder is relative: data/reference_stats
    assert evaluation.main(["metrics", "--snapshot", str(foreign), "--device", "cpu", "--metrics", "fid"]) == 0
    note = f"note: the snapshot's evaluation.cache_dir {theirs} holds no reference statistics here"
    assert note in capsys.readouterr().out
    assert not theirs.parent.exists() and list((tmp_path / "data" / "reference_stats").glob("*.npz"))


def test_a_snapshots_config_never_makes_evaluation_download_a_data_set(evaluated_run, tmp_path, capsys, monkeypatch):
    """A snapshot may come from someone else: its `download: true` and root do not make this machine fetch
    CIFAR-10 into the folder it names; the user's own --set does."""
    snapshot = load_snapshot(evaluated_run / "snapshots" / "snapshot_iter_2.pt")
    root = tmp_path / "their" / "cifar"
    snapshot["config"]["dataset"] = {"name": "cifar10", "args": {"root": str(root), "download": True}}
    foreign = tmp_path / "snapshot_iter_2.pt"
    torch.save(snapshot, foreign)
    fetched = []
    monkeypatch.setattr("source.datasets.cifar10.download_cifar10", lambda where: fetched.append(where))
    argv = ["metrics", "--snapshot", str(foreign), "--device", "cpu", "--set", f"evaluation.cache_dir={tmp_path}"]
    assert evaluation.main(argv) == 2
    err = capsys.readouterr().err
    assert "set dataset.args.download: true" in err and err.count("\n") == 1, err
    assert fetched == [] and not root.exists()
    evaluation.main(argv + ["--set", "dataset.args.download=true"])  # the stand-in fetches nothing: fails later
    assert fetched == [str(root)]


@pytest.mark.parametrize("command, option, value, message", [
    ("metrics", "--seed", "99999999999999999999", "argument --seed: must be in [0, 2^32), got 99999999999999999999"),
    ("samples", "--seed", "-1", "argument --seed: must be in [0, 2^32), got -1"),  # torch: an overflow, or ran
    ("grids", "--seed", "4294967296", "argument --seed: must be in [0, 2^32)"),
    # a billion repeats: killed for memory while it built its list of seeds
    ("metrics", "--repeats", "1000000000", "argument --repeats: must be in [1, 100] (each repeat"),
    ("classes", "--repeats", "101", "argument --repeats: must be in [1, 100]"),
])
def test_seeds_and_repeats_out_of_range_are_refused_before_anything_is_read(command, option, value, message, capsys):
    extra = ["--n", "4", "--out", "never-written"] if command == "samples" else []
    with pytest.raises(SystemExit) as exit_:
        evaluation.main([command, "--snapshot", "no-such-snapshot.pt", *extra, option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
