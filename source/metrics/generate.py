"""Generated images for evaluation: fixed inputs, G in eval mode, uint8 output, Inception features.

The evaluation set (z ~ N(0, I), labels uniform over the classes) is drawn on the CPU from one
seed, independently of the world size; rank r of W generates the r-th contiguous shard, so the
shards gathered in rank order are exactly the single-process set. Reusing the seed at every
evaluation makes successive points of an IS/FID curve differ by the model, not by the latents.

G runs in eval mode (no spectral-norm power step), as the original's `gen_images`. Its BatchNorm
layers normalize as `evaluation.g_batchnorm` says (`GBatchNorm`): with their running statistics
(`running`, the original's eval mode, the default), with each generation batch's statistics (`batch`,
gSR's StudioGAN release, whose BNs have track_running_stats=False), or with BigGAN's standing
statistics (`standing`: running statistics reset and re-accumulated as a cumulative average over
`standing_steps` forwards of seeded random (z, y) batches). `generation_mode` puts G back exactly as it
was (parameters, buffers, SN's u/v, train/eval flags, ghost batches), so evaluating never changes the
model. Images are quantized with `to_uint8` (the original's truncation); 1-channel images are
replicated to RGB by the Inception backbone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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


G_BATCHNORM_MODES = ("running", "batch", "standing")
STANDING_STEPS = 16        # BigGAN's standing statistics: forwards accumulated (evaluation.standing_steps)
STANDING_SEED = 1_000_003  # the standing inputs' seed: fixed, and apart from the evaluation latents' (the run's seed)


@dataclass(frozen=True)
class GBatchNorm:
    """How G's BatchNorm layers normalize while G generates for evaluation (`evaluation.g_batchnorm`).

    batch_size: the generation batch (whose statistics `batch` uses), and the size of each standing forward.
    """
    mode: str = "running"
    batch_size: int = 100
    standing_steps: int = STANDING_STEPS
    seed: int = STANDING_SEED

    def __post_init__(self):
        if self.mode not in G_BATCHNORM_MODES:
            raise ValueError(f"g_batchnorm: unknown mode {self.mode!r}; choose from {', '.join(G_BATCHNORM_MODES)}")
        if self.batch_size < 1 or self.standing_steps < 1:
            raise ValueError(f"g_batchnorm: batch_size and standing_steps must be >= 1, got {self.batch_size} "
                             f"and {self.standing_steps}")

    def record(self) -> dict:
        """The protocol entries: the mode, and what its statistics depend on."""
        if self.mode == "batch":
            return {"g_batchnorm": "batch", "g_batchnorm_batch_size": self.batch_size}
        if self.mode == "standing":
            return {"g_batchnorm": "standing", "standing_steps": self.standing_steps,
                    "standing_batch_size": self.batch_size, "standing_seed": self.seed}
        return {"g_batchnorm": "running"}

    def for_images(self, n: int) -> GBatchNorm:
        """This mode for generating n images: in `batch` mode fewer images than the batch size are one batch of n,
        whose statistics G then uses (and the record says so)."""
        return replace(self, batch_size=min(self.batch_size, n)) if self.mode == "batch" else self


RUNNING = GBatchNorm()


def g_batchnorm(settings, override: str | None = None, batch_size: int | None = None) -> GBatchNorm:
    """The mode of an `evaluation` block (EvaluationConfig), `override` (a command-line flag) replacing its
    g_batchnorm and `batch_size` (the generation batch in effect) its batch_size."""
    return GBatchNorm(override or settings.g_batchnorm, batch_size or settings.batch_size, settings.standing_steps)


_ACTIVE: dict[int, GBatchNorm] = {}  # id(G) -> the mode G is in, while inside generation_mode


@contextmanager
def generation_mode(gen: nn.Module, batchnorm: GBatchNorm | str | None = None,
                    device: torch.device | None = None) -> Iterator[nn.Module]:
    """G ready to generate for evaluation: eval mode, its BatchNorm layers as `batchnorm` says; afterwards
    exactly as before (every module's train/eval flag, BN buffers and momentum, ghost batches).

    None keeps the mode G is already in (an enclosing `generation_mode`), else `running`; entering the mode G
    is already in does nothing, so standing statistics are accumulated once for a whole evaluation. Only
    BatchNorm layers ever run in train mode: spectral norm stays in eval mode (no power step, u/v untouched).
    `device`: where the standing inputs go (default: G's parameters' device).
    """
    active = _ACTIVE.get(id(gen))
    mode = GBatchNorm(batchnorm) if isinstance(batchnorm, str) else batchnorm or active or RUNNING
    if active is not None and active.record() == mode.record():
        yield gen
        return
    flags = [(module, module.training) for module in gen.modules()]
    norms = [module for module in gen.modules() if isinstance(module, _BatchNorm)] if mode.mode != "running" else []
    saved = [_save_norm(norm) for norm in norms]
    _ACTIVE[id(gen)] = mode
    try:
        gen.eval()
        for norm in norms:  # batch statistics over the whole batch (no ghost batches)
            norm.train()
            norm.ghost_batch = None
        if mode.mode == "standing":
            _accumulate_standing(gen, norms, mode, device)
        yield gen
    finally:
        for norm, state in zip(norms, saved):
            _restore_norm(norm, state)
        for module, training in flags:
            module.training = training
        if active is None:
            _ACTIVE.pop(id(gen), None)
        else:
            _ACTIVE[id(gen)] = active


def standing_inputs(gen: nn.Module, mode: GBatchNorm) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The standing forwards' (z, labels): z ~ N(0, I), labels uniform, one generator seeded with mode.seed, so
    every rank and every evaluation accumulates the same statistics."""
    generator = torch.Generator().manual_seed(mode.seed)
    for _ in range(mode.standing_steps):
        z = torch.randn(mode.batch_size, gen.dim_z, generator=generator)
        yield z, (torch.randint(gen.n_classes, (mode.batch_size,), generator=generator) if gen.n_classes else None)


@torch.no_grad()
def _accumulate_standing(gen: nn.Module, norms: list[_BatchNorm], mode: GBatchNorm,
                         device: torch.device | None) -> None:
    """BigGAN's standing statistics (as StudioGAN's apply_standing_statistics): reset, momentum None (the
    cumulative average of the forwards' batch statistics), then normalize with them in eval mode."""
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    if device is None:
        device = next(iter(gen.parameters()), torch.empty(0)).device
    for z, labels in standing_inputs(gen, mode):
        gen(z.to(device), None if labels is None else labels.to(device))
    for norm in norms:
        norm.eval()


_ABSENT = object()


def _save_norm(norm: _BatchNorm) -> dict:
    buffers = {name: None if buffer is None else buffer.clone() for name, buffer in norm.named_buffers(recurse=False)}
    return {"buffers": buffers, "momentum": norm.momentum, "ghost_batch": norm.__dict__.get("ghost_batch", _ABSENT)}


@torch.no_grad()
def _restore_norm(norm: _BatchNorm, state: dict) -> None:
    for name, value in state["buffers"].items():
        if value is not None:
            getattr(norm, name).copy_(value)
    norm.momentum = state["momentum"]
    if state["ghost_batch"] is _ABSENT:
        norm.__dict__.pop("ghost_batch", None)  # back to the class's default
    else:
        norm.ghost_batch = state["ghost_batch"]


@torch.no_grad()
def generate_uint8(
    gen: nn.Module, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device: torch.device,
    batchnorm: GBatchNorm | str | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 NCHW images on `device`, batch by batch, from G in eval mode with its BatchNorm as `batchnorm`
    says (None: the enclosing `generation_mode`'s, else running statistics)."""
    with generation_mode(gen, batchnorm, device):
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
    batchnorm: GBatchNorm | str | None = None,
) -> InceptionFeatures:
    """Pool3 features (and logits, when the weights have them) of the images G makes from (z, labels)."""
    images = generate_uint8(gen, z, labels, batch_size, device, batchnorm)
    batches = [backbone.features(batch) for batch in images]
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
