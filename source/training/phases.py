"""The random inputs of each phase of an iteration: latents, G's labels and DiffAugment's draws.

A phase is one D step (0..n_dis-1) or the G step (``G_PHASE``). Its draws come from a generator seeded by
(seed, iteration, phase), never from the global RNG: they are the same after a resume, whatever the world size
and accumulation (each micro-batch takes its slice of the global batch's draws), and whatever else consumed
random numbers before.
"""
from __future__ import annotations

import torch
from torch import nn

from source.regularizers import DiffAugment

G_PHASE = 1 << 20  # phase id of the G step's latents; D steps use 0..n_dis-1
AUGMENT_STREAM = 1 << 21  # added to a phase id: the random stream of that phase's DiffAugment draws


def mixed_seed(*parts: int) -> int:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**61 - 1)
    return seed


class PhaseDraws:
    def __init__(self, seed: int, device: torch.device, augment: DiffAugment | None,
                 label_prior: torch.Tensor | None):
        self.seed, self.device, self.augment, self.label_prior = seed, device, augment, label_prior

    def generator(self, iteration: int, phase: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mixed_seed(self.seed, iteration, phase))

    def latents(self, gen: nn.Module, iteration: int, phase: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents and labels (None: G is unconditional) of the phase's ``n`` samples; labels follow
        ``label_prior``'s class frequencies where it is set, else they are uniform."""
        generator = self.generator(iteration, phase)
        z = gen.sample_z(n, self.device, generator)
        if not gen.n_classes:
            return z, None
        if self.label_prior is not None:
            return z, torch.multinomial(self.label_prior, n, replacement=True, generator=generator)
        return z, gen.sample_y(n, self.device, generator)

    def augmentation(self, iteration: int, phase: int, n: int) -> dict[str, torch.Tensor] | None:
        """DiffAugment's random draws for the phase's ``n`` images (None when it is off)."""
        if self.augment is None:
            return None
        return self.augment.params(n, self.generator(iteration, phase + AUGMENT_STREAM), self.device)
