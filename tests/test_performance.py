"""Settings that change how the arithmetic runs, never the recipe: ghost BatchNorm, mixed precision, layout, compile."""
import json

import numpy as np
import pytest
import torch

import train
from source.config import load_config
from source.models import build_model
from source.training import build
from source.training.checkpoint import load_snapshot
from source.training.distributed import World
from test_training import CONFIGS, TINY, build_tiny_updater, tiny_argv


def final_state(out, *overrides):
    assert train.main(tiny_argv(out, 3, *overrides)) == 0  # snapshots at 1, 2, 3
    return load_snapshot(out / "snapshots" / "snapshot_iter_3.pt", training_state=True)


def noise_driven(snapshot: dict, net: str) -> set[str]:
    """Parameters whose gradient is analytically zero (a bias feeding a BatchNorm): Adam turns its rounding
    noise (|g| < 1e-7) into +-lr steps, so they cannot agree between two summation orders."""
    spec = snapshot["config"]["models"]["generator" if net == "gen" else "discriminator"]
    names = [name for name, _ in build_model(spec["name"], spec["args"]).named_parameters()]
    state = snapshot[f"opt_{net}"]["state"]
    return {names[i] for i, moments in state.items() if moments["exp_avg_sq"].max() < 1e-10}


def test_ghost_batchnorm_in_one_micro_batch_equals_two_micro_batches(tmp_path):
    """Batch 8 as 2 micro-batches of 4, or as 1 micro-batch of 8 with BN groups of 4: the same 3 iterations
    (D steps, dynamic SR every 2, G steps, SN power steps and running statistics), to float rounding."""
    accumulated = final_state(tmp_path / "micro4", "micro_batchsize=4")
    ghost = final_state(tmp_path / "ghost", "micro_batchsize=8", "bn_batchsize=4")
    plain = final_state(tmp_path / "micro8", "micro_batchsize=8")
    for net in ("gen", "dis"):
        noise = noise_driven(accumulated, net)
        assert all(name.endswith(".bias") for name in noise)
        for key, value in accumulated[net].items():
            # A running mean also averages those noise-driven biases (+-lr = 2e-4 per step) into itself. Weights: a
            # tenth of a step, as in the DDP test (beta1 = 0: a weight with a near-0 gradient turns the other
            # summation order's rounding into part of a step; 1.06e-5 seen with AVX2 kernels)
            atol = 2e-3 if key.endswith("running_mean") else 2e-5
            if key not in noise:
                torch.testing.assert_close(ghost[net][key], value, rtol=1e-4, atol=atol, msg=f"{net} {key}")
    assert ghost["gen"]["block2.b1.bn.num_batches_tracked"] == accumulated["gen"]["block2.b1.bn.num_batches_tracked"]
    running = "block2.b1.bn.running_var"
    assert not torch.allclose(plain["gen"][running], accumulated["gen"][running], rtol=1e-4, atol=1e-5), \
        "statistics over 8 samples differ from those over groups of 4 (else this test could not fail)"


def losses(out) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["loss_dis"], r["loss_gen"]) for r in records if "loss_dis" in r]


@pytest.mark.parametrize("settings, tolerance", [
    (["performance.channels_last=true"], 1e-4),        # the same arithmetic in another memory order
    (["performance.amp=bf16"], 0.05),                  # 8-bit mantissas in G's and D's forwards
    (["performance.fused_adam=true"], 1e-4),           # Adam's step fused into one kernel
    (["performance.sr_on_cpu=true"], 0.0),             # SR's SVDs on the CPU: here the weights' own device
    # slow: inductor compiles G and D for minutes on a cold cache on 2 cores (27 s warm)
    pytest.param(["performance.compile=true", "performance.channels_last=true"], 1e-4, marks=pytest.mark.slow),
])
def test_performance_settings_keep_the_losses_of_fp32(tmp_path, settings, tolerance):
    """Three iterations (D step, dynamic SR, G step, 2 accumulation steps) against plain fp32 (NCHW: the demo config
    it is built on runs channels_last)."""
    plain = "performance.channels_last=false"
    reference = final_state(tmp_path / "fp32", plain)
    fast = final_state(tmp_path / "fast", plain, *settings)
    assert fast["config"]["performance"] != reference["config"]["performance"], "else this test could not fail"
    np.testing.assert_allclose(losses(tmp_path / "fast"), losses(tmp_path / "fp32"), rtol=tolerance, atol=tolerance)
    assert fast["gen"].keys() == reference["gen"].keys(), "snapshots of a compiled model keep the plain keys"


def test_sr_on_cpu_is_where_the_regularizer_solves():
    assert build.build_regularizer(load_config(CONFIGS / "demo.yaml", TINY)).solve_on is None
    config = load_config(CONFIGS / "demo.yaml", [*TINY, "performance.sr_on_cpu=true"])
    assert build.build_regularizer(config).solve_on == torch.device("cpu")


def test_fused_adam_is_what_the_optimizers_run():
    config = load_config(CONFIGS / "demo.yaml", [*TINY, "performance.fused_adam=true"])
    models = build.build_models(config, torch.device("cpu"))
    updater = build.build_updater(config, World(0, 0, 1, torch.device("cpu")), models, iter(()))
    assert updater.opt_gen.defaults["fused"] and updater.opt_dis.defaults["fused"]


def test_a_resume_runs_the_configs_optimizer_settings_not_the_snapshots(tmp_path):
    """torch's Optimizer.load_state_dict keeps the saved hyperparameters; a resume's --set must win."""
    final_state(tmp_path / "run")
    resumed = tmp_path / "resumed"
    assert train.main(["--resume", str(tmp_path / "run" / "snapshots" / "snapshot_iter_2.pt"), "--out", str(resumed),
                       "--set", "performance.fused_adam=true", "--set", "adam_D.beta2=0.5"]) == 0
    state = load_snapshot(resumed / "snapshots" / "snapshot_iter_3.pt", training_state=True)
    dis, gen = state["opt_dis"]["param_groups"][0], state["opt_gen"]["param_groups"][0]
    assert dis["fused"] and gen["fused"] and dis["betas"][1] == 0.5 and gen["betas"][1] != 0.5


def test_gradients_kept_in_stable_buffers_for_cuda_graphs_give_the_same_training():
    """Under CUDA graphs (compile mode reduce-overhead) gradients accumulate into zeroed buffers instead of starting
    as None; with D and G accumulating 2 micro-batches, 3 iterations must give bit for bit the same models."""
    states = []
    for stable in (False, True):
        updater, models = build_tiny_updater("gen_batchsize=16", "updater.n_dis=2")
        updater.stable_grads = stable
        for _ in range(3):
            updater.update()
        states.append({net: getattr(models, net).state_dict() for net in ("gen", "dis")})
    for net, state in states[0].items():
        assert all(torch.equal(value, states[1][net][key]) for key, value in state.items()), net
    assert updater.accumulation == 2 and updater.gen_accumulation == 4
    assert all(p.grad is not None for p in models.dis.parameters()), "the buffers stay between steps"


def test_only_compiles_own_cuda_graphs_keep_gradients_in_stable_buffers():
    """A step graph holds the whole step, zeroing included, so its gradients start as None (no zeroing kernels);
    compile's reduce-overhead graphs hand over gradients that their next replay overwrites, so they need buffers."""
    assert not build_tiny_updater("performance.step_graphs=true")[0].stable_grads
    assert not build_tiny_updater()[0].stable_grads
    assert build_tiny_updater("performance.compile=true", "performance.compile_mode=reduce-overhead")[0].stable_grads


def test_fp16_scales_its_loss_and_skips_overflowing_steps(tmp_path):
    """fp16 (a GPU setting, exercised on CPU): D's first loss, before any step, is fp32's to fp16 precision; the
    scaler starts at 2^16 and halves at each overflowing step, which it skips, so the trajectories part there."""
    final_state(tmp_path / "fp32")
    fp16 = final_state(tmp_path / "fp16", "performance.amp=fp16")
    assert losses(tmp_path / "fp16")[0][0] == pytest.approx(losses(tmp_path / "fp32")[0][0], abs=0.01)
    scales = {net: state["scale"] for net, state in fp16["updater"]["grad_scalers"].items()}
    assert all(0 < scale <= 2.0 ** 16 for scale in scales.values()), scales


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_resumes_exactly(tmp_path, amp):
    """The GradScaler's state (fp16) is in the snapshot: 3 straight iterations equal 2 + a resume."""
    straight = final_state(tmp_path / "straight", f"performance.amp={amp}")
    argv = tiny_argv(tmp_path / "resumed", 3, "snapshot_interval=3", f"performance.amp={amp}")
    assert train.main(argv + ["--resume", str(tmp_path / "straight" / "snapshots" / "snapshot_iter_2.pt")]) == 0
    resumed = load_snapshot(tmp_path / "resumed" / "snapshots" / "snapshot_iter_3.pt", training_state=True)
    for net in ("gen", "dis"):
        assert all(torch.equal(resumed[net][key], value) for key, value in straight[net].items())
    assert resumed["updater"].get("grad_scalers") == straight["updater"].get("grad_scalers")


def test_a_compiled_run_says_before_its_silent_first_steps_that_it_compiles(tmp_path, monkeypatch, capsys):
    """Dynamo compiles on the first steps for minutes without a word: the run says so first. (The compiling itself
    is replaced by a record of it: the slow test above runs the real one.)"""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiled.append(kwargs))
    assert train.main(tiny_argv(tmp_path / "run", 1, "performance.compile=true")) == 0
    out = capsys.readouterr().out
    assert compiled == [{"mode": "default"}, {"mode": "default"}]  # G and D
    assert "compiling G and D on their first steps (torch.compile, mode default)" in out
    assert out.index("compiling G and D") < out.index("iteration=1")
    assert train.main(tiny_argv(tmp_path / "plain", 1)) == 0
    assert "compiling" not in capsys.readouterr().out
