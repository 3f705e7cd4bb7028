"""Model registry: config files name a model class and its keyword arguments."""
import inspect
from typing import Callable

import torch.nn as nn

from source.models.biggan import (BigGANDiscriminator, BigGANGenerator, check_biggan_discriminator_args,
                                  check_biggan_generator_args)
from source.models.discriminator import SNResNetProjectionDiscriminator, check_discriminator_args
from source.models.generator import ResNetGenerator, check_generator_args

MODELS: dict[str, type[nn.Module]] = {
    "ResNetGenerator": ResNetGenerator,
    "SNResNetProjectionDiscriminator": SNResNetProjectionDiscriminator,
    "BigGANGenerator": BigGANGenerator,
    "BigGANDiscriminator": BigGANDiscriminator,
}

# name -> the check its constructor runs first, callable without building (and allocating) the network
_ARG_CHECKS: dict[str, Callable[..., None]] = {
    "ResNetGenerator": check_generator_args,
    "SNResNetProjectionDiscriminator": check_discriminator_args,
    "BigGANGenerator": check_biggan_generator_args,
    "BigGANDiscriminator": check_biggan_discriminator_args,
}


def build_model(name: str, args: dict) -> nn.Module:
    """Instantiates ``MODELS[name](**args)``; names and argument keys are checked (with suggestions) by the
    config validator, so this only guards direct calls."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**args)


def check_model_args(name: str, args: dict) -> None:
    """Raise ValueError when ``MODELS[name](**args)`` would reject a value (e.g. ``ch: 0``), without building it."""
    bound = inspect.signature(MODELS[name]).bind(**args)
    bound.apply_defaults()
    _ARG_CHECKS[name](**bound.arguments)


__all__ = ["MODELS", "build_model", "check_model_args", "ResNetGenerator", "SNResNetProjectionDiscriminator",
           "BigGANGenerator", "BigGANDiscriminator"]
