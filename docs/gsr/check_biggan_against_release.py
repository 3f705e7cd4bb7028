"""Our BigGAN against the gSR release's code: parameter counts, and G, D and the class-only gains with its weights.

    python docs/gsr/check_biggan_against_release.py /path/to/gSRGAN      # a checkout of val-iisc/gSRGAN

Imports the release's src/models/big_resnet.py and src/utils/model_ops.py from that checkout (nothing of it is
copied here; its two unused imports, pandas and utils.misc, are stood in for), builds both models for the
configs below, prints the parameter counts side by side, then copies the release's weights (and SN vectors) into
ours and prints the largest output differences: G with batch statistics (the release's BNs keep none), D in eval
mode, and the class-only gains and biases against the release's ``gen_sn`` (SVD path, which returns them).
"""
from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from source.links import no_power_iteration  # noqa: E402
from source.models import BigGANDiscriminator, BigGANGenerator  # noqa: E402

# name: (resolution, dim_z, conv dim, n_classes, attention after G block)
CONFIGS = {"CIFAR10/BigGAN": (32, 80, 96, 10, 2), "LSUN/BigGAN_LSUN": (64, 120, 80, 5, 3),
           "iNat19/BigGAN_iNat": (64, 100, 80, 1010, 3)}
PAIRS = {"c1": "conv2d1", "c2": "conv2d2", "c_sc": "conv2d0", "query": "conv1x1_theta", "key": "conv1x1_phi",
         "value": "conv1x1_g", "out": "conv1x1_attn"}


def import_release(root: Path):
    sys.modules["pandas"] = types.ModuleType("pandas")
    misc = types.ModuleType("utils.misc")
    misc.np, misc.dummy_context_mgr = np, contextlib.nullcontext
    sys.modules["utils.misc"] = misc
    sys.path.insert(0, str(root / "src"))
    from models import big_resnet
    return big_resnet


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def copy_layer(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    if hasattr(theirs, "weight_orig"):  # the release's hook-based SN: weight_orig, weight_u, weight_v
        sn = ours.parametrizations.weight
        sn.original.copy_(theirs.weight_orig)
        sn[0]._u.copy_(theirs.weight_u)
        sn[0]._v.copy_(theirs.weight_v)
    else:
        ours.weight.copy_(theirs.weight)
    if isinstance(getattr(theirs, "bias", None), torch.Tensor):
        ours.bias.copy_(theirs.bias)


def copy_blocks(ours_blocks, ours_attention, theirs_blocks) -> None:
    blocks = [entry[0] for entry in theirs_blocks if not hasattr(entry[0], "sigma")]
    attention = next(entry[0] for entry in theirs_blocks if hasattr(entry[0], "sigma"))
    for ours, theirs in zip(ours_blocks, blocks):
        for mine, name in PAIRS.items():
            if hasattr(ours, mine) and hasattr(theirs, name):
                copy_layer(getattr(ours, mine), getattr(theirs, name))
        for norm in ("b1", "b2"):
            if hasattr(ours, norm):
                copy_layer(getattr(ours, norm).gain, getattr(theirs, norm.replace("b", "bn")).gain)
                copy_layer(getattr(ours, norm).bias, getattr(theirs, norm.replace("b", "bn")).bias)
    for mine, name in PAIRS.items():
        if hasattr(ours_attention, mine):
            copy_layer(getattr(ours_attention, mine), getattr(attention, name))
    with torch.no_grad():
        attention.sigma.fill_(0.7)  # away from 0, so that attention counts
        ours_attention.gamma.fill_(0.7)


def compare(big_resnet, name: str, resolution: int, dim_z: int, conv: int, n_classes: int, attention: int) -> None:
    torch.manual_seed(0)
    theirs_g = big_resnet.Generator(dim_z, 128, resolution, conv, True, True, attention, "ReLU", "ProjGAN", n_classes,
                                    "ortho", "N/A", False)
    theirs_d = big_resnet.Discriminator(resolution, conv, True, True, 1, "ReLU", "ProjGAN", "N/A", n_classes, False,
                                        False, "ortho", "N/A", False, 128)
    ours_g = BigGANGenerator(dim_z, 128, conv, n_classes, resolution, 3, attention)
    ours_d = BigGANDiscriminator(conv, n_classes, resolution, 3, attention_after=1)
    print(f"{name}: G {count(ours_g):,} (release {count(theirs_g):,}); D {count(ours_d):,} (release "
          f"{count(theirs_d):,}, of which its unused shared embedding {count(theirs_d.shared):,})")
    with torch.no_grad():  # a few power steps, so that the release's random SN vectors are not degenerate
        for _ in range(5):
            theirs_d(torch.randn(2, 3, resolution, resolution), torch.tensor([0, 1]))
    for ours, theirs in ((ours_g.linear, theirs_g.linear0), (ours_g.shared, theirs_g.shared),
                         (ours_g.conv_out, theirs_g.conv2d5), (ours_g.bn, theirs_g.bn4),
                         (ours_d.linear, theirs_d.linear1), (ours_d.embedding, theirs_d.embedding)):
        copy_layer(ours, theirs)
    copy_blocks(ours_g.blocks, ours_g.attention, theirs_g.blocks)
    copy_blocks(ours_d.blocks, ours_d.attention, theirs_d.blocks)
    theirs_g.eval(), theirs_d.eval(), ours_g.eval(), ours_d.eval()
    for module in ours_g.modules():  # the release normalizes by the batch in eval mode too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()
    z, y = torch.randn(4, dim_z), torch.randint(n_classes, (4,))
    with torch.no_grad(), no_power_iteration(ours_g):
        images_theirs, images_ours = theirs_g(z, y), ours_g(z, y)
        scores_theirs, scores_ours = theirs_d(images_theirs, y).squeeze(1), ours_d(images_theirs, y)
    settings = types.SimpleNamespace(num_power_iter=0, shuffle_emb=False, sn_regularize=True, num_classes=n_classes)
    released = theirs_g.gen_sn(y, settings)
    layers = [m for m in ours_g.modules() if hasattr(m, "class_gains_and_biases")]
    gains = max((layer.class_gains_and_biases()[0] - g).abs().max().item() for layer, g in zip(layers, released[4]))
    biases = max((layer.class_gains_and_biases()[1] - b).abs().max().item() for layer, b in zip(layers, released[5]))
    print(f"  max |difference|: G images {(images_ours - images_theirs).abs().max():.2e}, D scores "
          f"{(scores_ours - scores_theirs).abs().max():.2e} (of {scores_theirs.abs().max():.2e}), class-only gains "
          f"{gains:.2e}, biases {biases:.2e}")


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: check_biggan_against_release.py PATH_OF_A_gSRGAN_CHECKOUT", file=sys.stderr)
        raise SystemExit(2)
    if not (Path(sys.argv[1]) / "src/models/big_resnet.py").is_file():
        print(f"error: {Path(sys.argv[1]) / 'src/models/big_resnet.py'} not found: give a checkout of "
              "github.com/val-iisc/gSRGAN", file=sys.stderr)
        raise SystemExit(2)
    big_resnet = import_release(Path(sys.argv[1]))
    for name, arguments in CONFIGS.items():
        compare(big_resnet, name, *arguments)


if __name__ == "__main__":
    main()
