"""performance.step_graphs: D's and G's steps replayed as CUDA graphs. On a CPU the same static buffers and step
functions run without capture, so these tests check everything but the capture (the GPU benchmark compares a
captured run's losses with eager's)."""
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from source.config import ConfigError, load_config
from source.training.checkpoint import load_snapshot
from source.training.step_graphs import StepGraphs
from source.training.extension import read_losses
from test_gsr_training import ALL_TERMS
from test_training import CONFIGS, TINY, build_tiny_updater, tensors_equal, tiny_argv

GRAPHS = ["performance.step_graphs=true"]
# D accumulates 2 micro-batches, G 4; dynamic SR every 2 iterations; the learning rate decays from iteration 1
RECIPE = ["gen_batchsize=16", "updater.n_dis=2", "iteration_decay_start=1"]
# the gSR recipe's terms; LeCam (GAN form) starts at iteration 2, after D's capture at its 4th call in iteration 1
# (n_dis 2), so a switch frozen at the capture would never start it
GSR_TERMS = [t for t in ALL_TERMS if not t.startswith("updater.n_dis")] + ["updater.lecam.start_iteration=2"]
GSR_TERMS_GAN_FORM = [*GSR_TERMS, "updater.lecam.form=lecam"]


def test_step_graphs_train_bit_for_bit_as_eager_and_resume_exactly(tmp_path):
    """Static input buffers, data fetched before the step: the same 6 iterations as eager, also when the graphed run
    is stopped at 3 and resumed."""
    a, graphed = eager_and_graphed_snapshots(tmp_path, RECIPE)
    for name, b in graphed.items():
        assert tensors_equal(a["gen"], b["gen"]) and tensors_equal(a["dis"], b["dis"]), name
        for key in ("opt_gen", "opt_dis"):
            assert all(tensors_equal(a[key]["state"][p], b[key]["state"][p]) for p in a[key]["state"])
    assert (tmp_path / "eager" / "log.jsonl").read_text().count("loss_dis") == 6


def eager_and_graphed_snapshots(tmp_path, overrides: list[str]) -> tuple[dict, dict[str, dict]]:
    """The final snapshot of 6 eager iterations, and those of 6 with step graphs, straight and resumed at 3."""
    eager, graphed = tmp_path / "eager", tmp_path / "graphed"
    assert train.main(tiny_argv(eager, 6, *overrides)) == 0
    assert train.main(tiny_argv(graphed, 6, *overrides, *GRAPHS, "snapshot_interval=3")) == 0
    assert train.main(tiny_argv(tmp_path / "resumed", 6, *overrides, *GRAPHS, "snapshot_interval=3")
                      + ["--resume", str(graphed / "snapshots" / "snapshot_iter_3.pt")]) == 0
    final = {run.name: load_snapshot(run / "snapshots" / "snapshot_iter_6.pt", training_state=True)
             for run in (eager, graphed, tmp_path / "resumed")}
    return final.pop("eager"), final


@pytest.mark.parametrize("lecam_form", ["gsr", "lecam"])
def test_step_graphs_with_gsr_lecam_and_diffaugment_train_bit_for_bit_as_eager(tmp_path, lecam_form):
    """The gSR recipe's terms inside the steps: LeCam's switches by iteration come in as a device tensor (its
    start_iteration 2 falls after the captures would have happened), gSR's vectors and sigmas are written in place,
    DiffAugment's draws are step inputs; 6 iterations as eager, also stopped at 3 and resumed."""
    a, graphed = eager_and_graphed_snapshots(tmp_path, GSR_TERMS + [f"updater.lecam.form={lecam_form}", *RECIPE])
    for name, b in graphed.items():
        assert tensors_equal(a["gen"], b["gen"]) and tensors_equal(a["dis"], b["dis"]), name
        assert tensors_equal(a["updater"]["lecam"], b["updater"]["lecam"]), name
        for layer, vectors in a["updater"]["gsr"]["vectors"].items():
            assert tensors_equal(vectors, b["updater"]["gsr"]["vectors"][layer]), (name, layer)


def test_the_resume_artefacts_iteration_runs_eagerly_and_the_graphs_take_over_after_it(tmp_path, monkeypatch):
    """The collapse study's artefact arm under step graphs: the same branch as without them, and no step of the
    artefact's iteration goes to the graphs (its replicas are another computation than the one captured)."""
    first = tmp_path / "first"
    assert train.main(tiny_argv(first, 2)) == 0
    graphed_calls, run = [], StepGraphs.run

    def watched(graphs, name, update, inputs):
        graphed_calls.append((name, update.__self__.iteration, update.__self__.artefact is not None))
        return run(graphs, name, update, inputs)

    monkeypatch.setattr(StepGraphs, "run", watched)
    branches = []
    for name, extra in (("plain", []), ("graphed", GRAPHS)):
        out = tmp_path / name
        argv = ["--resume", str(first / "snapshots" / "snapshot_iter_2.pt"), "--out", str(out)]
        overrides = ["iteration=5", "updater.resume_artefact=branch", *extra]
        assert train.main(argv + [a for o in overrides for a in ("--set", o)]) == 0
        assert '"event": "resume_artefact"' in (out / "log.jsonl").read_text()
        branches.append(load_snapshot(out / "snapshots" / "snapshot_iter_5.pt"))
    assert tensors_equal(branches[0]["gen"], branches[1]["gen"]) and tensors_equal(branches[0]["dis"], branches[1]["dis"])
    assert not any(artefact for _, _, artefact in graphed_calls)
    assert {iteration for _, iteration, _ in graphed_calls} == {3, 4}  # the artefact's iteration 2 stays eager


def test_each_call_replays_on_its_own_inputs():
    graphs, seen = StepGraphs(torch.device("cpu")), []

    def step(inputs):
        seen.append(inputs)
        return inputs["z"] * 2 + (0 if inputs["labels"] is None else inputs["labels"])

    first = graphs.run("dis", step, {"z": torch.ones(3), "labels": None})
    second = graphs.run("dis", step, {"z": torch.arange(3.0), "labels": None})
    assert first.tolist() == [2, 2, 2] and second.tolist() == [0, 2, 4]
    assert seen[0] is seen[1], "one set of static buffers per step, refilled by each call"
    with pytest.raises(ValueError, match="the dis step's inputs changed their structure or shapes"):
        graphs.run("dis", step, {"z": torch.ones(4), "labels": None})


def test_the_schedule_fills_a_tensor_learning_rate_in_place():
    """A captured Adam reads the learning rate from device memory: rebinding it to a float would freeze it."""
    updater, _ = build_tiny_updater(*RECIPE, *GRAPHS, "iteration=4")
    rates = [group.__setitem__("lr", torch.tensor(group["lr"])) or group["lr"]
             for optimizer in (updater.opt_gen, updater.opt_dis) for group in optimizer.param_groups]
    for _ in range(3):
        updater.update()
    after = [group["lr"] for o in (updater.opt_gen, updater.opt_dis) for group in o.param_groups]
    assert all(mine is theirs for mine, theirs in zip(after, rates))  # the same tensors, filled in place
    assert rates[0].item() == pytest.approx(2e-4 * (1 - (2 - 1) / (4 - 1)))  # set before iteration 3
    assert updater.learning_rates()["lr_G"] == pytest.approx(rates[0].item())


@pytest.mark.parametrize("extra, world_size, message", [
    (["performance.amp=fp16"], 1, "performance.step_graphs: not with performance.amp fp16 (its loss scaler decides "
                                  "on the host)"),
    (["performance.compile=true", "performance.compile_mode=reduce-overhead"], 2,
     "not with world size 2 (DDP), compile_mode reduce-overhead (CUDA graphs of its own)"),
])
def test_what_a_step_graph_cannot_hold_is_a_config_error(extra, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS / "demo.yaml", TINY + GRAPHS + ["batchsize=16"] + extra, world_size=world_size)


def test_a_step_that_cannot_be_captured_stops_training_with_one_line(tmp_path, monkeypatch, capsys):
    """CUDA refuses some operations while capturing (a kernel's first launch, a recompile): the run stops with one
    line that says which step and what to do, not a traceback. The CUDA calls are stood in for on a CPU, the capture
    raising what CUDA raises."""
    from contextlib import nullcontext

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    init = StepGraphs.__init__
    monkeypatch.setattr(StepGraphs, "__init__", lambda self, device: init(self, device) or setattr(self, "capture", True))
    monkeypatch.setattr(StepGraphs, "_on_side_stream", lambda self, call: call())
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 6, *GRAPHS, "snapshot_interval=1")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step graphs: capturing the dis step failed (operation not permitted when " \
        "stream is capturing)" in err and "resume without performance.step_graphs" in err
    snapshots = sorted(path.name for path in (out / "snapshots").glob("snapshot_iter_*.pt"))
    assert snapshots == [f"snapshot_iter_{i}.pt" for i in (1, 2, 3)]  # n_dis 1: D's 4th call is iteration 4's


SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
           "aten.equal.default", "aten.allclose.default", "aten.masked_select.default", "aten.unique_dim.default",
           "aten._unique2.default"}  # they hand a value (or a data-dependent size) to the host


class Syncs(TorchDispatchMode):
    """Records the operators that would make the host wait for a GPU (``.tolist()`` on a CPU tensor escapes it)."""
    found: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCING:
            Syncs.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("terms", [["bn_batchsize=2"], GSR_TERMS_GAN_FORM], ids=["recipe", "gsr-lecam-diffaugment"])
def test_a_step_asks_the_device_nothing(terms):
    """A CUDA graph cannot hold a host synchronisation (an .item(), a data-dependent shape): D's and G's steps,
    SN's power steps, ghost BN and Adam included, and the gSR recipe's terms, must run without one."""
    Syncs.found = []
    updater, _ = build_tiny_updater(*RECIPE, *GRAPHS, *terms, "performance.fused_adam=true")
    run = updater.graphs.run
    calls = []

    def watched(name, update, inputs):
        calls.append(name)
        with Syncs():
            return run(name, update, inputs)

    updater.graphs.run = watched
    for _ in range(3):  # LeCam's GAN form is on from iteration 2
        updater.update()
    assert calls.count("dis") == 6 and calls.count("gen") == 3
    assert Syncs.found == []


@pytest.mark.parametrize("extra", [["updater.sr.mode=static"], ["updater.lecam.weight=0.1", "updater.ema.enabled=true",
                                                                "updater.ema.start_iteration=1", "bn_batchsize=2"]])
def test_an_eager_iteration_leaves_its_losses_on_the_device_and_asks_it_nothing(extra):
    """Between log lines the host only queues work (the small models keep a GPU busy only that way): a whole
    iteration, latents, data, SR, LeCam and the EMA included, asks the device nothing of ours (torch's eigh checks
    its own result on CUDA, below what this sees), and its losses come back as device tensors to read later."""
    Syncs.found = []
    updater, _ = build_tiny_updater(*RECIPE, "performance.fused_adam=true", *extra)
    losses = [updater.update()]  # outside: the first batch starts the loader (its seed is drawn on the CPU)
    with Syncs():
        losses += [updater.update() for _ in range(3)]  # SR at iterations 2 and 4; the epoch ends with iteration 4
    assert Syncs.found == []
    assert all(torch.is_tensor(value) and value.dim() == 0 for step in losses for value in step.values())
    assert all(math.isfinite(value) for step in read_losses(losses) for value in step.values())


# G's conv biases that feed a BatchNorm have a true gradient of 0: what they get is rounding noise, which Adam with
# beta1 0 turns into steps of about +-lr, so two runs that round differently walk them apart by up to a few lr
BN_CANCELLED_BIAS = re.compile(r"block\d+\.(c1|c2|c_sc)\.bias$")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs: run it on a GPU machine")
@pytest.mark.parametrize("extra", [[], ["performance.fused_adam=true"],
                                   ["performance.fused_adam=true", *GSR_TERMS_GAN_FORM]],
                         ids=["capturable-adam", "fused-adam", "gsr-lecam-diffaugment"])
def test_captured_steps_train_as_eager_on_a_gpu(extra):
    """The capture itself (a CPU cannot run it): 8 iterations, D accumulating 2 and G 4, dynamic SR editing D between
    replays, a decaying learning rate read by capturable (or fused) Adam; every step replays from its 4th call. The
    reference runs the same optimizer, learning-rate tensors and gradients (None at each step's start) eagerly, so
    only the capture differs: the same losses and weights to float tolerance, and the weights kept moving after the
    capture (a graph that did nothing would leave them). With the gSR recipe's terms, also LeCam's anchors."""
    from source.training import build, performance
    from source.training.distributed import World

    world = World(rank=0, local_rank=0, size=1, device=torch.device("cuda"))
    runs = []
    for captured in (False, True):
        config = load_config(CONFIGS / "demo.yaml", TINY + RECIPE + ["iteration=8", *GRAPHS, *extra])
        performance.configure_backends(config.performance, config.deterministic)
        models = build.build_models(config, world.device)
        updater = build.build_updater(config, world, models, build.build_batches(config, world))
        if not captured:
            updater.graphs = None
        losses = [updater.update() for _ in range(4)]
        middle = [p.detach().clone() for p in models.dis.parameters()]
        losses = read_losses(losses + [updater.update() for _ in range(4)])
        runs.append((losses, models, middle, updater))
    (eager, eager_models, _, _), (graphed, graphed_models, middle, updater) = runs
    assert set(updater.graphs.steps) == {"dis", "gen"} and all(s.graph is not None for s in updater.graphs.steps.values())
    for mine, theirs in zip(graphed, eager):
        assert mine == pytest.approx(theirs, rel=1e-3, abs=1e-4)
    for net in ("gen", "dis"):
        for (name, p), q in zip(getattr(graphed_models, net).named_parameters(), getattr(eager_models, net).parameters()):
            walks = net == "gen" and BN_CANCELLED_BIAS.search(name)
            torch.testing.assert_close(p, q, rtol=1e-3, atol=4e-3 if walks else 1e-4, msg=f"{net} {name}")
    assert any(not torch.equal(p, start) for p, start in zip(graphed_models.dis.parameters(), middle))
    graphed_terms, eager_terms = updater.terms, runs[0][3].terms
    if graphed_terms.lecam is not None:  # a frozen switch: the penalty never on, the losses differ from eager's
        for name in ("anchor_real", "anchor_fake"):
            torch.testing.assert_close(getattr(graphed_terms.lecam, name), getattr(eager_terms.lecam, name),
                                       rtol=1e-4, atol=1e-6)
    if graphed_terms.gsr is not None:  # vectors that replays did not carry on would part from eager's
        for layer, vectors in eager_terms.gsr.vectors.items():
            for name, vector in vectors.items():
                torch.testing.assert_close(graphed_terms.gsr.vectors[layer][name], vector, rtol=1e-4, atol=1e-6,
                                           msg=f"gSR {layer} {name}")
