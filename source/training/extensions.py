"""Extensions fired by the Trainer: log, progress bar, preview grid, snapshot.

Extensions that write files do so on rank 0 only; the snapshot extension is collective because
it gathers every rank's RNG state.
"""
from __future__ import annotations

import time

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from source.training.trainer import Extension, Trainer


class LogReport(Extension):
    """Mean of the losses since the last report -> console, ``log.jsonl`` and tensorboardX."""

    at_end = True

    def __init__(self, interval: int):
        self.interval = interval
        self._sums: dict[str, float] = {}
        self._count = 0
        self._last_time = time.perf_counter()
        self._last_iteration: int | None = None

    def observe(self, observation: dict[str, float]) -> None:
        for key, value in observation.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def __call__(self, trainer: Trainer) -> None:
        if self._count == 0:
            return
        now = time.perf_counter()
        since = self._last_iteration if self._last_iteration is not None else trainer.iteration - self._count
        record = {"iteration": trainer.iteration, "epoch": trainer.updater.batches.epoch,
                  "elapsed": round(trainer.elapsed, 2),
                  **{k: v / self._count for k, v in self._sums.items()},
                  **trainer.updater.learning_rates(),
                  "it_per_s": (trainer.iteration - since) / max(now - self._last_time, 1e-9)}
        trainer.log.write(record)
        if trainer.world.is_main:
            tqdm.write(" ".join(_format(k, v) for k, v in record.items()))
        self._sums, self._count = {}, 0
        self._last_time, self._last_iteration = now, trainer.iteration


class Observe(Extension):
    """Feeds every iteration's losses to the LogReport (kept separate so the report can be sparse)."""

    def __init__(self, report: LogReport):
        self.report = report

    def __call__(self, trainer: Trainer) -> None:
        self.report.observe(trainer.observation)


class ProgressBar(Extension):
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: tqdm | None = None

    def __call__(self, trainer: Trainer) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=trainer.stop, initial=trainer.iteration - 1, unit="it", dynamic_ncols=True,
                             desc="train", mininterval=1.0)
        self._bar.update(1)

    def finalize(self, trainer: Trainer) -> None:
        if self._bar is not None:
            self._bar.close()


class Preview(Extension):
    """A grid from fixed latents (one row per class shown), so successive grids are comparable."""

    at_end = True

    def __init__(self, interval: int, seed: int, rows: int = 10, columns: int = 10):
        self.interval = interval
        self.seed = seed
        self.rows, self.columns = rows, columns

    def __call__(self, trainer: Trainer) -> None:
        if not trainer.world.is_main:
            return
        images = self.samples(trainer.updater.gen_module, trainer.world.device)
        folder = trainer.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid = (images + 1) / 2
        save_image(grid, folder / f"preview_iter_{trainer.iteration:08d}.png", nrow=self.columns, padding=1)
        save_image(grid, folder / "latest.png", nrow=self.columns, padding=1)

    @torch.no_grad()
    def samples(self, gen: torch.nn.Module, device: torch.device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        z = torch.randn(self.rows * self.columns, gen.dim_z, generator=generator).to(device)
        labels = None
        if gen.n_classes > 0:
            classes = torch.linspace(0, gen.n_classes - 1, self.rows).round().long()
            labels = classes.repeat_interleave(self.columns).to(device)
        was_training = gen.training
        gen.eval()  # running BN statistics, as the original's sampling
        try:
            return gen(z, labels).clamp(-1, 1).cpu()
        finally:
            gen.train(was_training)


class Snapshot(Extension):
    at_end = True

    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, trainer: Trainer) -> None:
        path = trainer.save_snapshot()
        if trainer.world.is_main:
            tqdm.write(f"snapshot -> {path}")


def _format(key: str, value) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"
