"""Model registry: config files name a model class and its keyword arguments."""
import difflib

import torch.nn as nn

from source.models.discriminator import SNResNetProjectionDiscriminator
from source.models.generator import ResNetGenerator

MODELS: dict[str, type[nn.Module]] = {
    "ResNetGenerator": ResNetGenerator,
    "SNResNetProjectionDiscriminator": SNResNetProjectionDiscriminator,
}


def build_model(name: str, args: dict) -> nn.Module:
    """Instantiates ``MODELS[name](**args)``; argument keys are checked by the config validator."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(sorted(MODELS))}"
        raise ValueError(f"unknown model '{name}'; {hint}")
    return MODELS[name](**args)


__all__ = ["MODELS", "build_model", "ResNetGenerator", "SNResNetProjectionDiscriminator"]
