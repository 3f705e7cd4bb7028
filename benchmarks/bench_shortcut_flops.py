"""Forward FLOPs that running the 1x1 shortcut convs at the low resolution saves (README "Speed settings").

    python -m benchmarks.bench_shortcut_flops [--config configs/sr_imagenet.yaml] [--out benchmarks/results/shortcut_flops.json]

G's blocks run their shortcut conv before the nearest up-sampling and D's down-sampling blocks after the average
pooling (source/models/resblocks.py); the originals ran both at the high resolution, where the same conv touches
4x the pixels. Counted with torch's FlopCounterMode on one sample: each network's forward FLOPs as built, and as
the originals' order would cost (every moved shortcut conv 4x). D's first block pooled first in the originals too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.results_io import save_result
from source.config import load_config
from source.models.resblocks import DiscriminatorBlock, GeneratorBlock
from source.training import build

ROOT = Path(__file__).resolve().parents[1]


def forward_flops(model: torch.nn.Module, *inputs) -> tuple[int, int]:
    """(all forward FLOPs, those of the shortcut convs that run at the low resolution) for one call."""
    moved = [m.c_sc for m in model.modules() if isinstance(m, GeneratorBlock)
             or (isinstance(m, DiscriminatorBlock) and m.learnable_sc and m.downsample)]
    counts = {}
    hooks = [conv.register_forward_hook(lambda module, args, out: counts.__setitem__(id(module), out.numel()))
             for conv in moved]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    # a 1x1 conv's FLOPs: 2 x in_channels per output element (its bias adds none in FlopCounterMode)
    shortcut = sum(2 * conv.in_channels * counts[id(conv)] for conv in moved)
    return counter.get_total_flops(), shortcut


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/sr_imagenet.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/shortcut_flops.json")
    args = parser.parse_args(argv)
    config = load_config(args.config, ["dataset.name=synthetic"])
    models = build.build_models(config, torch.device("cpu"))
    labels = torch.zeros(1, dtype=torch.long)
    z = torch.randn(1, models.gen.dim_z)
    image = models.gen.eval()(z, labels)
    result = {"config": str(args.config.relative_to(ROOT)), "resolution": image.shape[-1]}
    for name, model, inputs in (("gen", models.gen, (z, labels)), ("dis", models.dis.eval(), (image, labels))):
        total, shortcut = forward_flops(model, *inputs)
        original = total + 3 * shortcut  # the moved convs at 4x the pixels
        result[name] = {"forward_flops": total, "moved_shortcut_flops": shortcut,
                        "forward_flops_in_the_original_order": original, "saved_fraction": 3 * shortcut / original}
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
