"""Generated images for evaluation: fixed inputs, G in eval mode, uint8 output, Inception features.

The evaluation set (z ~ N(0, I), labels uniform over the classes) is drawn on the CPU from one
seed, independently of the world size; rank r of W generates the r-th contiguous shard, so the
shards gathered in rank order are exactly the single-process set. Reusing the seed at every
evaluation makes successive points of an IS/FID curve differ by the model, not by the latents.

G runs in eval mode (running BatchNorm statistics, no spectral-norm power step), as the original's
`gen_images`, so evaluating never changes the model. Images are quantized with `to_uint8` (the
original's truncation); 1-channel images are replicated to RGB by the Inception backbone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .inception import InceptionBackbone, InceptionFeatures, to_uint8


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's share of n samples; shares differ by at most one and cover 0..n in rank order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def sample_inputs(
    n: int, dim_z: int, n_classes: int, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z [n, dim_z], labels [n] or None for an unconditional G); labels default to uniform random classes."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim_z, generator=generator)
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"sample_inputs: {len(labels)} labels for {n} samples")
        return z, labels.long()
    if n_classes == 0:
        return z, None
    return z, torch.randint(n_classes, (n,), generator=generator)


def check_classes(classes: list[int], n_classes: int) -> None:
    """One-line refusal of classes a generator does not have (e.g. from --classes)."""
    if n_classes == 0:
        raise ValueError("this generator is unconditional (n_classes=0); leave out --classes")
    outside = [label for label in classes if not 0 <= label < n_classes]
    if outside:
        raise ValueError(f"--classes {outside}: the generator has classes 0..{n_classes - 1}")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def generate_uint8(
    gen: nn.Module, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """uint8 NCHW images on `device`, batch by batch, from G in eval mode."""
    with eval_mode(gen):
        for start in range(0, len(z), batch_size):
            y = None if labels is None else labels[start : start + batch_size].to(device)
            yield to_uint8(gen(z[start : start + batch_size].to(device), y))


def generated_features(
    gen: nn.Module,
    backbone: InceptionBackbone,
    z: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
) -> InceptionFeatures:
    """Pool3 features (and logits, when the weights have them) of the images G makes from (z, labels)."""
    batches = [backbone.features(images) for images in generate_uint8(gen, z, labels, batch_size, device)]
    return concatenate_features(batches)


def concatenate_features(parts: list[InceptionFeatures]) -> InceptionFeatures:
    """One InceptionFeatures of the parts in order; logits only when every part has them."""
    if not parts:
        raise ValueError("no features to concatenate (zero samples)")
    logits = [part.logits for part in parts]
    has_logits = all(part is not None for part in logits)
    return InceptionFeatures(
        np.concatenate([part.pool3 for part in parts]), np.concatenate(logits) if has_logits else None
    )
