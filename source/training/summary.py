"""What ``train.py`` says about a run before it trains: the global batch, and a dry run's summary."""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from source.config import Config, ConfigError, PerformanceConfig
from source.datasets import DatasetError, check_dataset_args, classes_text, describe_class_counts, download_pending
from source.datasets.iterator import require_one_global_batch
from source.metrics.reference import require_reference_before_distributed_training
from source.spectral.gsr import describe_grouping
from source.training import build, runfolder
from source.training.distributed import World


def batch_summary(config: Config, world: World) -> str:
    def split(batchsize: int) -> str:
        return (f"{batchsize} = {config.micro_batchsize} (micro) x {world.size} (world size) x "
                f"{config.accumulation_steps(world.size, batchsize)} (accumulation steps)")

    same = config.gen_batch == config.batchsize
    text = split(config.batchsize) if same else f"D {split(config.batchsize)}; G {split(config.gen_batch)}"
    ghost = config.bn_batch < config.micro_batchsize  # the recipe's statistics inside a larger micro-batch
    return text + (f"; G's BatchNorm over groups of {config.bn_batch} (bn_batchsize)" if ghost else "")


def describe_performance(config: Config, device: torch.device) -> str:
    """How the arithmetic runs where it is not the faithful default (plain fp32, eager), and what does not help on
    a CPU (bf16 autocast ran 10.5x slower than fp32 on the development CPU, which has no bf16 units: README)."""
    defaults = asdict(PerformanceConfig())
    changed = [f"{key} {value}" for key, value in asdict(config.performance).items() if defaults[key] != value]
    text = ", ".join(changed) or "the faithful default (fp32, eager)"
    if device.type == "cpu" and config.performance.amp != "fp32":
        text += (f" (note: {config.performance.amp} autocast on a CPU can be slower than fp32: bf16 10.5x on a CPU "
                 f"without bf16 units, README)")
    return text


def describe_data(config: Config, source: str, world_size: int) -> tuple[str, object | None]:
    """The data pipeline's summary, or why it is not available (a dry run reports, never fails on data, and never
    downloads: a data set not yet downloaded is said to be so); and the data set where it was built."""
    problems = check_dataset_args(config.dataset.name, config.dataset.args)
    if not problems and download_pending(config.dataset.name, config.dataset.args):
        return (f"{config.dataset.name}: not in {config.dataset.args.root} yet; the run downloads it there first "
                f"(dataset.args.download: true)"), None
    try:
        if not problems:
            dataset = build.build_training_data(config, source=source)
            require_one_global_batch(len(dataset), config.micro_batchsize, world_size)
            return describe_dataset(config, dataset), dataset
    except DatasetError as error:  # e.g. a download that cannot happen offline
        problems = [str(error)]
    return "NOT AVAILABLE: " + "; ".join(problems), None


def missing_reference(config: Config, dataset, world_size: int) -> list[tuple[str, str]]:
    """A row saying that the run would stop for want of its evaluation's reference, which under torchrun must be
    computed before training; none where it exists or is not needed."""
    try:
        require_reference_before_distributed_training(config, dataset, world_size)
    except (ConfigError, DatasetError) as error:  # the latter: a reference split that cannot be read
        return [("reference", f"NOT AVAILABLE: {error}")]
    return []


def describe_dataset(config: Config, dataset) -> str:
    """'NAME: N images, K classes, Spx[, held on the device][; per class: ...]': a dry run's and a run's data line."""
    counts = f"; {describe_class_counts(dataset)}" if dataset.n_classes > 1 else ""
    held = ", held on the device" if config.performance.data_on_device else ""
    return (f"{config.dataset.name}: {len(dataset):,} images, {classes_text(dataset.n_classes)}, "
            f"{dataset.size}px{held}{counts}")


def describe_terms(config: Config, gen: nn.Module) -> str:
    """The training terms besides the adversarial loss and SR that this run uses."""
    settings, terms = config.updater, []
    if settings.diffaugment:
        terms.append(f"DiffAugment {settings.diffaugment}")
    if settings.lecam.weight > 0:
        terms.append(f"LeCam {settings.lecam.weight} ({settings.lecam.form} form, decay {settings.lecam.decay})")
    if settings.gsr.enabled:
        terms.append(f"gSR ({describe_gsr(config, gen)})")
    if settings.ema.enabled:
        terms.append(f"EMA of G {settings.ema.decay} from {settings.ema.start_iteration}")
    terms.append(f"fake labels {settings.fake_labels}")
    return "; ".join(terms)


def describe_gsr(config: Config, gen: nn.Module) -> str:
    """gSR's weights, power steps and grouping of G's layers, with what makes a setting do nothing."""
    gsr = config.updater.gsr
    weights = (f"class-balanced w {gsr.weight}, beta {gsr.effective_number_beta}" if gsr.class_balanced
               else "lambda 1: gsr.weight counts only with class_balanced")
    nothing = "; weight 0: gSR adds nothing" if gsr.class_balanced and gsr.weight == 0 else ""
    released = ", the release's beta estimate (a lower bound of sigma_beta)" if gsr.released_beta_estimate else ""
    return f"{weights}, {gsr.power_iterations} power steps{released}; {describe_grouping(gen)}{nothing}"


def dry_run(config: Config, models: build.Models, world: World, plan: runfolder.Plan, source: str,
            resumed: list[str] = ()) -> None:
    """What the run would be: models, optimizers, batch, terms, device, folder and data, one row each; then what a
    resume would say (``resumed``)."""
    out = f"{plan.first} (continues the run in place)" if plan.in_place else \
        f"{plan.first}{'' if plan.only else ' (or the next free name, if taken)'}"
    rows = [("generator", f"{config.models.generator.name}: {build.count_parameters(models.gen):,} parameters"),
            ("discriminator", f"{config.models.discriminator.name}: {build.count_parameters(models.dis):,} parameters"),
            ("optimizers", f"Adam G lr {config.adam_G.alpha} betas ({config.adam_G.beta1}, {config.adam_G.beta2}); "
                           f"Adam D lr {config.adam_D.alpha} betas ({config.adam_D.beta1}, {config.adam_D.beta2})"),
            ("global batch", batch_summary(config, world)),
            ("updater", f"n_dis {config.updater.n_dis}, {config.updater.loss_type} loss, order {config.updater.order}, "
                        f"apply_SR {config.updater.apply_SR} ({config.updater.sr.mode}, every {config.updater.sr.interval})"),
            ("terms", describe_terms(config, models.gen)),
            ("performance", describe_performance(config, world.device)),
            ("device", f"{world.device} (world size {world.size})"),
            ("run folder", out)]
    data, dataset = describe_data(config, source, world.size)
    rows.append(("data", data))
    if dataset is not None:
        rows += missing_reference(config, dataset, world.size)
    if world.is_main:
        width = max(len(name) for name, _ in rows)
        print("\n".join([f"{name:>{width}}  {text}" for name, text in rows] + list(resumed)))
