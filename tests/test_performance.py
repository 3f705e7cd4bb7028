"""Settings that change how the arithmetic runs, never the recipe: ghost BatchNorm, exact reorderings."""
import torch

import train
from source.models import build_model
from source.training.checkpoint import load_snapshot
from test_training import tiny_argv


def final_state(out, *overrides):
    assert train.main(tiny_argv(out, 3, "snapshot_interval=3", *overrides)) == 0
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
            # A running mean also averages those noise-driven biases (+-lr = 2e-4 per step) into itself.
            atol = 1e-3 if key.endswith("running_mean") else 1e-5
            if key not in noise:
                torch.testing.assert_close(ghost[net][key], value, rtol=1e-4, atol=atol, msg=f"{net} {key}")
    assert ghost["gen"]["block2.b1.bn.num_batches_tracked"] == accumulated["gen"]["block2.b1.bn.num_batches_tracked"]
    running = "block2.b1.bn.running_var"
    assert not torch.allclose(plain["gen"][running], accumulated["gen"][running], rtol=1e-4, atol=1e-5), \
        "statistics over 8 samples differ from those over groups of 4 (else this test could not fail)"
