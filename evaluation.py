"""Score, look at and export a trained generator; prepare reference statistics.

    python evaluation.py ref-stats --config configs/sr_imagenet.yaml [--n-images N] [--per-class] [--out PATH]
    python evaluation.py metrics --snapshot RUN/snapshots/snapshot_iter_70000.pt --n-samples 50000 --splits 10
    python evaluation.py metrics --snapshot S --intra-fid --samples-per-class 5000 [--classes 204 265]
    python evaluation.py grids --snapshot S --classes 204 265 323 946 --rows 10 --columns 10
    python evaluation.py samples --snapshot S --n 50000 --format npz --out samples.npz

Snapshots are `snapshot_iter_N.pt` or `generator_iter_N.pt`; defaults come from the snapshot's
config (its `evaluation` block, changeable with --set). Every printed number states its protocol:
backbone and weights, N, IS splits, reference statistics. Which numbers compare with published
ones: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from figures.grids import PADDING, check_overwrite, tile, titled, to_image
from source.config import ConfigError, load_config
from source.datasets import DatasetError, build_dataset
from source.metrics import StatsMismatch, WeightsUnavailable
from source.metrics.generate import generate_uint8, generated_features, sample_inputs
from source.training import checkpoint
from source.training.evaluate import (
    LoadedGenerator,
    ReferenceUnavailable,
    available_metrics,
    check_settings,
    dataset_reference,
    describe,
    intra_fid_score,
    load_backbone,
    load_generator,
    protocol_record,
    resolve_reference,
    score,
)

IMAGENET_CLASSES = 1000
IMAGENET_GRID_CLASSES = [204, 265, 323, 946]  # the SRGANs README's grids (Lhasa, toy poodle, monarch, cardoon)
MAX_DEFAULT_GRID_CLASSES = 10
USER_ERRORS = (ConfigError, DatasetError, WeightsUnavailable, StatsMismatch, ReferenceUnavailable,
               FileNotFoundError, ValueError)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_folder(snapshot: str) -> Path:
    """RUN for RUN/snapshots/snapshot_iter_N.pt, else the snapshot's own folder."""
    return checkpoint.run_folder_of(snapshot) or Path(snapshot).resolve().parent


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}")


# --- ref-stats ---------------------------------------------------------------------------------


def ref_stats(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    dataset = build_dataset(config.dataset.name, config.dataset.args)
    backbone, note = load_backbone(args.inception_weights or config.evaluation.inception_weights, device)
    print_notes([note] if note else [])
    n_images = args.n_images if args.n_images is not None else config.evaluation.reference_images
    reference = dataset_reference(config, dataset, backbone, n_images, args.per_class, args.out)
    classes = f", {len(reference.stats.per_class)} classes" if reference.stats.per_class else ""
    print(f"reference statistics: {reference.path} ({reference.stats.n_images} images{classes}, "
          f"pool3 features of {len(reference.features)} kept for KID)")
    print(f"key: {json.dumps(reference.key, sort_keys=True)}")


# --- metrics -----------------------------------------------------------------------------------


def metrics(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device, args.overrides)
    config = loaded.config
    settings = dataclasses.replace(
        config.evaluation,
        n_samples=args.n_samples or config.evaluation.n_samples,
        splits=args.splits or config.evaluation.splits,
        metrics=config.evaluation.metrics if args.metrics is None else args.metrics,
        inception_weights=args.inception_weights or config.evaluation.inception_weights,
        reference_stats=args.reference or config.evaluation.reference_stats,
    )
    check_settings(settings, world_size=1)
    config = dataclasses.replace(config, evaluation=settings)
    seed = config.seed if args.seed is None else args.seed
    backbone, note = load_backbone(settings.inception_weights, device)
    reference = resolve_reference(config, backbone, per_class=args.intra_fid)
    names, skipped = available_metrics(settings.metrics, backbone, reference)
    print_notes(([note] if note else []) + skipped)
    if not names and not args.intra_fid:
        raise ValueError("none of the requested metrics can be computed (see the notes above)")
    record = {"iteration": loaded.iteration, "snapshot": loaded.path}
    protocol = protocol_record(backbone, names, settings.n_samples, settings.splits, reference)
    if names:
        gen = loaded.gen
        z, labels = sample_inputs(settings.n_samples, gen.dim_z, gen.n_classes, seed)
        features = generated_features(gen, backbone, z, labels, settings.batch_size, device)
        record.update(score(features, names, reference, settings.splits))
    if args.intra_fid:
        classes = args.classes if args.classes else list(range(loaded.gen.n_classes))
        check_classes(classes, loaded.gen.n_classes)
        record["intra_FID"], per_class = intra_fid_score(loaded.gen, backbone, reference, classes,
                                                         args.samples_per_class, settings.batch_size, device, seed)
        record["intra_FID_per_class"] = {str(label): value for label, value in per_class.items()}
        protocol["samples_per_class"] = args.samples_per_class
        if not names:
            protocol["n_samples"] = len(classes) * args.samples_per_class
    record["protocol"] = {**protocol, "seed": seed}
    print(f"snapshot {loaded.path} (iteration {loaded.iteration})")
    print(describe(record))
    if args.json:
        print(json.dumps(record))


# --- grids and samples -------------------------------------------------------------------------


def default_grid_classes(n_classes: int) -> list[int]:
    if n_classes == IMAGENET_CLASSES:
        return IMAGENET_GRID_CLASSES
    return list(range(min(n_classes, MAX_DEFAULT_GRID_CLASSES)))


def check_classes(classes: list[int], n_classes: int) -> None:
    if n_classes == 0:
        raise ValueError("this generator is unconditional (n_classes=0); leave out --classes")
    outside = [label for label in classes if not 0 <= label < n_classes]
    if outside:
        raise ValueError(f"--classes {outside}: the generator has classes 0..{n_classes - 1}")


def save_png(image: torch.Tensor, path: Path) -> None:
    """A uint8 CHW image (1 or 3 channels) as PNG."""
    to_image(image).save(path)


def generate_all(loaded: LoadedGenerator, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    return torch.cat([images.cpu() for images in generate_uint8(loaded.gen, z, labels, batch_size, device)])


def grids(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device)
    gen, count = loaded.gen, args.rows * args.columns
    batch_size = args.batch_size or loaded.config.evaluation.batch_size
    out = Path(args.out) if args.out else run_folder(args.snapshot) / "figures" / f"grids_iter_{loaded.iteration}"
    targets = grid_targets(args.classes, gen.n_classes, out)
    check_overwrite([path for _, path in targets], args.force)
    out.mkdir(parents=True, exist_ok=True)
    # The same latents for every class and every snapshot (per --seed): grids are comparable side by side.
    z, _ = sample_inputs(count, gen.dim_z, 0, args.seed)
    for label, path in targets:
        labels = None if label is None else torch.full((count,), label)
        grid = tile(generate_all(loaded, z, labels, batch_size, device), args.rows, args.columns, PADDING)
        name = "unconditional" if label is None else f"class {label}"
        titled(grid, f"{name}, iteration {loaded.iteration}").save(path)
        print(path)


def grid_targets(classes: list[int] | None, n_classes: int, out: Path) -> list[tuple[int | None, Path]]:
    """(class or None for an unconditional G, PNG path) of every grid to draw."""
    if n_classes == 0 and not classes:
        return [(None, out / "samples.png")]
    classes = classes or default_grid_classes(n_classes)
    check_classes(classes, n_classes)
    return [(label, out / f"class_{label}.png") for label in classes]


def samples(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device)
    batch_size = args.batch_size or loaded.config.evaluation.batch_size
    seed = loaded.config.seed if args.seed is None else args.seed
    z, labels = sample_inputs(args.n, loaded.gen.dim_z, loaded.gen.n_classes, seed)
    images = generate_all(loaded, z, labels, batch_size, device)
    out = Path(args.out)
    if args.format == "npz":
        # arr_0 as N x H x W x C uint8: the layout TTUR's fid.py and OpenAI's ImageNet evaluator read.
        arrays = {"arr_0": images.permute(0, 2, 3, 1).numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **arrays)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            suffix = "" if labels is None else f"_class{int(labels[index])}"
            save_png(image, out / f"{index:06d}{suffix}.png")
    print(f"wrote {args.n} images from {loaded.path} (iteration {loaded.iteration}, seed {seed}) to {out}")


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    def command(name: str, function, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=function)
        sub.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        return sub

    def weights_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--inception-weights", metavar="PATH",
                         help="torch-fidelity weights file or 'fid-helper' (offline, FID/KID only); default: "
                              "evaluation.inception_weights, else the download cache, else fid-helper")

    def overrides_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. dataset.args.root=/data/imagenet (repeatable)")

    sub = command("ref-stats", ref_stats, "reference statistics of a config's training data (cached)")
    sub.add_argument("--config", required=True, help="YAML experiment file whose dataset is the reference")
    overrides_option(sub)
    weights_option(sub)
    sub.add_argument("--n-images", type=positive_int,
                     help="images to use (default: evaluation.reference_images, else all)")
    sub.add_argument("--per-class", action="store_true", help="also per-class statistics, for intra-FID")
    sub.add_argument("--out", help="statistics file (default: the cache path derived from the key)")

    sub = command("metrics", metrics, "IS / FID / KID (and intra-FID) of a snapshot's generator")
    sub.add_argument("--snapshot", required=True, help="snapshot_iter_N.pt or generator_iter_N.pt")
    overrides_option(sub)
    weights_option(sub)
    sub.add_argument("--n-samples", type=positive_int, help="generated images (default: evaluation.n_samples)")
    sub.add_argument("--splits", type=positive_int, help="Inception Score splits (default: evaluation.splits)")
    sub.add_argument("--metrics", nargs="*", choices=("is", "fid", "kid"), help="default: evaluation.metrics")
    sub.add_argument("--reference", metavar="PATH",
                     help="reference statistics file (default: evaluation.reference_stats, else the dataset's cache)")
    sub.add_argument("--intra-fid", action="store_true", help="also intra-FID against per-class reference statistics")
    sub.add_argument("--samples-per-class", type=positive_int, default=5000,
                     help="intra-FID samples per class (sngan: 5000)")
    sub.add_argument("--classes", type=int, nargs="+", help="intra-FID classes (default: all)")
    sub.add_argument("--seed", type=int, help="latents and labels (default: the run's seed, as during training)")
    sub.add_argument("--json", action="store_true", help="also print the record as one JSON line")

    sub = command("grids", grids, "one rows x columns grid per class, from the same latents, titled with "
                  "the class; existing grids are kept unless --force")
    sub.add_argument("--snapshot", required=True, help="snapshot_iter_N.pt or generator_iter_N.pt")
    sub.add_argument("--classes", type=int, nargs="+",
                     help=f"default: {' '.join(map(str, IMAGENET_GRID_CLASSES))} for ImageNet, else the first "
                          f"{MAX_DEFAULT_GRID_CLASSES} classes")
    sub.add_argument("--rows", type=positive_int, default=10)
    sub.add_argument("--columns", type=positive_int, default=10)
    sub.add_argument("--out", help="folder (default: RUN/figures/grids_iter_N)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--batch-size", type=positive_int, help="default: evaluation.batch_size")
    sub.add_argument("--force", action="store_true", help="overwrite grids that already exist")

    sub = command("samples", samples, "export generated images for external tools")
    sub.add_argument("--snapshot", required=True, help="snapshot_iter_N.pt or generator_iter_N.pt")
    sub.add_argument("--n", type=positive_int, required=True, help="number of images")
    sub.add_argument("--format", choices=("png", "npz"), default="png",
                     help="png: a folder of NNNNNN_classC.png; npz: arr_0 (N x H x W x C uint8) and labels")
    sub.add_argument("--out", required=True, help="folder (png) or file (npz)")
    sub.add_argument("--seed", type=int, help="default: the run's seed")
    sub.add_argument("--batch-size", type=positive_int, help="default: evaluation.batch_size")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.command(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
