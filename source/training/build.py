"""config -> models, optimizers, data, updater: the one place that turns a Config into objects."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from source.config import Config, ConfigError
from source.datasets import build_dataset
from source.datasets.iterator import InfiniteBatchIterator
from source.links import set_ghost_batch
from source.models import build_model
from source.spectral.sr import SpectralRegularizer
from source.training import performance
from source.training.distributed import World
from updater import Updater


@dataclass
class Models:
    gen: nn.Module
    dis: nn.Module


def build_models(config: Config, device: torch.device) -> Models:
    spec_g, spec_d = config.models.generator, config.models.discriminator
    gen = build_model(spec_g.name, spec_g.args).to(device)
    set_ghost_batch(gen, config.bn_batch)
    return Models(gen=gen, dis=build_model(spec_d.name, spec_d.args).to(device))


def build_optimizer(model: nn.Module, adam) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=adam.alpha, betas=(adam.beta1, adam.beta2), eps=adam.eps)


def build_batches(config: Config, world: World, source: str = "config") -> InfiniteBatchIterator:
    dataset = build_dataset(config.dataset.name, config.dataset.args)
    check_dataset_matches_models(config, dataset, source)
    return InfiniteBatchIterator(dataset, batch_size=config.micro_batchsize, seed=config.seed,
                                 rank=world.rank, world_size=world.size, num_workers=config.num_workers)


def check_dataset_matches_models(config: Config, dataset, source: str) -> None:
    gen = config.models.generator.args
    expected = {"size": gen.get("resolution", 128), "channels": gen.get("channels", 3)}
    for name, value in expected.items():
        if getattr(dataset, name) != value:
            raise ConfigError(f"{source}: dataset.args: the data have {name} {getattr(dataset, name)} but the "
                              f"generator is built for {value}")
    n_classes = gen.get("n_classes", 0)
    if n_classes and dataset.n_classes > n_classes:
        raise ConfigError(f"{source}: models.generator.args.n_classes: {n_classes} but the dataset has "
                          f"{dataset.n_classes} classes")


def wrap_distributed(model: nn.Module, world: World) -> nn.Module:
    if not world.distributed:
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP re-broadcasts rank 0's buffers only at the first forward after a synchronized backward; the
    # Updater makes every rank hold rank 0's buffers at the end of each iteration (broadcast_buffers).
    return DistributedDataParallel(model, device_ids=device_ids)


def build_regularizer(config: Config) -> SpectralRegularizer:
    sr = config.updater.sr
    return SpectralRegularizer(mode=sr.mode, interval=sr.interval, include_linear=sr.include_linear,
                               rebase_on_resume=sr.rebase_on_resume)


def build_updater(config: Config, world: World, models: Models, batches) -> Updater:
    for model in (models.gen, models.dis):
        performance.prepare_model(model, config.performance)
    return Updater(gen=wrap_distributed(models.gen, world), dis=wrap_distributed(models.dis, world),
                   opt_gen=build_optimizer(models.gen, config.adam_G), opt_dis=build_optimizer(models.dis, config.adam_D),
                   batches=batches, config=config, world=world, regularizer=build_regularizer(config))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
