"""The adversarial losses of D and G (hinge: SNGAN/SRGANs; dcgan: the non-saturating logistic loss), on logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def hinge_dis(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_gen(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def dcgan_dis(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def dcgan_gen(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake).mean()


LOSSES: dict[str, tuple[Callable, Callable]] = {"hinge": (hinge_dis, hinge_gen), "dcgan": (dcgan_dis, dcgan_gen)}
