"""The original's resume artefact (updater.resume_artefact; source/training/resume_artefact.py)."""
import json

import pytest
import torch
from torch import nn

import train
from source.config import ConfigError, load_config
from source.training import build, performance, resume
from source.training.checkpoint import load_snapshot
from source.training.distributed import World
from source.training.resume_artefact import ResumeArtefact, routed
from source.training.extension import read_losses
from test_training import CONFIGS, TINY, tiny_argv

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Tag(nn.Module):
    """Returns its inputs plus its own tag, so the caller sees which model took which rows."""

    def __init__(self, tag: float):
        super().__init__()
        self.tag, self.calls = tag, 0

    def forward(self, x, y):
        self.calls += 1
        return x + self.tag


def test_routing_gives_device_d_part_d_of_every_half_in_one_call():
    models = [Tag(0.0), Tag(100.0)]
    x = torch.arange(8.0).unsqueeze(1)  # halves [0..3] (real) and [4..7] (fake); parts of 2
    out = routed(models, x, None, halves=2)
    assert out.squeeze(1).tolist() == [0, 1, 102, 103, 4, 5, 106, 107]
    assert [m.calls for m in models] == [1, 1]
    with pytest.raises(ValueError, match="does not split into 4 equal parts"):
        routed(models, torch.zeros(6, 1), None, halves=2)


def one_update(config, artefact_from_current_models: bool):
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))
    models = build.build_models(config, world.device)
    updater = build.build_updater(config, world, models, build.build_batches(config, world, source="test"))
    if artefact_from_current_models:  # replicas equal to the models: the update must be the plain one
        updater.artefact = ResumeArtefact(models.gen, models.dis, devices=4, bn_batch=config.bn_batch)
    losses = read_losses([updater.update()])[0]
    return models, losses, updater.artefact


def test_with_replicas_equal_to_the_models_the_update_is_the_plain_one():
    # ghost BatchNorm groups of 2 = each device's part, so the plain run normalizes G as the 4 devices do
    config = load_config(CONFIGS / "demo.yaml", [*TINY, "micro_batchsize=8", "bn_batchsize=2", "updater.n_dis=2"])
    plain, plain_losses, _ = one_update(config, False)
    routed_models, routed_losses, left = one_update(config, True)
    assert left is None  # one iteration only
    assert routed_losses == pytest.approx(plain_losses, rel=1e-5)
    # G's gradients of its step (left in .grad), not its weights: Adam's first step turns the float noise of
    # gradients that BatchNorm cancels (the conv biases before it) into +-lr; D has no BatchNorm
    scale = max(float(p.grad.abs().max()) for p in plain.gen.parameters())
    for (name, p), q in zip(plain.gen.named_parameters(), routed_models.gen.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    for (name, p), q in zip(plain.dis.named_parameters(), routed_models.dis.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_branch_resume_takes_one_artefact_update_and_an_in_place_resume_none(tmp_path):
    first = tmp_path / "first"
    assert train.main(tiny_argv(first, 4)) == 0
    snapshot = first / "snapshots" / "snapshot_iter_2.pt"
    clean, artefact = tmp_path / "clean", tmp_path / "artefact"
    assert train.main(["--resume", str(snapshot), "--out", str(clean), "--set", "iteration=4"]) == 0
    assert train.main(["--resume", str(snapshot), "--out", str(artefact), "--set", "iteration=4", "--set",
                       "updater.resume_artefact=branch", "--set", "micro_batchsize=4"]) == 0
    events = [json.loads(line) for line in (artefact / "log.jsonl").read_text().splitlines()]
    assert {"iteration": 2, "event": "resume_artefact", "devices": 4} in events
    a, b = (load_snapshot(run / "snapshots" / "snapshot_iter_4.pt") for run in (clean, artefact))
    assert not torch.equal(a["dis"]["block1.c1.parametrizations.weight.original"],
                           b["dis"]["block1.c1.parametrizations.weight.original"])
    assert events.count({"iteration": 2, "event": "resume_artefact", "devices": 4}) == 1
    assert not any(e.get("event") == "resume_artefact" for e in map(json.loads, (clean / "log.jsonl").open()))


@pytest.mark.parametrize("setting, branch, applies", [("never", True, False), ("branch", True, True),
                                                      ("branch", False, False), ("every", False, True)])
def test_which_resumes_take_the_artefact(setting, branch, applies):
    config = load_config(CONFIGS / "demo.yaml", [*TINY, f"updater.resume_artefact={setting}"])
    models = build.build_models(config, torch.device("cpu"))
    artefact = resume.artefact(config, models, branch)
    assert (artefact is not None) == applies
    if applies:  # copies of the models as they are now, i.e. before a snapshot is loaded into them
        replica = artefact.replicas["dis"][0]
        assert replica is not models.dis and len(artefact.replicas["gen"]) == 3
        assert all(torch.equal(a, b) for a, b in zip(replica.state_dict().values(), models.dis.state_dict().values()))


def test_a_compiled_run_gets_replicas_that_run_their_own_weights_eagerly(monkeypatch):
    config = load_config(CONFIGS / "demo.yaml", [*TINY, "updater.resume_artefact=branch", "performance.compile=true"])
    models = build.build_models(config, torch.device("cpu"))
    for model in (models.gen, models.dis):
        performance.prepare_model(model, config.performance)
    artefact = resume.artefact(config, models, branch=True)
    replica = artefact.replicas["dis"][0]
    assert models.dis._compiled_call_impl is not None and replica._compiled_call_impl is None

    def original_forward(*args):
        raise AssertionError("a replica called the original D")

    monkeypatch.setattr(models.dis, "forward", original_forward)
    images = torch.randn(2, 1, 32, 32)
    assert replica(images, torch.tensor([0, 1])).shape == (2,)


def test_settings_the_artefact_cannot_run_with_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="resume_artefact: needs resume_artefact_devices >= 2 dividing micro"):
        load_config(CONFIGS / "demo.yaml", ["updater.resume_artefact=every", "micro_batchsize=6", "batchsize=6"])
    with pytest.raises(ConfigError, match="one process"):
        load_config(CONFIGS / "demo.yaml", ["updater.resume_artefact=every", "batchsize=64"], world_size=2)
