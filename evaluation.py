"""Score, look at and export a trained generator; prepare reference statistics.

    python evaluation.py ref-stats --config configs/sr_imagenet.yaml [--n-images N] [--per-class] [--out PATH]
    python evaluation.py metrics --snapshot RUN/snapshots/snapshot_iter_70000.pt --n-samples 50000 --splits 10
    python evaluation.py metrics --snapshot S --intra-fid classes --samples-per-class 5000 [--classes 204 265]
    python evaluation.py metrics --snapshot S --intra-fid groups --repeats 3 --n-samples 50000
    python evaluation.py classes --snapshot S [--samples-per-class 500] [--repeats 3] [--json]
    python evaluation.py grids --snapshot S --classes 204 265 323 946 --rows 10 --columns 10
    python evaluation.py samples --snapshot S --n 50000 --format npz --out samples.npz

Snapshots are `snapshot_iter_N.pt` or `generator_iter_N.pt`; defaults come from the snapshot's
config (its `evaluation` block, changeable with --set). G's EMA is scored when the snapshot has one
(--raw-generator: the trained weights); --g-batchnorm running|batch|standing: how G's BatchNorm
normalizes while generating (default: evaluation.g_batchnorm). Every printed number states its protocol:
generator weights and BatchNorm mode, backbone and weights, N, IS splits, reference statistics and split,
repeats. Which numbers compare with published ones: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

from figures.grids import (IMAGENET_GRID_CLASSES, MAX_DEFAULT_GRID_CLASSES, MAX_GRID_IMAGES, check_overwrite,
                           draw_grids, generate_all, grid_targets, output_folder, save_samples)
from source import arguments, provenance
from source.config import ConfigError, load_config
from source.console import survive_readers_leaving
from source.datasets import DatasetError
from source.files import refuse_link, run_figures
from source.overrides import leftover_arguments
from source.metrics import StatsMismatch, WeightsUnavailable
from source.metrics.class_table import classifier_real_data, format_class_table, known_training_counts
from source.metrics.classifier import DEFAULT_WEIGHTS, check_generator, class_report, load_classifier
from source.metrics.describe import describe, describe_batchnorm
from source.metrics.generate import G_BATCHNORM_MODES, g_batchnorm, generation_mode
from source.metrics.generate import sample_inputs
from source.metrics.longtail import INTRA_FID_MODES, group_notes, intra_fid_protocol, score_repeats, score_request
from source.metrics.reference import (ReferenceUnavailable, check_reference_resolution, dataset_reference,
                                      reference_data, resolve_reference)
from source.metrics.scoring import available_metrics, load_backbone, protocol_record
from source.training import checkpoint
from source.training.evaluate import (LoadedGenerator, check_reference_split, check_settings, load_generator,
                                      resolve_device)
from source.typed import out_of_memory

USER_ERRORS = (ConfigError, DatasetError, WeightsUnavailable, StatsMismatch, ReferenceUnavailable,
               FileNotFoundError, ValueError)
repeat_count = arguments.integer(1, 100, "each repeat scores every image again")
at_least_two = arguments.integer(2, why="a class's diversity is a mean distance between its samples")


def run_folder(snapshot: str) -> Path:
    """RUN for RUN/snapshots/snapshot_iter_N.pt, else the snapshot's own folder."""
    return checkpoint.run_folder_of(snapshot) or Path(snapshot).resolve().parent


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}")


def print_record(loaded: LoadedGenerator, record: dict, text: str, as_json: bool) -> None:
    """A score's text under the snapshot it scores, and (--json) the whole record as one JSON line."""
    print(f"snapshot {loaded.path} (iteration {loaded.iteration})")
    print(text)
    if as_json:  # with the code and machine that computed it: the line, kept elsewhere, says so itself
        device = next(loaded.gen.parameters()).device
        print(json.dumps({**record, "code": provenance.code_version(), "machine": provenance.machine(device)}))


# --- ref-stats ---------------------------------------------------------------------------------


def ref_stats(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.overrides)
    device = resolve_device(args.device)
    check_reference_split(config)
    data = reference_data(config)
    backbone, note = load_backbone(args.inception_weights or config.evaluation.inception_weights, device)
    print_notes([note] if note else [])
    n_images = args.n_images if args.n_images is not None else config.evaluation.reference_images
    reference = dataset_reference(config, data, backbone, n_images, args.per_class, args.out)
    classes = f", {len(reference.stats.per_class)} classes" if reference.stats.per_class else ""
    print(f"reference statistics: {reference.path} ({reference.stats.n_images} images{classes}, "
          f"pool3 features of {len(reference.features)} kept for KID)")
    print(f"key: {json.dumps(reference.key, sort_keys=True)}")


# --- metrics -----------------------------------------------------------------------------------


def metrics(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device, args.overrides, raw=args.raw_generator)
    config = loaded.config
    settings = dataclasses.replace(
        config.evaluation,
        n_samples=args.n_samples or config.evaluation.n_samples,
        splits=args.splits or config.evaluation.splits,
        metrics=config.evaluation.metrics if args.metrics is None else args.metrics,
        inception_weights=args.inception_weights or config.evaluation.inception_weights,
        reference_stats=args.reference or config.evaluation.reference_stats,
        # a statistics file given here replaces the snapshot's reference data, a balanced split included
        reference_split=None if args.reference else config.evaluation.reference_split,
        g_batchnorm=args.g_batchnorm or config.evaluation.g_batchnorm,
    )
    check_settings(settings, world_size=1)
    if not settings.metrics and not args.intra_fid:  # before minutes of reference statistics
        raise ValueError("no metrics requested: --metrics names none" if args.metrics is not None else
                         "no metrics requested: the snapshot's evaluation.metrics is [] (a Fashion-MNIST recipe's "
                         "runs are scored by the classifier: evaluation.py classes); pass --metrics fid kid, or "
                         "--intra-fid")
    config = dataclasses.replace(config, evaluation=settings)
    check_reference_split(config)
    request = score_request(config, loaded.gen.n_classes, args.intra_fid, args.classes, args.samples_per_class)
    print_notes(group_notes(request.groups, settings) if request.groups else [])  # before the slow part
    seed = config.seed if args.seed is None else args.seed
    seeds = [seed + repeat for repeat in range(args.repeats)]
    print_notes([loaded.cache_note] if loaded.cache_note and not settings.reference_stats else [])
    backbone, note = load_backbone(settings.inception_weights, device)
    if not args.intra_fid and set(settings.metrics) == {"is"} and not backbone.has_logits:  # before the reference
        print_notes(([note] if note else []) + available_metrics(settings.metrics, backbone, None)[1])
        raise ValueError("none of the requested metrics can be computed (see the notes above)")
    if not settings.reference_stats:  # before minutes of reference statistics
        check_reference_resolution(config, getattr(config.dataset.args, "size", None), "the reference data")
    reference = resolve_reference(config, backbone, per_class=args.intra_fid == "classes", groups=request.groups)
    check_reference_resolution(config, (reference.key or {}).get("resolution"),
                               f"the reference statistics ({reference.path})")
    request.metrics, skipped = available_metrics(settings.metrics, backbone, reference)
    print_notes(([note] if note else []) + skipped)
    if not request.metrics and not args.intra_fid:
        raise ValueError("none of the requested metrics can be computed (see the notes above)")
    scores = score_repeats(loaded.gen, backbone, reference, request, seeds, device)
    protocol = protocol_record(backbone, request.metrics, settings.n_samples, settings.splits, reference,
                               loaded.weights, settings.reference_split, seeds, request.batchnorm)
    protocol.update(intra_fid_protocol(request, settings, loaded.gen.n_classes))
    record = {"iteration": loaded.iteration, "snapshot": loaded.path, **scores, "protocol": {**protocol, "seed": seed}}
    print_record(loaded, record, describe(record), args.json)


# --- classes (the small-data classifier) -------------------------------------------------------


def classes(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device, args.overrides, raw=args.raw_generator)
    classifier, training = load_classifier(args.classifier, device)
    check_generator(loaded.gen, classifier, device)  # before any data is read
    config = loaded.config
    real, real_name, notes = classifier_real_data(config)
    counts, count_notes = known_training_counts(config)
    print_notes(notes + count_notes)
    seed = config.seed if args.seed is None else args.seed
    settings = config.evaluation
    batchnorm = g_batchnorm(settings, args.g_batchnorm, args.batch_size).for_images(
        loaded.gen.n_classes * args.samples_per_class)
    with generation_mode(loaded.gen, batchnorm, device):
        report = class_report(loaded.gen, classifier, real, args.samples_per_class, seed, args.repeats,
                              batchnorm.batch_size, device, counts, settings.many_above, settings.few_at_most)
    report["protocol"].update(generator=loaded.weights, **batchnorm.record(), real=real_name,
                              classifier=args.classifier, classifier_sha256=training.get("sha256"),
                              classifier_test_accuracy=training.get("test_accuracy"))
    record = {"iteration": loaded.iteration, "snapshot": loaded.path, **report}
    print_record(loaded, record, format_class_table(record), args.json)


# --- grids and samples -------------------------------------------------------------------------


def grids(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device, raw=args.raw_generator)
    gen, count = loaded.gen, args.rows * args.columns
    if count > MAX_GRID_IMAGES:  # all latents are drawn at once, and a grid of more is no figure
        raise ValueError(f"--rows {args.rows} x --columns {args.columns}: {count:,} images in one grid; at most "
                         f"{MAX_GRID_IMAGES:,} (100 x 100)")
    batchnorm = g_batchnorm(loaded.config.evaluation, args.g_batchnorm, args.batch_size).for_images(count)
    out = output_folder(Path(args.out)) if args.out else refuse_link(
        run_figures(run_folder(args.snapshot)) / f"grids_iter_{loaded.iteration}")  # a received run may hold links
    targets = grid_targets(args.classes, gen.n_classes, out)
    check_overwrite([path for _, path in targets], args.force)
    out.mkdir(parents=True, exist_ok=True)
    # The same latents for every class and every snapshot (per --seed): grids are comparable side by side.
    z, _ = sample_inputs(count, gen.dim_z, 0, args.seed)
    with generation_mode(gen, batchnorm, device):
        draw_grids(gen, z, targets, args.rows, args.columns, batchnorm.batch_size, device, loaded.iteration)


def samples(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    loaded = load_generator(args.snapshot, device, raw=args.raw_generator)
    batchnorm = g_batchnorm(loaded.config.evaluation, args.g_batchnorm, args.batch_size).for_images(args.n)
    seed = loaded.config.seed if args.seed is None else args.seed
    z, labels = sample_inputs(args.n, loaded.gen.dim_z, loaded.gen.n_classes, seed)
    out = Path(args.out)
    if args.format == "npz":  # numpy adds the suffix: the name checked and printed is the file written
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; name the .npz file to write")
        out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    else:
        output_folder(out)
    # before generating: an export of 50k images from another snapshot is easily replaced by mistake
    check_overwrite([out] if args.format == "npz" else sorted(out.glob("*.png"))[:1], args.force)
    with generation_mode(loaded.gen, batchnorm, device):
        images = generate_all(loaded.gen, z, labels, batchnorm.batch_size, device)
    save_samples(images, labels, out, args.format)
    print(f"wrote {args.n} images from {loaded.path} (iteration {loaded.iteration}, seed {seed}, "
          f"{describe_batchnorm(batchnorm.record())}) to {out}")


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

    def generator_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--snapshot", required=True, help="snapshot_iter_N.pt or generator_iter_N.pt")
        sub.add_argument("--raw-generator", action="store_true",
                         help="score the trained weights, not G's EMA (which is used when the snapshot has one)")
        sub.add_argument("--g-batchnorm", choices=G_BATCHNORM_MODES,
                         help="G's BatchNorm while generating: running statistics (eval mode), each batch's "
                              "statistics (gSR's release) or standing statistics (BigGAN); default: "
                              "evaluation.g_batchnorm")

    def overrides_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. dataset.args.root=/data/imagenet (repeatable)")

    sub = command("ref-stats", ref_stats, "reference statistics of a config's reference data (cached): the training "
                  "data, or the balanced evaluation.reference_split")
    sub.add_argument("--config", required=True, help="YAML experiment file whose dataset is the reference")
    overrides_option(sub)
    weights_option(sub)
    sub.add_argument("--n-images", type=arguments.positive_int,
                     help="images to use (default: evaluation.reference_images, else all)")
    sub.add_argument("--per-class", action="store_true", help="also per-class statistics, for intra-FID")
    sub.add_argument("--out", help="statistics file (default: the cache path derived from the key)")

    sub = command("metrics", metrics, "IS / FID / KID (and intra-FID) of a snapshot's generator")
    generator_option(sub)
    overrides_option(sub)
    weights_option(sub)
    sub.add_argument("--n-samples", type=arguments.positive_int,
                     help="generated images (default: evaluation.n_samples)")
    sub.add_argument("--splits", type=arguments.positive_int,
                     help="Inception Score splits (default: evaluation.splits)")
    sub.add_argument("--metrics", nargs="*", choices=("is", "fid", "kid"), help="default: evaluation.metrics")
    sub.add_argument("--reference", metavar="PATH",
                     help="reference statistics file (default: evaluation.reference_stats, else the dataset's cache)")
    sub.add_argument("--intra-fid", nargs="?", const="classes", choices=INTRA_FID_MODES,
                     help="also intra-FID: 'classes' (the default) per class against per-class reference statistics; "
                          "'groups' per many/medium/few group of the training counts (gSR)")
    sub.add_argument("--samples-per-class", type=arguments.positive_int, default=5000,
                     help="intra-FID samples per class (sngan: 5000)")
    sub.add_argument("--classes", type=int, nargs="+", help="intra-FID classes (default: all)")
    sub.add_argument("--seed", type=arguments.seed, help="latents and labels (default: the run's seed, as in training)")
    sub.add_argument("--repeats", type=repeat_count, default=1,
                     help="evaluations with seeds seed, seed+1, ...: mean ± sample std of every number (gSR: 3)")
    sub.add_argument("--json", action="store_true", help="also print the record as one JSON line")

    sub = command("classes", classes, "per-class accuracy and diversity, classifier FID/KID of a 32x32x1, 10-class "
                  "generator (Fashion-MNIST) with the small-data classifier")
    generator_option(sub)
    overrides_option(sub)
    sub.add_argument("--classifier", default=DEFAULT_WEIGHTS, metavar="PATH",
                     help=f"classifier weights (default {DEFAULT_WEIGHTS})")
    sub.add_argument("--samples-per-class", type=at_least_two, default=500)
    sub.add_argument("--repeats", type=repeat_count, default=1, help="seeds seed, seed+1, ...: mean ± sample std")
    sub.add_argument("--seed", type=arguments.seed, help="default: the run's seed")
    sub.add_argument("--batch-size", type=arguments.positive_int, help="default: evaluation.batch_size")
    sub.add_argument("--json", action="store_true", help="also print the record as one JSON line")

    sub = command("grids", grids, "one rows x columns grid per class, from the same latents, titled with "
                  "the class; existing grids are kept unless --force")
    generator_option(sub)
    sub.add_argument("--classes", type=int, nargs="+",
                     help=f"default: {' '.join(map(str, IMAGENET_GRID_CLASSES))} for ImageNet, else the first "
                          f"{MAX_DEFAULT_GRID_CLASSES} classes")
    sub.add_argument("--rows", type=arguments.positive_int, default=10)
    sub.add_argument("--columns", type=arguments.positive_int, default=10)
    sub.add_argument("--out", help="folder (default: RUN/figures/grids_iter_N)")
    sub.add_argument("--seed", type=arguments.seed, default=0)
    sub.add_argument("--batch-size", type=arguments.positive_int, help="default: evaluation.batch_size")
    sub.add_argument("--force", action="store_true", help="overwrite grids that already exist")

    sub = command("samples", samples, "export generated images for external tools")
    generator_option(sub)
    sub.add_argument("--n", type=arguments.positive_int, required=True, help="number of images")
    sub.add_argument("--format", choices=("png", "npz"), default="png",
                     help="png: a folder of NNNNNN_classC.png; npz: arr_0 (N x H x W x C uint8) and labels")
    sub.add_argument("--out", required=True, help="folder (png) or file (npz); an existing export is kept unless "
                                                  "--force")
    sub.add_argument("--force", action="store_true", help="overwrite an existing export")
    sub.add_argument("--seed", type=arguments.seed, help="default: the run's seed")
    sub.add_argument("--batch-size", type=arguments.positive_int, help="default: evaluation.batch_size")
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(leftover_arguments(getattr(args, "overrides", []), extra))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.command(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not (message := out_of_memory(error)):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # each reference file is written whole (a temp file renamed) or not at all
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    survive_readers_leaving()
    sys.exit(main())
