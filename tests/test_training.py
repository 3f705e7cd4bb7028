"""The training pipeline through train.py: run folder, exact resume, accumulation, DDP, stops."""
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import train
import updater as updater_module
from source.config import load_config
from source.models import build_model
from source.training import build, resume
from source.training.checkpoint import load_snapshot
from source.training.distributed import World
from source.training.phases import AUGMENT_STREAM, G_PHASE, mixed_seed
from source.training.runlog import read_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

# A tiny class-conditional model on synthetic data: 2 accumulation steps, SN in G, dynamic SR every 2.
TINY = ["dataset.name=synthetic", "dataset.args.count=64", "dataset.args.n_classes=3",
        "models.generator.args.ch=8", "models.discriminator.args.ch=8",
        "models.generator.args.n_classes=3", "models.discriminator.args.n_classes=3",
        "batchsize=8", "micro_batchsize=4", "num_workers=0", "deterministic=true",
        "display_interval=1", "preview_interval=1000", "updater.apply_SR=true", "updater.sr.interval=2"]


def tiny_argv(out: Path, iterations: int, *extra: str) -> list[str]:
    overrides = TINY + [f"iteration={iterations}", f"snapshot_interval={max(1, iterations // 2)}", *extra]
    return ["--config", str(CONFIGS / "demo.yaml"), "--out", str(out)] + [a for o in overrides for a in ("--set", o)]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 4)) == 0
    assert (out / "config.yaml").is_file() and (out / "samples" / "latest.png").is_file()
    assert sorted(p.name for p in (out / "snapshots").glob("*.pt")) == [
        "generator_iter_2.pt", "generator_iter_4.pt", "snapshot_iter_2.pt", "snapshot_iter_4.pt"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_dis" in r]
    assert [r["iteration"] for r in losses] == [1, 2, 3, 4]
    assert any(r.get("event") == "sr_start" for r in records)
    snapshot = load_snapshot(out / "snapshots" / "snapshot_iter_4.pt")
    assert snapshot["iteration"] == 4 and snapshot["updater"]["sr"]["ratios"], "SR state must be saved"
    assert any(k.endswith("_u") for k in snapshot["dis"]), "SN u vectors must be saved"


def test_resume_is_bit_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(tiny_argv(straight, 6)) == 0
    argv = tiny_argv(resumed, 6) + ["--resume", str(straight / "snapshots" / "snapshot_iter_3.pt")]
    assert train.main(argv) == 0
    a = load_snapshot(straight / "snapshots" / "snapshot_iter_6.pt")
    b = load_snapshot(resumed / "snapshots" / "snapshot_iter_6.pt")
    assert tensors_equal(a["gen"], b["gen"]) and tensors_equal(a["dis"], b["dis"])
    for key in ("opt_gen", "opt_dis"):
        for p in a[key]["state"]:
            assert tensors_equal(a[key]["state"][p], b[key]["state"][p])
    assert a["data"] == b["data"]
    assert all(torch.equal(a["updater"]["sr"]["ratios"][k], b["updater"]["sr"]["ratios"][k])
               for k in a["updater"]["sr"]["ratios"])


def test_a_snapshot_from_before_a_new_config_key_shows_no_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 4)) == 0
    path = run / "snapshots" / "snapshot_iter_2.pt"
    snapshot = torch.load(path, weights_only=True)
    del snapshot["config"]["gen_batchsize"]  # as written by a version without the key
    torch.save(snapshot, path)
    capsys.readouterr()
    assert train.main(tiny_argv(tmp_path / "resumed", 4) + ["--resume", str(path)]) == 0
    assert "config change" not in capsys.readouterr().out


def test_resumed_log_line_averages_the_same_iterations(tmp_path):
    """A snapshot between two log lines keeps the losses observed since the last one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(tiny_argv(straight, 6, "display_interval=4")) == 0
    argv = tiny_argv(resumed, 6, "display_interval=4") + ["--resume", str(straight / "snapshots" / "snapshot_iter_3.pt")]
    assert train.main(argv) == 0

    def losses_at_4(run):
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return next((r["loss_dis"], r["loss_gen"]) for r in records if r["iteration"] == 4 and "loss_dis" in r)

    assert losses_at_4(resumed) == losses_at_4(straight)


def test_resume_with_changed_config_branches_and_prints_differences(tmp_path, capsys):
    run = tmp_path / "sn"
    assert train.main(tiny_argv(run, 2, "updater.apply_SR=false")) == 0
    capsys.readouterr()
    argv = tiny_argv(run, 4)  # apply_SR back to true
    argv = [a for a in argv if a not in ("--out", str(run))] + ["--resume", str(run / "snapshots" / "snapshot_iter_2.pt")]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "updater.apply_SR: false -> true" in out
    branch = tmp_path / "sn-resume2"
    assert (branch / "snapshots" / "snapshot_iter_4.pt").is_file()
    assert not (run / "snapshots" / "snapshot_iter_4.pt").exists(), "the parent run must not be overwritten"
    events = [json.loads(line) for line in (branch / "log.jsonl").read_text().splitlines()]
    assert {"iteration": 2, "event": "sr_start", "mode": "dynamic"} in events


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist (make data)")
def test_a_run_moved_to_a_machine_with_its_data_elsewhere_continues_in_place_as_it_would_have(tmp_path, capsys):
    """A standard data set's location is not the recipe: a resume that changes only its ``dataset.args.root``
    continues the run in place (the change printed and logged) and computes what the run computed; any other change
    still branches, and so does a folder of images' root."""
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for path in FASHION_MNIST.parent.iterdir():
        (moved / path.name).symlink_to(path)
    run = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "demo.yaml"), "--out", str(run)] + [
        a for o in ("models.generator.args.ch=8", "models.discriminator.args.ch=8", "batchsize=8",
                    "micro_batchsize=8", "num_workers=0", "deterministic=true", "iteration=4", "snapshot_interval=2",
                    "preview_interval=1000") for a in ("--set", o)]
    assert train.main(argv) == 0
    straight = load_snapshot(run / "snapshots" / "snapshot_iter_4.pt")
    for path in (run / "snapshots").glob("*_iter_4.pt"):
        path.unlink()  # the run as a stop after iteration 2 left it, now on a machine with the data in `moved`
    orphan = run / "snapshots" / "generator_iter_3.pt"  # as a second signal while a stop at 3 wrote its snapshot
    shutil.copy(run / "snapshots" / "generator_iter_2.pt", orphan)
    capsys.readouterr()
    resuming = ["--resume", str(run / "snapshots" / "snapshot_iter_2.pt"), "--set", f"dataset.args.root={moved}"]
    assert train.main(argv + resuming) == 0
    assert f"dataset.args.root: {FASHION_MNIST.parent} -> {moved}" in capsys.readouterr().out
    continued = load_snapshot(run / "snapshots" / "snapshot_iter_4.pt")
    assert tensors_equal(continued["gen"], straight["gen"]) and tensors_equal(continued["dis"], straight["dis"])
    assert not orphan.exists()  # the export of a timeline the resume replaced
    assert continued["data"] == straight["data"] and not list(tmp_path.glob("run-*"))
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" and f"{moved}" in " ".join(e["changes"]) for e in events)
    argv = [a for a in argv if a not in ("--out", str(run))]
    assert train.main(argv + resuming + ["--set", "adam_D.alpha=0.001"]) == 0  # a recipe change too: a branch
    assert (tmp_path / "run-resume2" / "snapshots" / "snapshot_iter_4.pt").is_file()
    moving = ["dataset.args.root: /data/a -> /data/b"]  # a folder of images: its root says which images
    assert resume.recipe_changes(moving, "imagenet") == moving and resume.recipe_changes(moving, "cifar10") == []


def test_resume_from_a_snapshot_outside_its_run_folder_branches_into_results(tmp_path, monkeypatch):
    """Even with the config unchanged (which would continue RUN in place): the copy's run is unknown."""
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 4)) == 0
    copy = tmp_path / "elsewhere" / "copied.pt"
    copy.parent.mkdir()
    copy.write_bytes((run / "snapshots" / "snapshot_iter_2.pt").read_bytes())
    (run / "snapshots" / "snapshot_iter_4.pt").unlink()
    monkeypatch.chdir(tmp_path)
    argv = [a for a in tiny_argv(run, 4) if a not in ("--out", str(run))] + ["--resume", str(copy)]
    assert train.main(argv) == 0
    assert (tmp_path / "results" / "demo-resume2" / "snapshots" / "snapshot_iter_4.pt").is_file()
    assert not (tmp_path / "snapshots").exists() and not (run / "snapshots" / "snapshot_iter_4.pt").exists()


def test_unusable_resume_files_are_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(tiny_argv(run, 2)) == 0
    torn = tmp_path / "torn.pt"
    torn.write_bytes((run / "snapshots" / "snapshot_iter_2.pt").read_bytes()[:5000])
    cases = [(run / "snapshots" / "generator_iter_2.pt", [], "holds the generator only"),
             (torn, [], "is not a readable snapshot"),
             (run / "snapshots" / "snapshot_iter_2.pt", ["models.discriminator.args.ch=16"],
              "does not fit the configured models")]
    for path, extra, message in cases:
        capsys.readouterr()
        assert train.main(tiny_argv(tmp_path / "resumed", 4, *extra) + ["--resume", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def build_tiny_updater(*overrides: str):
    config = load_config(CONFIGS / "demo.yaml", TINY + list(overrides))
    world = World(rank=0, local_rank=0, size=1, device=torch.device("cpu"))
    models = build.build_models(config, world.device)
    return build.build_updater(config, world, models, build.build_batches(config, world)), models


def test_the_logged_d_loss_is_the_mean_over_the_d_steps(monkeypatch):
    upd, _ = build_tiny_updater("updater.n_dis=3")
    d_losses = iter([torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]), torch.tensor([6.0, 0.0])])
    monkeypatch.setattr(upd, "_dis_step", lambda step: next(d_losses))
    monkeypatch.setattr(upd, "_regularize", lambda: None)
    monkeypatch.setattr(upd, "_gen_step", lambda: torch.zeros(2))
    assert upd.update()["loss_dis"].item() == 3.0


def test_each_phase_of_each_iteration_and_seed_draws_its_own_latents():
    """The seed of a phase's draws mixes (seed, iteration, phase) without collisions: a plain sum gave iteration 1's
    first D step the latents of iteration 0's second, so D saw the same fakes twice."""
    phases = (0, 1, 2, G_PHASE, G_PHASE + AUGMENT_STREAM)
    assert len({mixed_seed(s, i, p) for s in range(3) for i in range(50) for p in phases}) == 3 * 50 * len(phases)
    upd, models = build_tiny_updater()
    draws = {(i, p): upd.draws.latents(models.gen, i, p, 8)[0] for i in (0, 1) for p in (0, 1)}
    assert not torch.equal(draws[1, 0], draws[0, 1]) and not torch.equal(draws[0, 0], draws[0, 1])
    assert torch.equal(draws[1, 0], upd.draws.latents(models.gen, 1, 0, 8)[0])


def test_models_are_a_function_of_the_seed_whatever_ran_before():
    """Every process (rank, benchmark worker, study run) starts from the same models: an unseeded build once made the
    GPU benchmark compare runs that started from different weights."""
    config = load_config(CONFIGS / "demo.yaml", TINY)
    first = build.build_models(config, torch.device("cpu"))
    torch.rand(1000)  # whatever else consumed random numbers before the build
    second = build.build_models(config, torch.device("cpu"))
    other = build.build_models(load_config(CONFIGS / "demo.yaml", TINY + ["seed=1"]), torch.device("cpu"))
    for name in ("gen", "dis"):
        mine, again, theirs = (getattr(models, name).state_dict() for models in (first, second, other))
        assert tensors_equal(mine, again)  # weights and SN's u alike
        assert not tensors_equal(mine, theirs)


@pytest.mark.parametrize("order, expected", [
    ("d_first", ["D0", "SR", "G", "D1", "SR", "D2", "SR"]),  # SRGANs: G inside the D loop after D step 0
    ("g_first", ["G", "D0", "SR", "D1", "SR", "D2", "SR"]),  # sngan_projection
])
def test_step_order_within_an_iteration(monkeypatch, order, expected):
    upd, _ = build_tiny_updater("updater.n_dis=3", f"updater.order={order}")
    calls = []
    monkeypatch.setattr(upd, "_dis_step", lambda step: calls.append(f"D{step}") or torch.zeros(2))  # loss, LeCam
    monkeypatch.setattr(upd, "_regularize", lambda: calls.append("SR"))
    monkeypatch.setattr(upd, "_gen_step", lambda: calls.append("G") or torch.zeros(2))  # loss, gSR
    upd.update()
    assert calls == expected


@pytest.mark.parametrize("augment", [[], ["updater.diffaugment=color,translation,cutout"]], ids=["plain", "diffaugment"])
def test_accumulation_matches_one_big_batch_for_D(tmp_path, augment):
    """One D step on a batch of 64 equals two accumulated micro-batches of 32 (G in eval mode: no BN coupling);
    with DiffAugment each image keeps its draw (a fake's is at its position after the batch's reals)."""
    params = []
    for micro in (64, 32):
        upd, models = build_tiny_updater("batchsize=64", f"micro_batchsize={micro}", *augment)
        models.gen.eval()
        assert upd.accumulation == 64 // micro
        upd._dis_step(0)
        params.append({k: v.clone() for k, v in models.dis.state_dict().items()})
        params.append({n: p.grad.clone() for n, p in models.dis.named_parameters()})
    (big, big_grad), (small, small_grad) = (params[0], params[1]), (params[2], params[3])
    for name in big_grad:
        torch.testing.assert_close(small_grad[name], big_grad[name], rtol=1e-3, atol=1e-5)  # float32 sums in another order
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train.main(argv) == 0
    end_finished_rank()


def end_finished_rank() -> None:
    """Leave a spawned rank whose run has finished (its files written, its process group destroyed) without the
    interpreter's teardown: there a gloo rank aborted now and then under heavy load ("terminate called without an
    active exception", twice in five suites run two at a time on 2026-11-29), after everything the tests check."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_processes_match_single_process(tmp_path, ranks_threads, capfd):
    """2 gloo ranks x 1 micro-batch = 1 process x 2 accumulated micro-batches, for full D+G iterations.

    Every snapshot also checks that all ranks hold bit-identical parameters (it raises otherwise)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert train.main(tiny_argv(single, 3)) == 0
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_argv(ddp, 3)), nprocs=2, join=True)
    # the demo's channels_last: the 1x1 shortcut kernels' strides, not a layout mismatch (build.wrap_distributed)
    assert "Grad strides do not match bucket view strides" not in capfd.readouterr().err
    a = load_snapshot(single / "snapshots" / "snapshot_iter_3.pt")
    b = load_snapshot(ddp / "snapshots" / "snapshot_iter_3.pt")
    assert len(b["rng"]) == 2, "every rank's RNG state is saved"
    # atol: a tenth of the net's Adam step (its lr: G 2e-4, D 4e-4). The summation orders may differ, and with
    # beta1 = 0 Adam steps each weight by about lr x sign(g), so a weight whose gradient is near 0 turns rounding into
    # part of a step (G's l1 weights differed by 1.2e-5 on an AVX-512 Xeon and on an AMD EPYC, D's block2.c1 by
    # 2.2e-5 on the EPYC; the reference on two threads). Without the all-reduce (each rank stepping on its own
    # micro-batch) weights differ by whole steps.
    for net, spec, adam in (("gen", "generator", "adam_G"), ("dis", "discriminator", "adam_D")):
        step = a["config"][adam]["alpha"]
        for key in ddp_comparable_keys(a, net, spec):
            torch.testing.assert_close(b[net][key], a[net][key], rtol=1e-5, atol=step / 10)


def ddp_comparable_keys(snapshot: dict, net: str, spec: str, small_gradients: tuple[str, ...] = ()) -> list[str]:
    """State entries of ``net`` that a DDP run and a single-process run must agree on.

    ``small_gradients``: name prefixes of parameters whose gradients are tiny but real (still compared)."""
    model = build_model(snapshot["config"]["models"][spec]["name"], snapshot["config"]["models"][spec]["args"])
    names = [name for name, _ in model.named_parameters()]
    second_moments = snapshot[f"opt_{net}"]["state"]
    # A bias feeding a BatchNorm has an analytically zero gradient; Adam turns its rounding noise
    # (|g| < 1e-7, against > 1e-3 for the others) into +-lr steps, so such parameters cannot agree and are left out.
    noise_driven = {names[i] for i, st in second_moments.items()
                    if st["exp_avg_sq"].max() < 1e-10 and not names[i].startswith(small_gradients)}
    assert all(name.endswith(".bias") for name in noise_driven)
    # BN running statistics are per process (rank 0's are saved), as the original's per-replica BN.
    return [k for k in snapshot[net] if "running_" not in k and "num_batches" not in k and k not in noise_driven]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "train.py", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=CONFIGS.parent, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_command_line_trains_and_reports_config_errors_once(tmp_path):
    out = tmp_path / "run"
    done = _torchrun(*tiny_argv(out, 2, "evaluation.metrics=[]"))
    assert done.returncode == 0, done.stderr[:3000]  # the first error, not torchrun's summary
    assert "global batch 8 = 4 (micro) x 2 (world size) x 1 (accumulation steps)" in done.stdout
    assert len(load_snapshot(out / "snapshots" / "snapshot_iter_2.pt")["rng"]) == 2
    failed = _torchrun("--config", str(CONFIGS / "demo.yaml"), "--set", "updater.n_dsi=3")
    assert failed.returncode != 0
    # rank 0 alone prints it (if torchrun has not stopped it first); torchrun's summary quotes each worker's record
    said = "error: --set updater.n_dsi: unknown key (did you mean 'n_dis'?)"
    assert failed.stderr.splitlines().count(said) <= 1 and f"traceback : {said}" in failed.stderr


def test_nan_loss_stops_without_overwriting_snapshot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 8, "snapshot_interval=2")) == 0
    good = (out / "snapshots" / "snapshot_iter_2.pt").read_bytes()
    original = updater_module.Updater.update

    def poisoned(self):
        observation = original(self)
        return {**observation, "loss_dis": torch.tensor(float("nan"))} if self.iteration == 4 else observation

    monkeypatch.setattr(updater_module.Updater, "update", poisoned)
    for path in (out / "snapshots").glob("*_iter_[468].pt"):
        path.unlink()  # the run as a crash after iteration 2 left it; resumed in place below
    code = train.main(tiny_argv(out, 8, "snapshot_interval=2") + ["--resume", str(out / "snapshots" / "snapshot_iter_2.pt")])
    err = capsys.readouterr().err
    assert code == 1 and "loss_dis=nan at iteration 4" in err and "snapshot_iter_2.pt" in err
    assert (out / "snapshots" / "snapshot_iter_2.pt").read_bytes() == good
    assert not (out / "snapshots" / "snapshot_iter_4.pt").exists()


def test_the_losses_are_read_once_per_log_line_and_a_nan_is_still_placed_exactly(tmp_path, monkeypatch, capsys):
    """Reading a loss makes the host wait for the device, so the trainer reads the iterations since the last log line
    all at once: the log's means are those of a run that read every iteration, and a NaN among the unread
    iterations is reported at its own iteration before any snapshot is written."""
    from source.training import trainer as trainer_module
    every = tmp_path / "every"
    assert train.main(tiny_argv(every, 8, "display_interval=1", "snapshot_interval=8")) == 0
    reads, read = [], trainer_module.read_losses
    monkeypatch.setattr(trainer_module, "read_losses", lambda losses: reads.append(len(losses)) or read(losses))
    batched = tmp_path / "batched"
    assert train.main(tiny_argv(batched, 8, "display_interval=4", "snapshot_interval=8")) == 0
    assert reads == [4, 4]
    lines = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                    if "loss_dis" in line] for name in ("every", "batched")}
    assert [line["iteration"] for line in lines["batched"]] == [4, 8]
    for line, first in zip(lines["batched"], (0, 4)):
        for key in ("loss_dis", "loss_gen"):
            assert line[key] == pytest.approx(np.mean([e[key] for e in lines["every"][first:first + 4]]), rel=1e-6)

    original = updater_module.Updater.update
    monkeypatch.setattr(updater_module.Updater, "update", lambda self: {
        **original(self), **({"loss_gen": torch.tensor(float("inf"))} if self.iteration == 3 else {})})
    capsys.readouterr()
    assert train.main(tiny_argv(tmp_path / "poisoned", 8, "display_interval=4", "snapshot_interval=4")) == 1
    assert "loss_gen=inf at iteration 3" in capsys.readouterr().err
    assert not list((tmp_path / "poisoned" / "snapshots").glob("snapshot_iter_*.pt"))


def test_a_nan_that_breaks_sr_before_its_loss_is_read_is_still_reported_as_divergence(tmp_path, monkeypatch, capsys):
    """A NaN weight after iteration 2 makes iteration 3's losses NaN, and SR's SVD (iteration 5) fails on it before
    the next log line reads them: the run still stops with "diverged ... at iteration 3", not SR's traceback."""
    original = updater_module.Updater.update

    def breaks_d(self):
        losses = original(self)
        if self.iteration == 2:
            with torch.no_grad():
                next(self.dis_module.parameters()).view(-1)[0] = float("nan")
        return losses

    monkeypatch.setattr(updater_module.Updater, "update", breaks_d)
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 8, "updater.sr.interval=5", "display_interval=8", "snapshot_interval=8")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training diverged: loss_dis=nan" in err and "at iteration 3" in err


def interrupt_after_iteration(monkeypatch, iteration: int, signals: int) -> None:
    """``signals`` SIGINTs (Ctrl-C) right after training iteration ``iteration``."""
    original = updater_module.Updater.update

    def interrupted(self):
        observation = original(self)
        for _ in range(signals if self.iteration == iteration else 0):
            os.kill(os.getpid(), signal.SIGINT)
        return observation

    monkeypatch.setattr(updater_module.Updater, "update", interrupted)


def test_sigint_writes_snapshot_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt_after_iteration(monkeypatch, 3, signals=1)
    assert train.main(tiny_argv(out, 100)) == 0
    assert (out / "snapshots" / "snapshot_iter_3.pt").is_file()
    assert "--resume" in capsys.readouterr().out


def test_a_second_stop_signal_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt_after_iteration(monkeypatch, 3, signals=2)  # a second Ctrl-C right after the first
    assert train.main(tiny_argv(out, 100, "snapshot_interval=2")) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"stopped at once with 3 iterations done, without writing a snapshot; resume with --resume "
        f"{out / 'snapshots' / 'snapshot_iter_2.pt'}")
    assert not (out / "snapshots" / "snapshot_iter_3.pt").exists()


def test_a_stop_during_an_evaluation_right_after_a_snapshot_does_not_write_it_again(tmp_path, monkeypatch, capsys):
    from source.training.evaluate import Evaluate

    def signalled(self, trainer):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Evaluate, "__call__", signalled)
    out = tmp_path / "run"
    assert train.main(tiny_argv(out, 100, "evaluation_interval=2", "snapshot_interval=2")) == 0
    snapshot = out / "snapshots" / "snapshot_iter_2.pt"
    console = capsys.readouterr().out
    assert console.count(f"snapshot -> {snapshot}") == 1
    assert "stopping on SIGINT: its snapshot is written at iteration 2" in console
    assert console.strip().splitlines()[-1] == f"stopped at iteration 2; resume with --resume {snapshot}"
    assert load_snapshot(snapshot, training_state=True)["iteration"] == 2


def test_a_crash_during_an_evaluation_loses_no_training(tmp_path, monkeypatch):
    """The snapshot due at an evaluation's iteration is written before it (an evaluation can take minutes and run out
    of memory)."""
    from source.training.evaluate import Evaluate

    def out_of_memory(self, trainer):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(Evaluate, "__call__", out_of_memory)
    out = tmp_path / "run"
    argv = tiny_argv(out, 4, "evaluation_interval=2", "snapshot_interval=2")
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main(argv)
    assert (out / "snapshots" / "snapshot_iter_2.pt").is_file()
    # continued in place, the run measures iteration 2 first, which the crash left without a row; a finished run
    # resumed again measures nothing twice
    evaluated = []

    def evaluation(self, trainer):
        evaluated.append(trainer.iteration)
        trainer.log.write({"iteration": trainer.iteration}, file="metrics.jsonl")

    monkeypatch.setattr(Evaluate, "__call__", evaluation)
    assert train.main(argv + ["--resume", str(out / "snapshots" / "snapshot_iter_2.pt")]) == 0
    assert train.main(argv + ["--resume", str(out / "snapshots" / "snapshot_iter_4.pt")]) == 0
    assert evaluated == [2, 4]


def test_a_stop_signal_during_a_long_extension_says_it_waits_for_it(tmp_path, monkeypatch, capfd):
    """Ctrl-C while an evaluation runs: the run finishes that (minutes, maybe), not another iteration."""
    from source.training.extensions import Preview

    original = Preview.__call__

    def signalled(self, trainer):
        os.kill(os.getpid(), signal.SIGINT)
        original(self, trainer)

    monkeypatch.setattr(Preview, "__call__", signalled)
    monkeypatch.setattr(Preview, "takes_long", "the preview")
    assert train.main(tiny_argv(tmp_path / "run", 100, "preview_interval=3", "snapshot_interval=2")) == 0
    err = capfd.readouterr().err
    assert (f"SIGINT received: finishing the preview at iteration 3 (it can take minutes), then writing a snapshot "
            f"(a second one stops at once, without; the latest is {tmp_path / 'run/snapshots/snapshot_iter_2.pt'})"
            in err)


def test_a_stop_signal_while_the_snapshot_is_written_names_the_evaluation_still_to_come(tmp_path, monkeypatch, capfd):
    """The snapshot due at an evaluation's iteration comes first: a signal while it is written waits for the evaluation
    of that iteration (not a next iteration), and the snapshot is not written again."""
    from source.training.extensions import Snapshot
    from source.training.extension import Extension

    class Evaluation(Extension):
        interval, takes_long, reads_losses = 2, "the evaluation", False
        done = []

        def __call__(self, trainer):
            self.done.append(trainer.iteration)
            time.sleep(0.5 if trainer.iteration == 2 else 0)

    written = Snapshot.__call__

    def signalled(self, trainer):
        written(self, trainer)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Snapshot, "__call__", signalled)
    make_extensions = train.make_extensions
    monkeypatch.setattr(train, "make_extensions", lambda *args: [*make_extensions(*args), Evaluation()])
    argv = tiny_argv(tmp_path / "run", 4, "snapshot_interval=2")
    assert train.main(argv) == 0
    snapshot = tmp_path / "run" / "snapshots" / "snapshot_iter_2.pt"
    err = capfd.readouterr().err
    assert (f"SIGINT received: finishing the evaluation at iteration 2 (it can take minutes); its snapshot is written "
            f"({snapshot}; a second one stops at once)") in err
    assert Evaluation.done == [2]
    # resumed, the run's elapsed time keeps the evaluation's half second that ran after the snapshot
    monkeypatch.setattr(Snapshot, "__call__", written)
    assert train.main(argv + ["--resume", str(snapshot)]) == 0
    log = read_jsonl(tmp_path / "run" / "log.jsonl")
    stopped = next(r["elapsed"] for r in log if r.get("event") == "interrupted")
    assert load_snapshot(snapshot)["elapsed"] < stopped - 0.4 and stopped < next(
        r["elapsed"] for r in log if r.get("iteration") == 3 and "loss_dis" in r)


TWO_SYNSETS = ["models.generator.args.n_classes=2", "models.discriminator.args.n_classes=2"]  # make_jpeg_folder's


def make_jpeg_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        (root / synset).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / synset / f"{synset}_{i}.JPEG")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).convert("CMYK").save(
        root / "n01440764" / "cmyk.JPEG")
    Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8)).save(root / "n01443537" / "gray.JPEG")
    (root / "n01443537" / "corrupt.JPEG").write_bytes(b"not a jpeg")


def test_sr_imagenet_config_trains_two_iterations_on_a_jpeg_folder(tmp_path):
    root, out = tmp_path / "imagenet", tmp_path / "run"
    make_jpeg_folder(root)
    overrides = [f"dataset.args.root={root}", "models.generator.args.ch=2", "models.discriminator.args.ch=2",
                 *TWO_SYNSETS, "batchsize=4", "micro_batchsize=2", "iteration=2", "num_workers=0",
                 "snapshot_interval=2"]
    config = ["--config", str(CONFIGS / "sr_imagenet.yaml")]
    thousand = [a for o in overrides if o not in TWO_SYNSETS for a in ("--set", o)]
    assert train.main(config + ["--out", str(tmp_path / "refused")] + thousand) == 2  # the config's 1000 classes
    assert not (tmp_path / "refused").exists()  # on 2 synsets: labels no real image has
    assert train.main(config + ["--out", str(out)] + [a for o in overrides for a in ("--set", o)]) == 0
    snapshot = load_snapshot(out / "snapshots" / "snapshot_iter_2.pt")
    assert snapshot["config"]["dataset"]["args"]["root"] == str(root)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_dis" in r]
    assert losses[-1]["unreadable_images"] == 1, "the corrupt JPEG (all 8 images were read) is counted in the log"
    assert snapshot["gen"]["block2.b1.gamma.weight"].shape[0] == 2


def test_ddp_log_counts_unreadable_images_of_every_rank(tmp_path, ranks_threads):
    """At seed 2 the corrupt JPEG falls in rank 1's shard: rank 0, which writes the log, never meets it."""
    root, out = tmp_path / "imagenet", tmp_path / "run"
    make_jpeg_folder(root)
    overrides = [f"dataset.args.root={root}", "models.generator.args.ch=2", "models.discriminator.args.ch=2",
                 *TWO_SYNSETS, "batchsize=4", "micro_batchsize=2", "iteration=2", "num_workers=0",
                 "snapshot_interval=2", "evaluation.metrics=[]", "seed=2"]
    argv = ["--config", str(CONFIGS / "sr_imagenet.yaml"), "--out", str(out)] + [
        a for o in overrides for a in ("--set", o)]
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    losses = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss_dis" in r]
    assert losses[-1]["unreadable_images"] == 1


def test_cifar_config_trains_with_static_SR_on_a_cifar_folder(tmp_path):
    from test_datasets import write_cifar_standin

    root, out = tmp_path / "cifar", tmp_path / "run"
    write_cifar_standin(root)
    overrides = [f"dataset.args.root={root}", "dataset.args.download=false", "models.generator.args.ch=8",
                 "models.discriminator.args.ch=8", "batchsize=8", "gen_batchsize=16", "micro_batchsize=4",
                 "iteration=1", "num_workers=0", "snapshot_interval=1", "evaluation.metrics=[]"]
    argv = ["--config", str(CONFIGS / "cifar" / "sr_cifar10.yaml"), "--out", str(out)] + [
        a for o in overrides for a in ("--set", o)]
    assert train.main(argv) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"iteration": 0, "event": "sr_start", "mode": "static"} in events
    dis = load_snapshot(out / "snapshots" / "snapshot_iter_1.pt")["dis"]
    assert "l5.bias" not in dis, "SRDiscriminator's head has no bias"
    convs = [k for k in dis if k.endswith("weight.original") and dis[k].dim() == 4]
    assert len(convs) == 10
    for name in convs:  # static SR ran after the last D step: norm 1, top half of the spectrum at 1
        s = torch.linalg.svdvals(dis[name].double().flatten(1))
        torch.testing.assert_close(s[: len(s) // 2], torch.ones(len(s) // 2, dtype=torch.float64))


def test_gen_batchsize_sets_the_G_step_batch(tmp_path):
    """G first, so D is still at init: batch 32 with gen_batchsize 64 gives the G update of batch 64."""
    def gen_after_one_step(*overrides):
        upd, models = build_tiny_updater("updater.order=g_first", "micro_batchsize=32", "updater.apply_SR=false",
                                         *overrides)
        upd._gen_step()
        return upd.gen_accumulation, models.gen.state_dict()

    accumulation, wide = gen_after_one_step("batchsize=32", "gen_batchsize=64")
    _, reference = gen_after_one_step("batchsize=64")
    _, narrow = gen_after_one_step("batchsize=32")
    assert accumulation == 2
    assert tensors_equal(wide, reference) and not tensors_equal(wide, narrow)


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist (make data)")
def test_demo_config_runs_a_few_iterations(tmp_path):
    out = tmp_path / "demo"
    argv = ["--config", str(CONFIGS / "demo.yaml"), "--out", str(out), "--set", "iteration=3",
            "--set", "display_interval=1"]
    assert train.main(argv) == 0
    assert (out / "snapshots" / "snapshot_iter_3.pt").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) >= 3


def test_apply_SR_auto_switches_on_at_a_detected_collapse(tmp_path, monkeypatch, capsys):
    from source.spectral.spectra import LayerSpectrum
    from source.training import extensions

    calls = []

    def collapsing_spectra(module):
        """The real spectra, with D's lower singular values crushed from the third snapshot on."""
        spectra = extensions.compute_spectra.__wrapped__(module)
        calls.append(module)
        if len(calls) >= 6 and module is calls[1]:  # third snapshot, discriminator
            spectra = {n: LayerSpectrum(s.kind, np.r_[s.singular_values[:1], s.singular_values[1:] * 0.1], s.sigma_hat)
                       for n, s in spectra.items()}
        return spectra

    collapsing_spectra.__wrapped__ = extensions.compute_spectra
    monkeypatch.setattr(extensions, "compute_spectra", collapsing_spectra)
    out = tmp_path / "auto"
    assert train.main(tiny_argv(out, 8, "updater.apply_SR=auto", "spectra_interval=2", "snapshot_interval=100")) == 0
    assert "SPECTRAL COLLAPSE at iteration 6" in capsys.readouterr().out
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if "event" in e] == ["started", "collapse", "sr_start", "collapse"]
    assert next(e for e in events if e.get("event") == "sr_start")["iteration"] == 6
    before = load_snapshot(out / "snapshots" / "snapshot_iter_6.pt")
    final = load_snapshot(out / "snapshots" / "snapshot_iter_8.pt")
    assert before["updater"]["apply_SR"] is True and not before["updater"]["sr"]["ratios"], "switched on, not acted"
    assert final["updater"]["apply_SR"] is True and final["updater"]["sr"]["ratios"], "SR acted at iteration 8"
    assert sorted(p.name for p in (out / "spectra").iterdir()) == [
        f"spectra_iter_{i:08d}.npz" for i in (2, 4, 6, 8)]


def _ddp_worker_whose_rank_1_sees_a_collapse(rank: int, world_size: int, port: int, argv: list[str],
                                              marker: str) -> None:
    """A DDP rank whose D spectra, on rank 1 only, lose their lower singular values from the third snapshot on
    (as GPU SVDs may differ in the last digits between ranks, near the detector's threshold)."""
    from source.spectral.spectra import LayerSpectrum
    from source.training import extensions

    real, calls = extensions.compute_spectra, []

    def spectra(module):
        result = real(module)
        calls.append(module)
        if rank == 1 and len(calls) >= 6 and module is calls[1]:
            Path(marker).touch()
            result = {n: LayerSpectrum(s.kind, np.r_[s.singular_values[:1], s.singular_values[1:] * 0.1], s.sigma_hat)
                      for n, s in result.items()}
        return result

    extensions.compute_spectra = spectra
    _ddp_worker(rank, world_size, port, argv)


def test_ddp_ranks_decide_on_a_collapse_together(tmp_path, ranks_threads):
    """apply_SR: auto switches SR on and writes a snapshot (a collective) at a detected collapse: a collapse that one
    rank alone detected would leave it alone in that collective (NCCL hangs). Rank 0's scores decide on every rank."""
    out, marker = tmp_path / "ddp", tmp_path / "rank1_crushed"
    argv = tiny_argv(out, 8, "updater.apply_SR=auto", "spectra_interval=2", "snapshot_interval=100")
    mp.spawn(_ddp_worker_whose_rank_1_sees_a_collapse, args=(2, _free_port(), argv, str(marker)), nprocs=2, join=True)
    assert marker.exists(), "rank 1 computed collapsed spectra"
    events = [record.get("event") for record in read_jsonl(out / "log.jsonl")]
    assert "collapse" not in events and "sr_start" not in events
    assert load_snapshot(out / "snapshots" / "snapshot_iter_8.pt")["updater"]["apply_SR"] is False


def test_a_run_with_loader_workers_ends_after_an_offline_evaluation(tmp_path):
    """Offline, the Inception download's failure kept the loader's iterator referenced to the end (an exception's
    frames); multiprocessing's exit handler then joined workers that ignore its SIGTERM: a finished run never
    exited. The trainer now ends its workers when it closes."""
    script = ("import sys, source.metrics.inception as inception\n"
              "def offline(url, destination): raise OSError('Name or service not known (offline)')\n"
              "inception._download_weights = offline\n"
              "import train\n"
              "sys.exit(train.main(sys.argv[1:]))\n")
    argv = tiny_argv(tmp_path / "run", 2, "num_workers=2", "evaluation_interval=2", "evaluation.metrics=[fid]",
                     "evaluation.n_samples=20", "evaluation.batch_size=10", "evaluation.reference_images=20",
                     "evaluation.inception_weights=null", f"evaluation.cache_dir={tmp_path / 'stats'}")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run([sys.executable, "-c", script, *argv], cwd=CONFIGS.parent, env=env,
                                capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the finished run did not exit")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "using the offline pool3-only copy 'fid-helper'" in result.stdout + result.stderr
    assert "evaluation at iteration 2" in result.stdout + result.stderr


def test_a_run_outlives_the_reader_of_its_console(tmp_path):
    """`train.py ... | head` killed the run at its next printed line (BrokenPipeError, no snapshot since the last
    interval); now the console goes quiet and the run finishes: its files hold what it printed."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *tiny_argv(out, 30)], cwd=CONFIGS.parent, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"reading the training data")
    assert process.stdout.readline().startswith(b"run folder: ")  # the run has started
    process.stdout.close()
    process.stderr.close()
    assert process.wait(timeout=240) == 0
    assert (out / "snapshots" / "snapshot_iter_30.pt").is_file()
    assert max(r["iteration"] for r in read_jsonl(out / "log.jsonl") if "loss_dis" in r) == 30


def test_a_gsr_run_says_how_gsr_groups_its_generator(tmp_path, capsys):
    """The grouping is automatic (the most nearly square shape): the run says it, and when it has no groups."""
    argv = tiny_argv(tmp_path / "run", 1, "updater.gsr.enabled=true", "models.generator.args.ch=7",
                     "models.discriminator.args.ch=7")
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "gSR (class-balanced w 0.5, beta 0.999, 4 power steps; 6 layers of 7 channels as 1 x 7; 7 channels have " \
           "no divisor above 1" in out
    argv = tiny_argv(tmp_path / "released", 1, "updater.gsr.enabled=true", "updater.gsr.released_beta_estimate=true",
                     "updater.lecam.weight=0.1", "updater.diffaugment=translation")
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 power steps, the release's beta estimate (a lower bound of sigma_beta);" in out
    assert "terms: DiffAugment translation; LeCam 0.1 (" in out
