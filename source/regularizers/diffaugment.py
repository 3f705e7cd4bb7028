"""DiffAugment (Zhao et al., NeurIPS 2020): differentiable augmentation of every image D sees.

The policy is a comma-separated list of ``color`` (brightness, saturation, contrast), ``translation``
(up to 1/8 of the size, zero fill) and ``cutout`` (a zeroed square of half the size), applied in that
order as the official code does, with fresh random draws per sample. Here the draws come from a generator
seeded by (seed, iteration, phase) for the whole global batch and are sliced like the latents, so an
augmented batch is the same after a resume and on any number of processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPERATIONS = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> tuple[str, ...]:
    """"color,translation" -> ("color", "translation"); ValueError naming an unknown operation."""
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown DiffAugment operation {unknown[0]!r}; known: {', '.join(OPERATIONS)}")
    return names


def draw(policy: tuple[str, ...], n: int, size: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-sample random parameters of ``policy`` for ``n`` images of ``size`` x ``size`` (a dict of (n,) tensors)."""
    params = {}

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    def integers(low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=generator, device=device)

    if "color" in policy:
        params.update(brightness=uniform(-0.5, 0.5), saturation=uniform(0.0, 2.0), contrast=uniform(0.5, 1.5))
    if "translation" in policy:
        shift = int(size * TRANSLATION_RATIO + 0.5)
        params.update(shift_rows=integers(-shift, shift + 1), shift_columns=integers(-shift, shift + 1))
    if "cutout" in policy:
        side = int(size * CUTOUT_RATIO + 0.5)
        params.update(cut_rows=integers(0, size + (1 - side % 2)), cut_columns=integers(0, size + (1 - side % 2)))
    return params


def augment(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply drawn ``params`` to a batch (N, C, H, W) in [-1, 1]; differentiable in ``x``."""
    if "brightness" in params:
        x = _color(x, params)
    if "shift_rows" in params:
        x = _translate(x, params["shift_rows"], params["shift_columns"])
    if "cut_rows" in params:
        x = _cutout(x, params["cut_rows"], params["cut_columns"])
    return x


def _color(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    def per_sample(name: str) -> torch.Tensor:
        return params[name].to(x.dtype).view(-1, 1, 1, 1)

    x = x + per_sample("brightness")
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * per_sample("saturation") + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * per_sample("contrast") + mean


def _translate(x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """out[i, j] = x[i + rows, j + columns], zero outside the image."""
    n, _, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    row_index = (torch.arange(height, device=x.device) + rows[:, None] + 1).clamp(0, height + 1)
    column_index = (torch.arange(width, device=x.device) + columns[:, None] + 1).clamp(0, width + 1)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indices around the channel slice put (n, H, W) first: the result is (n, H, W, C)
    return padded[batch, :, row_index[:, :, None], column_index[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Zero a square of side size/2 centred at (rows, columns), clipped to the image."""
    _, _, height, width = x.shape
    side_rows, side_columns = int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)
    top, left = rows - side_rows // 2, columns - side_columns // 2
    r = torch.arange(height, device=x.device)
    c = torch.arange(width, device=x.device)
    in_rows = (r >= top[:, None]) & (r < top[:, None] + side_rows)
    in_columns = (c >= left[:, None]) & (c < left[:, None] + side_columns)
    keep = ~(in_rows[:, :, None] & in_columns[:, None, :])
    return x * keep[:, None].to(x.dtype)


class DiffAugment:
    """The updater's view: ``params(phase draws)`` once per phase, ``apply(images, params, part)`` per micro-batch."""

    def __init__(self, policy: str, size: int):
        self.policy = parse_policy(policy)
        self.size = size

    def params(self, n: int, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
        return draw(self.policy, n, self.size, generator, device)

    @staticmethod
    def apply(images: torch.Tensor, params: dict[str, torch.Tensor], index: torch.Tensor | slice) -> torch.Tensor:
        return augment(images, {name: value[index] for name, value in params.items()})
