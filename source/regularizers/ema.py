"""Exponential moving average of G's state (BigGAN; gSR's BigGAN configs: decay 0.9999 from iteration 1000).

As released, every state entry is averaged, buffers too (BN running statistics, SN's u/v); before
``start_iteration`` the average is a plain copy. Evaluation and generator exports use the average when it
is on. It is updated at the end of each iteration, after the ranks' buffers have been made equal, so it is
the same on every rank.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class GeneratorEMA:
    def __init__(self, gen: nn.Module, decay: float, start_iteration: int):
        self.decay, self.start_iteration = decay, start_iteration
        self.module = copy.deepcopy(gen).requires_grad_(False)

    @torch.no_grad()
    def update(self, gen: nn.Module, iteration: int) -> None:
        """Average in G's state after ``iteration`` (0-based index of the iteration just done)."""
        decay = self.decay if iteration >= self.start_iteration else 0.0
        source = gen.state_dict()
        floats, targets = [], []
        for name, target in self.module.state_dict().items():
            if target.is_floating_point():
                floats.append(source[name])
                targets.append(target)
            else:
                target.copy_(source[name])  # counters (BN's num_batches_tracked)
        torch._foreach_lerp_(targets, floats, 1.0 - decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
