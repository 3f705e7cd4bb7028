"""The learning-rate schedule: Chainer's LinearShift, written into the optimizers before each iteration."""
from __future__ import annotations

import torch


def linear_shift(alpha: float, iteration: int, decay_start: int, stop: int) -> float:
    """Chainer's LinearShift(alpha -> 0 over [decay_start, stop]) at ``iteration`` completed updates."""
    if iteration <= decay_start or stop <= decay_start:
        return alpha
    return alpha * max(0.0, 1.0 - (iteration - decay_start) / (stop - decay_start))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate; a tensor one (step graphs: the captured Adam reads it from device memory) is
    filled in place, never rebound."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
