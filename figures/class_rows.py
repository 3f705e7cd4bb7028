"""One row of samples per class from the same latents, for one or more generators side by side (docs/gsr.md).

    python -m figures.class_rows SNAPSHOT [SNAPSHOT ...] --out PATH [--titles T [T ...]] [--columns 10] [--scale 2]
                                 [--seed 0] [--raw-generator]

Every row is a class (0 at the top), every column one latent, the same latents in every row and every panel, so
a panel's rows differ by class only and the panels by the generator only. G is evaluated as its snapshot's
config says (the EMA when there is one, ``evaluation.g_batchnorm``); titles default to "RUN, iteration N".
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from figures.common import command_line
from figures.grids import PADDING, tile, titled
from source import arguments
from source.metrics.generate import g_batchnorm, generate_uint8
from source.training.evaluate import LoadedGenerator, load_generator

GAP = 40  # white pixels between panels


def rows_panel(loaded: LoadedGenerator, title: str, columns: int, scale: int, seed: int) -> Image.Image:
    gen = loaded.gen
    if gen.n_classes == 0:
        raise ValueError(f"{loaded.path}: the generator is unconditional; class rows need classes")
    z = torch.randn(columns, gen.dim_z, generator=torch.Generator().manual_seed(seed)).repeat(gen.n_classes, 1)
    labels = torch.arange(gen.n_classes).repeat_interleave(columns)
    mode = g_batchnorm(loaded.config.evaluation)
    images = torch.cat(list(generate_uint8(gen, z, labels, mode.batch_size, torch.device("cpu"), mode)))
    if scale > 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest").to(torch.uint8)
    return titled(tile(images, gen.n_classes, columns, PADDING), title)


def side_by_side(panels: list[Image.Image]) -> Image.Image:
    width = sum(panel.width for panel in panels) + GAP * (len(panels) - 1)
    mode = "RGB" if any(panel.mode == "RGB" for panel in panels) else "L"
    canvas = Image.new(mode, (width, max(panel.height for panel in panels)), "white")
    left = 0
    for panel in panels:
        canvas.paste(panel.convert(mode), (left, 0))
        left += panel.width + GAP
    return canvas


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m figures.class_rows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", nargs="+", type=Path, metavar="SNAPSHOT",
                        help="snapshot_iter_N.pt or generator_iter_N.pt, one panel each")
    parser.add_argument("--out", type=Path, required=True, help="image file (.png)")
    parser.add_argument("--titles", nargs="+", help="one per snapshot (default: 'RUN, iteration N')")
    # bounded: a figure of 10^20 columns was an allocation of petabytes, a seed of 10^20 torch's overflow
    parser.add_argument("--columns", type=arguments.integer(1, 100), default=10, help="samples per class")
    parser.add_argument("--scale", type=arguments.integer(1, 32), default=2, help="nearest-neighbour magnification")
    parser.add_argument("--seed", type=arguments.seed, default=0, help="the latents")
    parser.add_argument("--raw-generator", action="store_true", help="the trained weights, not G's EMA")
    args = parser.parse_args(argv)
    if args.titles and len(args.titles) != len(args.snapshots):
        parser.error(f"--titles: {len(args.titles)} titles for {len(args.snapshots)} snapshots")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    loaded = [load_generator(str(path), torch.device("cpu"), raw=args.raw_generator) for path in args.snapshots]
    titles = args.titles or [f"{Path(g.path).parent.parent.name}, iteration {g.iteration}" for g in loaded]
    panels = [rows_panel(g, title, args.columns, args.scale, args.seed) for g, title in zip(loaded, titles)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(panels).save(args.out)
    print(args.out)
    return args.out


if __name__ == "__main__":
    sys.exit(command_line(main))
