"""What the Trainer fires after iterations (``Extension``: logging, snapshots, spectra, evaluations), and how it reads
the updater's losses for them (``read_losses``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from source.training.trainer import Trainer


class Extension:
    """Something done every ``interval`` iterations (and, if ``at_end``, after the last one).

    Before an extension that ``reads_losses`` fires, the trainer reads the losses of the iterations since the last
    such moment (one host synchronisation for all) and hands each iteration's to every extension's ``observe``."""

    interval: int = 1
    at_end: bool = False
    reads_losses: bool = True
    takes_long: str | None = None  # what it is, when it may keep a stop signal waiting for minutes (an evaluation)
    record_file: str | None = None  # the run folder's JSONL file of its rows (``Trainer.catch_up``)

    def __call__(self, trainer: "Trainer") -> None:
        raise NotImplementedError

    def observe(self, observation: dict[str, float]) -> None:
        pass

    def finalize(self, trainer: "Trainer") -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def read_losses(observations: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Iterations' losses (the updater's 0-d device tensors) as numbers, with one host synchronisation for all."""
    if not observations:
        return []
    rows = torch.stack([torch.stack(list(observation.values())) for observation in observations]).tolist()
    return [dict(zip(observation, row)) for observation, row in zip(observations, rows)]
