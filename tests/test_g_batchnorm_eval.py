"""evaluation.g_batchnorm: how G's BatchNorm normalizes while generating for metrics.

running (eval mode, today's default), batch (each generation batch's statistics, gSR's release) and
standing (BigGAN's standing statistics), through `generation_mode` / `generate_uint8`, the protocol
record, the config validator and evaluation.py; evaluating never changes the model.
"""
import copy
import json

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import evaluation
import train
from source.config import ConfigError, load_config
from source.links import BatchNorm2d, no_power_iteration, set_ghost_batch
from source.metrics.describe import describe
from source.metrics.generate import (GBatchNorm, generate_uint8, generation_mode, g_batchnorm, sample_inputs,
                                     standing_inputs)
from source.metrics.inception import to_uint8
from source.metrics.reference import Reference
from source.metrics.scoring import protocol_record
from source.models import build_model
from source.training.evaluate import load_generator
from test_evaluation import PixelBackbone
from test_longtail_eval import config_of, write_snapshot
from test_training import CONFIGS, tiny_argv

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def small_generator(seed: int = 0) -> torch.nn.Module:
    """A tiny SN G whose running statistics are far from any batch's (so the modes differ)."""
    torch.manual_seed(seed)
    gen = build_model("ResNetGenerator", dict(dim_z=8, ch=4, n_classes=3, resolution=32, bottom_width=4, channels=1,
                                              spectral_norm=True))
    with torch.no_grad():
        for name, parameter in gen.named_parameters():
            if name.endswith(("gamma.weight", "beta.weight")):
                parameter.add_(torch.randn_like(parameter))
        gen(torch.randn(8, 8), torch.arange(8) % 3)  # SN vectors and num_batches_tracked move from init
        for module in gen.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.3, 3.0)
    return gen


def snapshot_state(gen: torch.nn.Module) -> dict:
    return {name: value.clone() for name, value in gen.state_dict().items()}


def assert_same_state(gen: torch.nn.Module, before: dict) -> None:
    after = gen.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


def inputs(n: int = 8):
    return sample_inputs(n, 8, 3, seed=4)


def generate(gen, z, labels, batch_size=4, batchnorm=None) -> torch.Tensor:
    return torch.cat(list(generate_uint8(gen, z, labels, batch_size, CPU, batchnorm)))


def test_running_mode_is_todays_eval_mode_output_exactly():
    gen, (z, labels) = small_generator(), inputs()
    reference = copy.deepcopy(gen).eval()  # today: G in eval mode, batch by batch
    with torch.no_grad():
        expected = torch.cat([to_uint8(reference(z[s:s + 4], labels[s:s + 4])) for s in (0, 4)])
    gen.train()
    assert torch.equal(generate(gen, z, labels), expected)
    assert torch.equal(generate(gen, z, labels, batchnorm="running"), expected)
    assert all(module.training for module in gen.modules())  # flags back as they were


def test_batch_mode_uses_each_generation_batchs_statistics_over_the_whole_batch():
    gen, (z, labels) = small_generator(), inputs()
    set_ghost_batch(gen, 2)  # training's ghost batches must not split a generation batch
    batch = generate(gen, z, labels, batchnorm="batch")
    assert not torch.equal(batch, generate(gen, z, labels))
    fresh = copy.deepcopy(gen).train()  # train mode: BN normalizes with the batch's statistics
    set_ghost_batch(fresh, None)
    with torch.no_grad(), no_power_iteration(fresh):
        expected = torch.cat([to_uint8(fresh(z[s:s + 4], labels[s:s + 4])) for s in (0, 4)])
    assert torch.equal(batch, expected)
    assert all(module.ghost_batch == 2 for module in gen.modules() if isinstance(module, BatchNorm2d))


@pytest.mark.parametrize("mode", ["running", "batch", "standing"])
@pytest.mark.parametrize("training", [False, True])
def test_no_mode_changes_the_model(mode, training):
    gen, (z, labels) = small_generator(), inputs()
    gen.train(training)
    before, flags = snapshot_state(gen), [m.training for m in gen.modules()]
    generate(gen, z, labels, batchnorm=GBatchNorm(mode, batch_size=4, standing_steps=3))
    assert_same_state(gen, before)  # parameters, running statistics, num_batches_tracked, SN's u/v
    assert [m.training for m in gen.modules()] == flags
    norms = [m for m in gen.modules() if isinstance(m, _BatchNorm)]
    assert all(m.momentum == 0.1 and "ghost_batch" not in m.__dict__ for m in norms)


def test_only_batchnorm_runs_in_train_mode_and_ghost_batches_are_off_inside():
    gen = small_generator()
    set_ghost_batch(gen, 2)
    with generation_mode(gen, "batch"):
        for module in gen.modules():
            assert module.training == isinstance(module, _BatchNorm), type(module).__name__
            if isinstance(module, BatchNorm2d):
                assert module.ghost_batch is None
    assert all(m.ghost_batch == 2 for m in gen.modules() if isinstance(m, BatchNorm2d))


def direct_standing_statistics(gen, mode: GBatchNorm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: (mean of the forwards' batch means, mean of their unbiased batch variances)."""
    fresh = copy.deepcopy(gen).train()
    set_ghost_batch(fresh, None)
    seen = {}

    def hook(name):
        def record(module, args):
            x = args[0].double()
            seen.setdefault(name, []).append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)))
        return record

    for name, module in fresh.named_modules():
        if isinstance(module, _BatchNorm):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad(), no_power_iteration(fresh):
        for z, labels in standing_inputs(gen, mode):
            fresh(z, labels)
    return {name: (torch.stack([m for m, _ in parts]).mean(0), torch.stack([v for _, v in parts]).mean(0))
            for name, parts in seen.items()}


def standing_statistics(gen, mode):
    with generation_mode(gen, mode):
        norms = {name: m for name, m in gen.named_modules() if isinstance(m, _BatchNorm)}
        assert not any(m.training for m in norms.values())  # generating: eval mode with the standing statistics
        return {name: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
                for name, m in norms.items()}


def test_standing_statistics_are_the_cumulative_average_the_same_every_time_and_leave_no_trace():
    gen, (z, labels) = small_generator(), inputs()
    mode = GBatchNorm("standing", batch_size=6, standing_steps=3)
    before = snapshot_state(gen)
    first, second = standing_statistics(gen, mode), standing_statistics(gen, mode)
    expected = direct_standing_statistics(gen, mode)
    assert first.keys() == expected.keys() and len(first) == 7
    for name, (mean, var, count) in first.items():
        torch.testing.assert_close(mean.double(), expected[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), expected[name][1], rtol=1e-5, atol=1e-6)
        assert count == 3
        assert torch.equal(mean, second[name][0]) and torch.equal(var, second[name][1])
    images = generate(gen, z, labels, batchnorm=mode)
    assert torch.equal(images, generate(gen, z, labels, batchnorm=mode))
    assert not torch.equal(images, generate(gen, z, labels))
    assert_same_state(gen, before)


def test_a_generation_inside_a_mode_keeps_it_and_standing_is_accumulated_once(monkeypatch):
    gen, (z, labels) = small_generator(), inputs()
    mode = GBatchNorm("standing", batch_size=4, standing_steps=2)
    calls = []
    monkeypatch.setattr("source.metrics.generate.standing_inputs",
                        lambda g, m: calls.append(m) or standing_inputs(g, m))
    with generation_mode(gen, mode):
        inner = generate(gen, z, labels)  # None: the enclosing mode
        inner_again = generate(gen, z, labels, batchnorm=mode)
    assert len(calls) == 1 and torch.equal(inner, inner_again)
    assert torch.equal(inner, generate(gen, z, labels, batchnorm=mode))


def test_the_protocol_record_and_the_printed_line_name_the_mode():
    reference = Reference("ttur.npz", {}, None, None)
    for mode, expected, words in [
        (GBatchNorm(), {"g_batchnorm": "running"}, "BN running statistics"),
        (GBatchNorm("batch", 50), {"g_batchnorm": "batch", "g_batchnorm_batch_size": 50}, "BN batch statistics"),
        (GBatchNorm("standing", 50, 16), {"g_batchnorm": "standing", "standing_steps": 16, "standing_batch_size": 50},
         "BN standing statistics (16 x 50 samples"),
    ]:
        record = protocol_record(PixelBackbone(), ["fid"], 5000, 1, reference, "ema", batchnorm=mode)
        assert expected.items() <= record.items()
        assert words in describe({"FID": 10.0, "protocol": record})
    assert protocol_record(PixelBackbone(), ["fid"], 5000, 1, reference)["g_batchnorm"] == "running"


def test_the_config_rejects_an_unknown_mode_and_too_few_standing_steps():
    config = load_config(CONFIGS / "demo.yaml", ["evaluation.g_batchnorm=standing"])
    assert g_batchnorm(config.evaluation) == GBatchNorm("standing", config.evaluation.batch_size, 16)
    assert load_config(CONFIGS / "demo.yaml").evaluation.g_batchnorm == "running"
    for override, words in [("evaluation.g_batchnorm=foo", "evaluation.g_batchnorm"),
                            ("evaluation.standing_steps=0", "evaluation.standing_steps")]:
        with pytest.raises(ConfigError) as error:
            load_config(CONFIGS / "demo.yaml", [override])
        assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown mode 'foo'"):
        GBatchNorm("foo")


def test_the_command_line_flag_overrides_the_config(tmp_path, monkeypatch, capsys):
    config = config_of(tmp_path, "evaluation.g_batchnorm=standing", "evaluation.standing_steps=2")
    path = write_snapshot(tmp_path, config)
    loaded = load_generator(str(path), CPU)
    z, labels = sample_inputs(6, loaded.gen.dim_z, loaded.gen.n_classes, config.seed)
    exported = {}
    for flag in ("batch", None):
        out = tmp_path / f"{flag}.npz"
        argv = ["samples", "--snapshot", str(path), "--n", "6", "--format", "npz", "--out", str(out),
                "--batch-size", "3", "--device", "cpu"] + (["--g-batchnorm", flag] if flag else [])
        assert evaluation.main(argv) == 0
        exported[flag] = torch.from_numpy(np.load(out)["arr_0"]).permute(0, 3, 1, 2)
    assert "BN batch statistics (batches of 3)" in capsys.readouterr().out
    assert torch.equal(exported["batch"], generate(loaded.gen, z, labels, 3, "batch"))
    assert torch.equal(exported[None], generate(loaded.gen, z, labels, 3, GBatchNorm("standing", 3, 2)))
    # fewer images than the batch size: one batch of them, and the message says so (not the configured 50)
    argv = ["samples", "--snapshot", str(path), "--n", "6", "--format", "npz", "--out", str(tmp_path / "few.npz"),
            "--batch-size", "50", "--device", "cpu", "--g-batchnorm", "batch"]
    assert evaluation.main(argv) == 0
    assert "BN batch statistics (batches of 6)" in capsys.readouterr().out
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "few.npz")["arr_0"]).permute(0, 3, 1, 2),
                       exported["batch"]) is False

    monkeypatch.setattr(evaluation, "load_backbone", lambda weights, device: (PixelBackbone(), None))
    base = ["metrics", "--snapshot", str(path), "--metrics", "fid", "--n-samples", "6", "--device", "cpu", "--json"]
    for flag, expected in ((None, "standing"), ("running", "running")):
        assert evaluation.main(base + (["--g-batchnorm", flag] if flag else [])) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["protocol"]["g_batchnorm"] == expected
    assert record["protocol"].keys().isdisjoint({"standing_steps", "g_batchnorm_batch_size"})
    # 6 images in batch mode with a configured batch of 50: one batch of 6, as the record says
    assert evaluation.main(base + ["--g-batchnorm", "batch", "--set", "evaluation.batch_size=50"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"]["g_batchnorm_batch_size"] == 6


def test_training_evaluates_with_the_configured_mode(tmp_path, monkeypatch):
    monkeypatch.setattr("source.training.evaluate.load_backbone", lambda weights, device: (PixelBackbone(), None))
    out = tmp_path / "run"
    argv = tiny_argv(out, 2, "evaluation_interval=2", "evaluation.n_samples=6", "evaluation.metrics=[fid]",
                     "evaluation.reference_images=8", f"evaluation.cache_dir={tmp_path / 'cache'}",
                     "evaluation.g_batchnorm=batch", "evaluation.batch_size=3")
    assert train.main(argv) == 0
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["protocol"]["g_batchnorm"] == "batch" and record["protocol"]["g_batchnorm_batch_size"] == 3
    argv = tiny_argv(tmp_path / "few", 2, "evaluation_interval=2", "evaluation.n_samples=6", "evaluation.metrics=[fid]",
                     "evaluation.reference_images=8", f"evaluation.cache_dir={tmp_path / 'cache'}",
                     "evaluation.g_batchnorm=batch", "evaluation.batch_size=50")
    assert train.main(argv) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "few" / "metrics.jsonl").read_text().splitlines()]
    assert record["protocol"]["g_batchnorm_batch_size"] == 6, "6 samples are one batch of 6, not of 50"
