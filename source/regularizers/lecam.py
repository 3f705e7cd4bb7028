"""LeCam regularization of D (Tseng et al., CVPR 2021), in the two forms in use.

``gsr`` (as gSR released it): the anchors are EMAs (decay 0.99) of D's outputs *per batch position*,
zero during the first iteration and updated with the current outputs before the penalty
    mean(relu(D(x_real) - a_fake)^2) + mean(relu(D(x_fake) - a_real)^2).
``lecam`` (LeCam-GAN, StudioGAN): scalar EMAs of the batch means, tracking without decay before
``start_iteration``, and the penalty mean(relu(D(x_real) - a_fake)^2) + mean(relu(a_real - D(x_fake))^2)
from then on. Here the scalar anchors are updated after each D step with the global batch's means (so they
are the same on every rank and for any accumulation); the penalty uses the anchors of the steps before.

The anchors are state: in snapshots, and identical on every rank after each D step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from source.training.distributed import World, all_reduce_mean


class LeCam:
    def __init__(self, weight: float, form: str, decay: float, start_iteration: int, batchsize: int,
                 device: torch.device):
        self.weight, self.form, self.decay, self.start_iteration = weight, form, decay, start_iteration
        size = batchsize if form == "gsr" else 1
        self.anchor_real = torch.zeros(size, device=device)
        self.anchor_fake = torch.zeros(size, device=device)
        self._sums = torch.zeros(3, device=device)  # lecam form: sum of real, sum of fake outputs, count
        self._own = torch.zeros(size, dtype=torch.bool, device=device)  # gsr form: positions this rank updated

    def penalty(self, real: torch.Tensor, fake: torch.Tensor, part: slice,
                iteration: int | torch.Tensor) -> torch.Tensor:
        """The weighted penalty for one micro-batch (its outputs are global positions ``part`` of the batch).

        ``iteration`` may be a 0-d tensor on the device: the switches by iteration are then device arithmetic, which
        a CUDA graph replays as it runs them (a Python branch would be frozen at the capture)."""
        real, fake = real.reshape(-1), fake.reshape(-1)
        iteration = torch.as_tensor(iteration, device=real.device)
        if self.form == "gsr":
            return self.weight * self._gsr_penalty(real, fake, part, iteration > 0)
        with torch.no_grad():
            self._sums += torch.stack([real.sum(), fake.sum(), real.new_full((), float(len(real)))])
        penalty = F.relu(real - self.anchor_fake).square().mean() + F.relu(self.anchor_real - fake).square().mean()
        return torch.where(iteration >= self.start_iteration, self.weight * penalty, 0.0)  # before: only tracking

    def _gsr_penalty(self, real: torch.Tensor, fake: torch.Tensor, part: slice, started: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the release's anchors are 0 during its first iteration (step_count 0)
            for anchor, outputs in ((self.anchor_real, real), (self.anchor_fake, fake)):
                anchor[part] = torch.where(started, self.decay * anchor[part] + (1 - self.decay) * outputs,
                                           anchor[part])
            self._own[part] |= started
        return (F.relu(real - self.anchor_fake[part]).square().mean()
                + F.relu(fake - self.anchor_real[part]).square().mean())

    def end_step(self, iteration: int, world: World) -> None:
        """After D's optimizer step: make the anchors those of the whole global batch, on every rank."""
        if self.form == "gsr":
            if world.distributed:  # each position was updated by exactly one rank: sum the owners' values
                for anchor in (self.anchor_real, self.anchor_fake):
                    anchor.mul_(self._own)
                    dist.all_reduce(anchor)
            self._own.zero_()
            return
        sums = all_reduce_mean(self._sums, world)
        decay = 0.0 if iteration < self.start_iteration else self.decay
        self.anchor_real.mul_(decay).add_((1 - decay) * sums[0] / sums[2])
        self.anchor_fake.mul_(decay).add_((1 - decay) * sums[1] / sums[2])
        self._sums.zero_()

    def state_dict(self) -> dict:
        return {"anchor_real": self.anchor_real.clone(), "anchor_fake": self.anchor_fake.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["anchor_real"].shape != self.anchor_real.shape:
            raise ValueError(f"LeCam anchors of shape {tuple(state['anchor_real'].shape)} in the snapshot, "
                             f"{tuple(self.anchor_real.shape)} here (form or batch size changed)")
        self.anchor_real.copy_(state["anchor_real"])
        self.anchor_fake.copy_(state["anchor_fake"])
