"""Sample grids (``evaluation.py grids``: tiles with padding between them under a title strip) and sample
files (``evaluation.py samples``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from source.files import refuse_link
from source.metrics.generate import check_classes, generate_uint8

PADDING = 2  # pixels between tiles
PADDING_VALUE = 255  # white: black padding would vanish between dark-background samples (Fashion-MNIST)
MIN_FONT_SIZE = 10
IMAGENET_CLASSES = 1000
IMAGENET_GRID_CLASSES = [204, 265, 323, 946]  # the SRGANs README's grids (Lhasa, toy poodle, monarch, cardoon)
MAX_DEFAULT_GRID_CLASSES = 10
MAX_GRID_IMAGES = 10_000


def tile(images: torch.Tensor, rows: int, columns: int, padding: int = 0, fill: int = PADDING_VALUE) -> torch.Tensor:
    """[rows * columns, C, H, W] -> [C, rows * (H + padding) - padding, columns * (W + padding) - padding],
    row-major, with ``padding`` pixels of ``fill`` between tiles and none around them."""
    if padding:
        images = F.pad(images, (0, padding, 0, padding), value=fill)
    _, channels, height, width = images.shape
    grid = images.reshape(rows, columns, channels, height, width).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(channels, rows * height, columns * width)
    return grid[:, :grid.shape[1] - padding, :grid.shape[2] - padding]


def to_image(image: torch.Tensor) -> Image.Image:
    """A uint8 CHW image (1 or 3 channels) as a PIL image (mode L or RGB)."""
    pixels = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def titled(grid: torch.Tensor, title: str) -> Image.Image:
    """A uint8 CHW grid (1 or 3 channels) under a white strip with ``title`` centred in black.

    The font grows with the grid so the title stays legible on a 10 x 10 grid of 128 px images; a title
    wider than the grid widens the image (white margins) instead of being cut off.
    """
    image = to_image(grid)
    size = max(MIN_FONT_SIZE, image.width // 40)
    font = ImageFont.load_default(size=size)
    ascent, descent = font.getmetrics()
    strip = ascent + descent + size // 2  # from the font, not the text: every class's grid has the same size
    width = max(image.width, round(font.getlength(title)) + size)
    canvas = Image.new(image.mode, (width, strip + image.height), "white")
    canvas.paste(image, ((width - image.width) // 2, strip))
    ImageDraw.Draw(canvas).text((width // 2, strip // 2), title, fill="black", font=font, anchor="mm")
    return canvas


def check_overwrite(paths: list[Path], force: bool) -> None:
    """Refuse before drawing anything: the names carry no seed or size, so another --seed or --rows would
    silently replace grids someone may have kept (and fresh names would pile up unnoticed instead)."""
    for path in paths:
        refuse_link(path)  # even with --force: it would overwrite whatever file the link names
    existing = [path for path in paths if path.exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]}{more} already exists; pass --force to overwrite or --out for another folder")


def output_folder(out: Path) -> Path:
    """--out as a folder to write into (new or existing), never a file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (new, or one to write into)")
    return out


def grid_targets(classes: list[int] | None, n_classes: int, out: Path) -> list[tuple[int | None, Path]]:
    """(class or None for an unconditional G, PNG path) of every grid to draw."""
    if n_classes == 0 and not classes:
        return [(None, out / "samples.png")]
    classes = list(dict.fromkeys(classes)) if classes else default_grid_classes(n_classes)  # each grid once
    check_classes(classes, n_classes)
    return [(label, out / f"class_{label}.png") for label in classes]


def default_grid_classes(n_classes: int) -> list[int]:
    if n_classes == IMAGENET_CLASSES:
        return IMAGENET_GRID_CLASSES
    return list(range(min(n_classes, MAX_DEFAULT_GRID_CLASSES)))


def generate_all(gen: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """uint8 NCHW images on the CPU (G's BatchNorm as the enclosing ``generation_mode`` says)."""
    return torch.cat([images.cpu() for images in generate_uint8(gen, z, labels, batch_size, device)])


def draw_grids(gen: torch.nn.Module, z: torch.Tensor, targets: list[tuple[int | None, Path]], rows: int,
               columns: int, batch_size: int, device: torch.device, iteration: int) -> None:
    """One titled ``rows`` x ``columns`` grid per target, every class from the same latents ``z``."""
    for label, path in targets:
        labels = None if label is None else torch.full((len(z),), label)
        grid = tile(generate_all(gen, z, labels, batch_size, device), rows, columns, PADDING)
        name = "unconditional" if label is None else f"class {label}"
        titled(grid, f"{name}, iteration {iteration}").save(path)
        print(path)


def save_samples(images: torch.Tensor, labels: torch.Tensor | None, out: Path, file_format: str) -> None:
    """uint8 NCHW images as one npz (``arr_0`` N x H x W x C, and ``labels``) or a folder of PNGs."""
    if file_format == "npz":
        # arr_0 as N x H x W x C uint8: the layout TTUR's fid.py and OpenAI's ImageNet evaluator read.
        arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **arrays)
        return
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        suffix = "" if labels is None else f"_class{int(labels[index])}"
        to_image(image).save(out / f"{index:06d}{suffix}.png")


if __name__ == "__main__":  # the drawing only; the command line is evaluation.py's
    raise SystemExit("figures/grids.py draws the grids of `python evaluation.py grids --snapshot FILE` and writes "
                     "the files of `python evaluation.py samples`: run those (their --help lists the options)")
