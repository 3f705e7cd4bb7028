"""The training data stream: infinite, shuffled, rank-sharded and exactly resumable.

Epoch e visits the data in the order of a permutation drawn from (seed, e), identical on all ranks.
Global batch b of an epoch is permuted positions [b*G, (b+1)*G) with G = batch_size * world_size,
and rank r takes the slice [b*G + r*batch_size, b*G + (r+1)*batch_size): the union over ranks is
the single-process batch of G, whatever the world size. The last len(dataset) mod G samples of
each epoch are dropped (so the epoch length depends on G).

Images become float32 ``u8 / 127.5 - 1``; when ``dataset.dequantize`` is set, the original's
``(u8 + U[0, 1)) / 128 - 1``. The noise of a sample is a function of (seed, epoch, its position in the epoch)
(source/datasets/streams.py), so it is the same whichever rank, world size, loader worker or resumed run draws
that sample; so is the horizontal flip of data sets with ``random_flip`` set.

One ``next()`` returns one micro-batch of ``batch_size`` samples for this rank; an updater that
accumulates k micro-batches per iteration calls ``next()`` k times. With ``num_workers`` > 0 a loader worker
makes each whole micro-batch (reading, flips, noise, conversion), so the training process only receives it.
"""
import logging
import os
import signal

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from source.datasets.streams import (FLIP_STREAM, dequantization_noise, epoch_permutation, finish_batch,
                                     sample_keys)
from source.datasets.transforms import DatasetError

logger = logging.getLogger(__name__)


def leave_stops_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores Ctrl-C and SIGTERM: the training process stops after its iteration and ends the
    workers. Forked with the trainer's handler, each worker printed its stop message too (9 lines for one Ctrl-C with
    8 workers, with the iteration each had been forked at)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def usable_workers(requested: int) -> int:
    """``requested`` loader workers, at most one per CPU this process may use: more only contend for the cores (and
    torch warns). The batches do not depend on the worker count (module doc), so capping changes no value."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested > cpus:
        logger.info("num_workers %d: %d loader workers, one per CPU available", requested, cpus)
    return min(requested, cpus)


def require_one_global_batch(n_images: int, batch_size: int, world_size: int) -> None:
    if n_images < batch_size * world_size:
        raise DatasetError(f"dataset: {n_images:,} images, fewer than one global micro-batch of {batch_size} x "
                           f"{world_size} ranks: use a larger data set or a smaller micro_batchsize")


class InfiniteBatchIterator:
    """Endless (x: float32 N x C x H x W, y: int64 N) micro-batches for one rank; see the module doc."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        if batch_size < 1 or seed < 0 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(f"InfiniteBatchIterator: need batch_size >= 1, seed >= 0, num_workers >= 0 and 0 <= rank "
                             f"< world_size; got batch_size={batch_size}, seed={seed}, num_workers={num_workers}, "
                             f"rank={rank}, world_size={world_size}")
        require_one_global_batch(len(dataset), batch_size, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = usable_workers(num_workers)
        self._epoch = 0
        self._batch_in_epoch = 0
        self._batches = None  # the current epoch's DataLoader iterator, made on demand

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def __iter__(self) -> "InfiniteBatchIterator":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch_in_epoch == self.batches_per_epoch:
            self._epoch += 1
            self._batch_in_epoch = 0
            self._batches = None
        if self._batches is None:
            self._batches = iter(self._remaining_epoch_loader())
        batch = next(self._batches)
        self._batch_in_epoch += 1
        return batch

    def close(self) -> None:
        """Ends the loader workers now (a later ``next()`` starts new ones). Left to garbage collection, a loader
        that something still references at exit (an exception's frames) was joined by multiprocessing's exit
        handler after a SIGTERM that the workers ignore (``leave_stops_to_the_trainer``): the process never ended."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing loader iterator
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch_in_epoch": self._batch_in_epoch,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the saved position; the next batch equals the uninterrupted run's.

        A different global micro-batch (e.g. another GPU count) resumes at the first batch that
        starts at or after the saved position in the epoch; that is close, but not bit-exact.
        """
        saved_global = state.get("global_batch_size", self.global_batch_size)
        if saved_global != self.global_batch_size:
            logger.warning("resuming data position saved with global micro-batch %d with %d: same epoch and "
                           "position, but batches are cut differently", saved_global, self.global_batch_size)
        consumed = state["batch_in_epoch"] * saved_global
        self._epoch = int(state["epoch"])
        self._batch_in_epoch = min(-(-consumed // self.global_batch_size), self.batches_per_epoch)
        self._batches = None

    def _remaining_rank_batches(self) -> tuple[torch.Tensor, list[int]]:
        """This epoch's remaining micro-batches for this rank: their dataset indices (one row each) and the
        positions in the epoch of their first samples (which key their flips and noise)."""
        order = epoch_permutation(len(self.dataset), self.seed, self._epoch)
        used = order[:self.batches_per_epoch * self.global_batch_size]
        rank_batches = used.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        starts = [b * self.global_batch_size + self.rank * self.batch_size for b in range(self.batches_per_epoch)]
        return rank_batches[self._batch_in_epoch:], starts[self._batch_in_epoch:]

    def _remaining_epoch_loader(self) -> DataLoader:
        """The rest of this epoch's micro-batches for this rank; a loader worker makes whole micro-batches (flips
        and noise included), so with workers the main process only receives them."""
        rows, starts = self._remaining_rank_batches()
        batches = EpochBatches(self.dataset, self.seed, self._epoch, rows.tolist(), starts)
        # A private generator: otherwise DataLoader draws its worker base seed from the global RNG,
        # and the model's random stream would depend on when loaders happen to be created.
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, generator=torch.Generator(),
                          worker_init_fn=leave_stops_to_the_trainer)


class EpochBatches(Dataset):
    """Item k: the k-th micro-batch (float32 images in [-1, 1], int64 labels) of ``batches``, the dataset indices of
    consecutive micro-batches of one epoch whose first samples sit at ``starts`` in it (which key their flips and
    noise)."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int, batches: list[list[int]], starts: list[int]):
        self.dataset, self.seed, self.epoch, self.batches, self.starts = dataset, seed, epoch, batches, starts

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices, positions = self.batches[k], range(self.starts[k], self.starts[k] + len(self.batches[k]))
        many = getattr(self.dataset, "batch", None)  # a data set's own batched read, where it has one
        images, labels = many(indices) if many else default_collate([self.dataset[i] for i in indices])
        flip_keys = sample_keys(FLIP_STREAM, self.seed, self.epoch, positions) \
            if getattr(self.dataset, "random_flip", False) else None
        noise = dequantization_noise(images.shape[1:], self.seed, self.epoch, positions) \
            if self.dataset.dequantize else None
        return finish_batch(images, labels, flip_keys, noise)
