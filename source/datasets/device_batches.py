"""The training data stream made on the device (``performance.data_on_device``), for the small data sets.

A 32 px model on a GPU takes a fraction of a millisecond per D step, while the loader spends about 1 ms of the
training process's CPU on a batch of 64 (reading, per-sample keys, noise; 5 batches per iteration at n_dis 5):
the data path, not the GPU, would set the pace. Here the whole data set (uint8; Fashion-MNIST 61 MB, CIFAR-10
154 MB) is held on the device once, an epoch's sample keys are computed once per epoch, and 16 micro-batches at
a time are made by some 56 kernels (index, flip, noise, convert). The order, sharding, flips and resume position
are ``InfiniteBatchIterator``'s, bit for bit; the dequantization noise has the same distribution and per-sample
keys but comes from a counter-based hash instead of the CPU generator (source/datasets/streams.py), so a run's
batches differ from the loader's by noise below one grey level.
"""
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from source.datasets.iterator import InfiniteBatchIterator
from source.datasets.streams import FLIP_STREAM, NOISE_STREAM, finish_batch, hashed_dequantization_noise, sample_keys
from source.datasets.transforms import DatasetError

# micro-batches made at once: one set of kernels for several D steps (the study's 5 per iteration), whose
# launches would otherwise cost more CPU than the GPU spends on them
CHUNK_BATCHES = 16


def holds_images_in_memory(dataset_class: type) -> bool:
    """Whether the data set can hand over all its images as one tensor (decoded at construction, or generated)."""
    return callable(getattr(dataset_class, "in_memory_images", None))


class DeviceBatchIterator(InfiniteBatchIterator):
    """``InfiniteBatchIterator``'s micro-batches (the hashed noise aside) made on ``device`` from the data set
    held there."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        super().__init__(dataset, batch_size, seed, rank, world_size)
        if not holds_images_in_memory(type(dataset)):
            raise DatasetError(f"performance.data_on_device: {type(dataset).__name__} does not hold its images in "
                               f"memory; only the small data sets do (Fashion-MNIST, CIFAR-10, STL-10, synthetic)")
        self.device = torch.device(device)
        self._images = dataset.in_memory_images().to(self.device)
        self._labels = torch.as_tensor(dataset.labels, dtype=torch.int64).to(self.device)

    def _remaining_epoch_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the epoch's micro-batches, made ``CHUNK_BATCHES`` at a time (views of one chunk)."""
        rows, starts = self._remaining_rank_batches()
        rows = rows.to(self.device)
        in_batch = torch.arange(self.batch_size, device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + in_batch  # each sample's place in the epoch
        epoch_positions = range(self.batches_per_epoch * self.global_batch_size)
        flip_keys = self._epoch_keys(FLIP_STREAM, epoch_positions) if getattr(self.dataset, "random_flip", False) \
            else None
        noise_keys = self._epoch_keys(NOISE_STREAM, epoch_positions) if self.dataset.dequantize else None
        for first in range(0, len(starts), CHUNK_BATCHES):
            chunk = slice(first, first + CHUNK_BATCHES)
            indices, chunk_positions = rows[chunk].flatten(), positions[chunk].flatten()
            images = self._images.index_select(0, indices)
            noise = None if noise_keys is None else hashed_dequantization_noise(
                noise_keys.index_select(0, chunk_positions), images.shape[1:])
            flips = None if flip_keys is None else flip_keys.index_select(0, chunk_positions)
            x, y = finish_batch(images, self._labels.index_select(0, indices), flips, noise)
            yield from zip(x.split(self.batch_size), y.split(self.batch_size))

    def _epoch_keys(self, stream: int, positions: range) -> torch.Tensor:
        return sample_keys(stream, self.seed, self._epoch, positions).to(self.device)
