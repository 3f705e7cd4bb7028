"""config -> models, optimizers, data, updater: the one place that turns a Config into objects."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from source.config import Config, ConfigError, ModelSpec, PerformanceConfig
from source.datasets import build_dataset, class_counts, classes_text
from source.datasets.device_batches import DeviceBatchIterator
from source.datasets.iterator import InfiniteBatchIterator
from source.links import set_ghost_batch
from source.models import build_model
from source.regularizers import DiffAugment, GeneratorEMA, LeCam
from source.spectral.gsr import GroupSpectralRegularizer
from source.spectral.sr import SpectralRegularizer
from source.training import performance
from source.training.distributed import World
from source.typed import first_line, out_of_memory
from updater import Terms, Updater


@dataclass
class Models:
    gen: nn.Module
    dis: nn.Module


def build_models(config: Config, device: torch.device) -> Models:
    """G and D as initialised from ``config.seed`` (weights and SN's u alike): the same models in every process and
    on every rank, whatever ran before."""
    torch.manual_seed(config.seed)
    gen = build_sized("generator", config.models.generator, device)
    set_ghost_batch(gen, config.bn_batch)
    models = Models(gen=gen, dis=build_sized("discriminator", config.models.discriminator, device))
    check_training_fits(models, device)
    return models


def build_sized(role: str, spec: ModelSpec, device: torch.device) -> nn.Module:
    """``build_model`` on ``device``, where sizes too large to allocate or to describe (a typo such as ``ch: 6400``)
    are the config's error: the allocator's out-of-memory message would blame the batch size."""
    try:
        return build_model(spec.name, spec.args).to(device)
    except RuntimeError as error:
        if not (out_of_memory(error) or "overflow" in str(error)):
            raise
        raise ConfigError(f"models.{role}.args: the network cannot be built on {device} ({first_line(error)[:200]}); "
                          f"check its sizes (ch, ...)") from None


# fp32 weights, their gradients and Adam's two moments: what training holds per parameter before any activation
TRAINING_BYTES_PER_PARAMETER = 16


def check_training_fits(models: Models, device: torch.device) -> None:
    """Refuse models whose weights, gradients and Adam state alone exceed the device's memory, before training
    allocates them (and the first step runs out of memory, blaming the batch size)."""
    g, d = (sum(p.numel() for p in net.parameters()) for net in (models.gen, models.dis))
    need, have = TRAINING_BYTES_PER_PARAMETER * (g + d), memory_of(device)
    if need > have:
        raise ConfigError(f"models: G has {g:,} and D {d:,} parameters; their weights, gradients and Adam state "
                          f"need {need / 2**30:,.3g} GiB but {device} has {have / 2**30:,.3g} GiB: check "
                          f"models.*.args (ch, ...)")


def memory_of(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_optimizer(model: nn.Module, adam, settings: PerformanceConfig, device: torch.device) -> torch.optim.Adam:
    """Chainer's Adam; ``fused_adam``: one kernel per step instead of torch's default. Step graphs on a GPU need
    it capturable, with the learning rate a device tensor that the schedule fills in place."""
    capturable = settings.step_graphs and device.type == "cuda"
    lr = torch.tensor(adam.alpha, device=device) if capturable else adam.alpha
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                            fused=settings.fused_adam or None, capturable=capturable)


def build_training_data(config: Config, source: str = "config"):
    """The training data set, checked against the models (size, channels, classes)."""
    dataset = build_dataset(config.dataset.name, config.dataset.args)
    check_dataset_matches_models(config, dataset, source)
    return dataset


def build_batches(config: Config, world: World, source: str = "config") -> InfiniteBatchIterator:
    dataset = build_training_data(config, source)
    if config.performance.data_on_device:
        return DeviceBatchIterator(dataset, batch_size=config.micro_batchsize, seed=config.seed,
                                   device=world.device, rank=world.rank, world_size=world.size)
    return InfiniteBatchIterator(dataset, batch_size=config.micro_batchsize, seed=config.seed,
                                 rank=world.rank, world_size=world.size, num_workers=config.num_workers)


def check_dataset_matches_models(config: Config, dataset, source: str) -> None:
    gen = config.models.generator
    expected = {"size": gen.arg("resolution"), "channels": gen.arg("channels")}
    for name, value in expected.items():
        if getattr(dataset, name) != value:
            raise ConfigError(f"{source}: dataset.args: the data have {name} {getattr(dataset, name)} but the "
                              f"generator is built for {value}")
    n_classes = gen.arg("n_classes")
    if n_classes and dataset.n_classes != n_classes:  # more: G would draw labels no real image has
        advice = (f"set the models' n_classes to {dataset.n_classes}" if dataset.n_classes > 1 else
                  "it has no labels: set the models' n_classes to 0 (unconditional)")
        raise ConfigError(f"{source}: models.generator.args.n_classes: {n_classes} but the dataset has "
                          f"{classes_text(dataset.n_classes)}; {advice}")


# channels_last gives a 1x1 kernel's weight (or one over a single input channel) strides that differ from its
# gradient's in size-1 dimensions only: one memory order, two valid sets of strides. DDP's reducer, whose buckets take
# the weight's, warned once per rank of a mismatch that costs nothing (its copy is linear either way). Only those
# shapes are silenced: a real layout mismatch (a 3x3 kernel) still warns.
SAME_MEMORY_STRIDES_WARNING = (r"(?s)Grad strides do not match bucket view strides.*"
                               r"grad\.sizes\(\) = \[\d+, (\d+, 1, 1|1, \d+, \d+)\]")


def wrap_distributed(model: nn.Module, world: World) -> nn.Module:
    if not world.distributed:
        return model
    warnings.filterwarnings("ignore", message=SAME_MEMORY_STRIDES_WARNING, category=UserWarning)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP re-broadcasts rank 0's buffers only at the first forward after a synchronized backward; the
    # Updater makes every rank hold rank 0's buffers at the end of each iteration (broadcast_buffers).
    return DistributedDataParallel(model, device_ids=device_ids)


def build_regularizer(config: Config) -> SpectralRegularizer:
    sr = config.updater.sr
    return SpectralRegularizer(mode=sr.mode, interval=sr.interval, include_linear=sr.include_linear,
                               rebase_on_resume=sr.rebase_on_resume,
                               solve_on="cpu" if config.performance.sr_on_cpu else None)


def generator_class_counts(config: Config, dataset) -> list[int]:
    """Training images per class of G's classes (G may have more classes than the data: those count 0)."""
    n_classes = config.models.generator.arg("n_classes")
    counts = list(class_counts(dataset))
    return counts + [0] * (n_classes - len(counts))


def gen_resolution(config: Config) -> int:
    return config.models.generator.arg("resolution")


def build_terms(config: Config, world: World, gen: nn.Module, dataset) -> Terms:
    """DiffAugment, LeCam, gSR, G's EMA and the fake-label prior, as the config's updater section asks."""
    settings = config.updater
    needs_counts = gen.n_classes and (settings.gsr.enabled or settings.fake_labels == "data")
    counts = generator_class_counts(config, dataset) if needs_counts else []
    if settings.gsr.enabled and 0 in counts:
        raise ConfigError(f"updater.gsr: class {counts.index(0)} has no training images; gSR weights classes by "
                          f"their image counts and needs at least one per class")
    gsr, lecam, ema = settings.gsr, settings.lecam, settings.ema
    return Terms(
        augment=DiffAugment(settings.diffaugment, gen_resolution(config)) if settings.diffaugment else None,
        lecam=LeCam(lecam.weight, lecam.form, lecam.decay, lecam.start_iteration, config.batchsize, world.device)
        if lecam.weight > 0 else None,
        gsr=GroupSpectralRegularizer(counts, gsr.weight, gsr.effective_number_beta, gsr.class_balanced,
                                     gsr.power_iterations, gsr.released_beta_estimate, config.seed)
        if gsr.enabled else None,
        ema=GeneratorEMA(gen, ema.decay, ema.start_iteration) if ema.enabled else None,
        label_prior=torch.tensor(counts, dtype=torch.float, device=world.device)
        if settings.fake_labels == "data" and counts else None)


def build_updater(config: Config, world: World, models: Models, batches) -> Updater:
    # before compilation, so that the EMA copies the plain G; benchmarks pass bare batch streams
    terms = build_terms(config, world, models.gen, getattr(batches, "dataset", None))
    for model in (models.gen, models.dis):
        performance.prepare_model(model, config.performance)
    return Updater(gen=wrap_distributed(models.gen, world), dis=wrap_distributed(models.dis, world),
                   opt_gen=build_optimizer(models.gen, config.adam_G, config.performance, world.device),
                   opt_dis=build_optimizer(models.dis, config.adam_D, config.performance, world.device),
                   batches=batches, config=config, world=world, regularizer=build_regularizer(config), terms=terms)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
