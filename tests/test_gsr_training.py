"""gSR, LeCam, DiffAugment, G's EMA and the label prior in training, through train.main and the updater."""
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train
from source.training.checkpoint import load_snapshot
from test_training import CONFIGS, _ddp_worker, _free_port, build_tiny_updater, tensors_equal, tiny_argv

# every term on, long-tailed synthetic data (22 / 8 / 3 images), n_dis 2
ALL_TERMS = ["updater.gsr.enabled=true", "updater.lecam.weight=0.3", "updater.diffaugment=color,translation,cutout",
             "updater.ema.enabled=true", "updater.ema.start_iteration=2", "updater.ema.decay=0.9",
             "updater.n_dis=2", "dataset.args.long_tail.ratio=7", "spectra_interval=2", "evaluation.metrics=[]"]


def snapshot(run, iteration):
    return load_snapshot(run / "snapshots" / f"snapshot_iter_{iteration}.pt")


def test_resume_is_bit_exact_with_every_term_on(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(tiny_argv(straight, 6, *ALL_TERMS)) == 0
    argv = tiny_argv(resumed, 6, *ALL_TERMS) + ["--resume", str(straight / "snapshots" / "snapshot_iter_3.pt")]
    assert train.main(argv) == 0
    a, b = snapshot(straight, 6), snapshot(resumed, 6)
    for key in ("gen", "dis", "gen_ema"):
        assert tensors_equal(a[key], b[key]), key
    assert tensors_equal(a["updater"]["lecam"], b["updater"]["lecam"])
    for layer, vectors in a["updater"]["gsr"]["vectors"].items():
        assert tensors_equal(vectors, b["updater"]["gsr"]["vectors"][layer])
    assert not tensors_equal(a["gen"], a["gen_ema"]), "the EMA must differ from G after its start"
    export = load_snapshot(straight / "snapshots" / "generator_iter_6.pt")
    assert export["gen_is_ema"] and tensors_equal(export["gen"], a["gen_ema"])
    losses = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    gsr = [r["loss_gsr"] for r in losses if "loss_gsr" in r]
    assert gsr[0] == 0.0 and gsr[-1] > 0, "gSR starts at zero (gamma = 1, beta = 0) and must come alive"
    assert all(r["loss_lecam"] >= 0 for r in losses if "loss_lecam" in r)


def test_class_spectra_are_written_for_long_tailed_data(tmp_path):
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 4, *ALL_TERMS, "updater.gsr.enabled=false")) == 0  # baselines are measured too
    records = [json.loads(line) for line in (run / "class_spectra.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert records[0]["class_counts"] == [22, 8, 3]
    assert len(records[0]["layers"]) == 6 and len(records[0]["gamma"][0]) == 3
    gen = snapshot(run, 4)["gen"]  # the sigmas recomputed by numpy SVD from the CBN tables of the same G

    def sigmas(table):  # each class's C-vector as the most nearly square (a, C / a) matrix, row-major
        channels = table.shape[1]
        a = max(d for d in range(1, int(channels ** 0.5) + 1) if channels % d == 0)
        return [np.linalg.norm(row.reshape(a, channels // a), 2) for row in table.double().numpy()]

    for index, layer in enumerate(records[-1]["layers"]):
        assert records[-1]["gamma"][index] == pytest.approx(sigmas(gen[f"{layer}.gamma.weight"] - 1), rel=1e-9)
        assert records[-1]["beta"][index] == pytest.approx(sigmas(gen[f"{layer}.beta.weight"]), rel=1e-9)


def test_ddp_two_ranks_match_one_process_with_gsr_lecam_and_ema(tmp_path, ranks_threads):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    terms = [t for t in ALL_TERMS if "n_dis" not in t]
    assert train.main(tiny_argv(single, 3, *terms)) == 0
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_argv(ddp, 3, *terms)), nprocs=2, join=True)
    a, b = snapshot(single, 3), snapshot(ddp, 3)
    torch.testing.assert_close(b["updater"]["lecam"]["anchor_real"], a["updater"]["lecam"]["anchor_real"],
                               rtol=1e-5, atol=1e-6)
    for layer, vectors in a["updater"]["gsr"]["vectors"].items():
        for name, vector in vectors.items():
            torch.testing.assert_close(b["updater"]["gsr"]["vectors"][layer][name], vector, rtol=1e-4, atol=1e-5)
    cbn = [k for k in a["gen"] if k.endswith(("gamma.weight", "beta.weight"))]
    for key in cbn:
        torch.testing.assert_close(b["gen"][key], a["gen"][key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b["gen_ema"][key], a["gen_ema"][key], rtol=1e-4, atol=1e-5)


def test_gsr_changes_only_the_class_conditional_parameters_of_g():
    """One iteration with and without gSR: D is untouched, and in G only the CBN gains and biases differ."""
    states = []
    for enabled in ("false", "true"):
        upd, models = build_tiny_updater(f"updater.gsr.enabled={enabled}", "updater.gsr.weight=100",
                                         "updater.n_dis=1")
        with torch.no_grad():  # away from gamma = 1, beta = 0, where the penalty and its gradient vanish
            for name, p in models.gen.named_parameters():
                if name.endswith(("gamma.weight", "beta.weight")):
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        upd.update()
        states.append((models.gen.state_dict(), models.dis.state_dict()))
    (gen_off, dis_off), (gen_on, dis_on) = states
    assert tensors_equal(dis_off, dis_on)
    changed = {k for k in gen_off if not torch.equal(gen_off[k], gen_on[k])}
    assert changed and all(k.endswith(("gamma.weight", "beta.weight")) for k in changed)


def test_diffaugment_reaches_real_and_fake_images_alike(monkeypatch):
    upd, models = build_tiny_updater("updater.diffaugment=cutout", "updater.n_dis=1")
    seen = []
    forward = type(models.dis).forward
    monkeypatch.setattr(type(models.dis), "forward", lambda self, x, y=None: seen.append(x.detach()) or forward(self, x, y))
    upd.update()
    assert [len(x) for x in seen] == [8, 8, 4, 4]  # D's 2 micro-batches (4 reals, 4 fakes), then G's 2 of 4 fakes
    for images in seen:  # cutout zeroes a 16 x 16 square of each 32 x 32 image, in G's step too
        zeros = (images == 0).flatten(1).sum(1)
        assert torch.all(zeros >= 16 * 16 // 4), zeros  # at least a clipped quarter of the square in every image


HINGE = (lambda real, fake: np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean(), lambda fake: -fake.mean())
DCGAN = (lambda real, fake: np.log1p(np.exp(-real)).mean() + np.log1p(np.exp(fake)).mean(),
         lambda fake: np.log1p(np.exp(-fake)).mean())


@pytest.mark.parametrize("loss_type, formulas", [("hinge", HINGE), ("dcgan", DCGAN)])
def test_the_logged_losses_are_the_configured_loss_of_ds_logits(monkeypatch, loss_type, formulas):
    """D's and G's losses recomputed in numpy from the logits D returned in the iteration (the training tests
    compare runs of the same code, which a wrong loss would pass)."""
    upd, models = build_tiny_updater("updater.n_dis=1", f"updater.loss_type={loss_type}")
    logits = []
    forward = type(models.dis).forward
    monkeypatch.setattr(type(models.dis), "forward",
                        lambda self, x, y=None: (lambda out: logits.append(out.detach().double().numpy()) or out)(
                            forward(self, x, y)))
    record = upd.update()
    assert [len(out) for out in logits] == [8, 8, 4, 4]  # D's 2 micro-batches of 4 reals + 4 fakes, then G's 2 of 4
    dis, gen = formulas
    assert float(record["loss_dis"]) == pytest.approx(np.mean([dis(out[:4], out[4:]) for out in logits[:2]]), rel=1e-6)
    assert float(record["loss_gen"]) == pytest.approx(np.mean([gen(out) for out in logits[2:]]), rel=1e-6)


def test_lecam_trains_d():
    """The penalty is not only logged: D's weights after two iterations depend on it."""
    dis = []
    for weight in ("0", "10"):
        upd, models = build_tiny_updater(f"updater.lecam.weight={weight}", "updater.n_dis=1")
        records = [upd.update() for _ in range(2)]
        dis.append(models.dis.state_dict())
    assert float(records[-1]["loss_lecam"]) > 0
    assert not tensors_equal(*dis)


def test_the_updater_gets_the_terms_the_config_asks_for():
    """Each config value reaches the object that uses it (a dry run's summary is printed from the config)."""
    upd, _ = build_tiny_updater(*ALL_TERMS, "updater.gsr.weight=0.7", "updater.gsr.effective_number_beta=0.9",
                                "updater.gsr.power_iterations=3", "updater.lecam.decay=0.95",
                                "updater.lecam.start_iteration=3")
    terms = upd.terms
    inverse = (1 - 0.9) / (1 - 0.9 ** np.array([22.0, 8.0, 3.0]))  # the class counts of ALL_TERMS' data
    assert terms.gsr.lambdas.tolist() == pytest.approx((0.7 * 3 * inverse / inverse.sum()).tolist(), rel=1e-12)
    assert terms.gsr.iterations == 3
    lecam = terms.lecam
    assert (lecam.weight, lecam.form, lecam.decay, lecam.start_iteration) == (0.3, "gsr", 0.95, 3)
    assert lecam.anchor_real.shape == (8,)  # the gsr form keeps one anchor per position of D's batch
    assert (terms.ema.decay, terms.ema.start_iteration) == (0.9, 2)
    assert terms.augment.policy == ("color", "translation", "cutout") and terms.augment.size == 32
    unbalanced, _ = build_tiny_updater(*ALL_TERMS, "updater.gsr.class_balanced=false")
    assert unbalanced.terms.gsr.lambdas.tolist() == [1.0, 1.0, 1.0]


def test_fake_labels_follow_the_data_prior():
    upd, _ = build_tiny_updater("updater.fake_labels=data", "dataset.args.long_tail.ratio=7")
    _, labels = upd.draws.latents(upd.gen_module, 0, 0, 4000)
    frequencies = torch.bincount(labels, minlength=3).float() / 4000
    assert frequencies.tolist() == pytest.approx([22 / 33, 8 / 33, 3 / 33], abs=0.03)
    torch.rand(100)  # the phase's own stream, not the global one: the same labels whatever ran between
    assert torch.equal(upd.draws.latents(upd.gen_module, 0, 0, 4000)[1], labels)


def test_g_ema_is_a_copy_of_g_until_its_start_iteration():
    upd, models = build_tiny_updater("updater.ema.enabled=true", "updater.ema.start_iteration=2",
                                     "updater.ema.decay=0.9", "updater.n_dis=1")
    for _ in range(2):
        upd.update()
    assert tensors_equal(upd.eval_generator.state_dict(), models.gen.state_dict())
    upd.update()
    assert not tensors_equal(upd.eval_generator.state_dict(), models.gen.state_dict())


@pytest.mark.parametrize("name", ["fmnist_lt", "cifar10_lt_sngan", "lsun_lt_sngan"])
def test_gsr_configs_dry_run(name, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("source.datasets.cifar10.download_cifar10", lambda root: pytest.fail("a dry run downloaded"))
    empty = ["--set", f"dataset.args.root={tmp_path}"] if name.startswith("cifar10") else []
    assert train.main(["--config", str(CONFIGS / "gsr" / f"{name}.yaml"), "--dry-run", *empty]) == 0
    out = capsys.readouterr().out
    assert "gSR (class-balanced w 0.5, beta 0.999, 4 power steps; " in out
    assert {"fmnist_lt": "6 layers of 32 channels as 4 x 8)", "cifar10_lt_sngan": "6 layers of 256 channels as 16 x 16)",
            "lsun_lt_sngan": "1 layer of 1024 channels as 32 x 32, 2 layers of 512 channels as 16 x 32, "}[name] in out
    if name == "fmnist_lt":  # the data are installed by `make data`; the others report where they are missing
        assert "14,886 images, 10 classes, 32px; per class: 6000 3596 2156 1292 774 464 278 166 100 60" in out
        settings = ["--set", "updater.gsr.weight=0"], ["--set", "updater.gsr.class_balanced=false"]
        for setting, said in zip(settings, ["weight 0: gSR adds nothing", "lambda 1: gsr.weight counts only with "
                                                                          "class_balanced"]):
            assert train.main(["--config", str(CONFIGS / "gsr" / f"{name}.yaml"), "--dry-run", *setting]) == 0
            assert said in capsys.readouterr().out
    else:
        assert "LeCam 0.3 (gsr form" in out and "DiffAugment color,translation,cutout" in out
    if empty:
        assert f"cifar10: not in {tmp_path} yet; the run downloads it there first" in out
    baseline = train.main(["--config", str(CONFIGS / "gsr" / f"{name}.yaml"), "--dry-run", *empty,
                           "--set", "updater.gsr.enabled=false"])
    assert baseline == 0 and "gSR" not in capsys.readouterr().out


@pytest.mark.parametrize("name", ["fmnist_lt.yaml", "fmnist_lt_biggan.yaml"])
def test_fashion_mnist_lt_configs_group_its_classes_into_three_nonempty_groups(name):
    """gSR's > 100 / <= 40 thresholds leave Fashion-MNIST-LT's few group empty; the configs scale them to its data."""
    from source.config import load_config
    from source.datasets import build_dataset
    from source.metrics.groups import class_groups

    config = load_config(CONFIGS / "gsr" / name)
    counts = np.bincount(build_dataset(config.dataset.name, config.dataset.args).labels, minlength=10)
    groups = class_groups(counts.tolist(), config.evaluation.many_above, config.evaluation.few_at_most)
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
