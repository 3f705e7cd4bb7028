"""Model registry: config files name a model class and its keyword arguments."""
import torch.nn as nn

from source.models.discriminator import SNResNetProjectionDiscriminator
from source.models.generator import ResNetGenerator

MODELS: dict[str, type[nn.Module]] = {
    "ResNetGenerator": ResNetGenerator,
    "SNResNetProjectionDiscriminator": SNResNetProjectionDiscriminator,
}


def build_model(name: str, args: dict) -> nn.Module:
    """Instantiates ``MODELS[name](**args)``; names and argument keys are checked (with suggestions) by the
    config validator, so this only guards direct calls."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**args)


__all__ = ["MODELS", "build_model", "ResNetGenerator", "SNResNetProjectionDiscriminator"]
