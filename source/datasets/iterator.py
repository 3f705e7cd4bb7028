"""The training data stream: infinite, shuffled, rank-sharded and exactly resumable.

Epoch e visits the data in the order of a permutation drawn from (seed, e), identical on all ranks.
Global batch b of an epoch is permuted positions [b*G, (b+1)*G) with G = batch_size * world_size,
and rank r takes the slice [b*G + r*batch_size, b*G + (r+1)*batch_size): the union over ranks is
the single-process batch of G, whatever the world size. The last len(dataset) mod G samples of
each epoch are dropped (so the epoch length depends on G).

Images become float32 ``u8 / 127.5 - 1``; when ``dataset.dequantize`` is set, U[0, 1/127.5) noise
is added. The noise of a sample is drawn from (seed, epoch, its position in the epoch), so it is
the same whichever rank, world size, or resumed run draws that sample; so is the horizontal flip of
data sets with ``random_flip`` set.

One ``next()`` returns one micro-batch of ``batch_size`` samples for this rank; an updater that
accumulates k micro-batches per iteration calls ``next()`` k times. With ``num_workers`` > 0 a loader worker
makes each whole micro-batch (reading, flips, noise, conversion), so the training process only receives it.
"""
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from source.datasets.transforms import DatasetError

logger = logging.getLogger(__name__)

# Stream tags: the permutation, noise and flips never share a seed, even for equal (seed, epoch, index).
PERMUTATION_STREAM, NOISE_STREAM, FLIP_STREAM = 0, 1, 2


def derived_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from non-negative integers ((1, 0) and (0, 1) do not collide)."""
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0])


# numpy's SeedSequence constants (O'Neill's seed_seq_fe with a pool of 4 words; numpy/random/bit_generator.pyx)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4


def derived_seeds(stream: int, seed: int, epoch: int, positions: range) -> list[int]:
    """``derived_seed(stream, seed, epoch, p)`` for every p in ``positions``, equal bit for bit, in one numpy pass
    instead of one SeedSequence per sample (which was a third of a 32 px batch's loading time)."""
    if max(stream, seed, epoch, positions[-1] if positions else 0) >= 2**32 or min(stream, seed, epoch) < 0:
        return [derived_seed(stream, seed, epoch, p) for p in positions]  # words beyond one each: the slow path
    u32 = np.uint32
    entropy = [np.full(len(positions), part, u32) for part in (stream, seed, epoch)]
    entropy.append(np.asarray(positions, dtype=u32))
    hash_const = u32(_INIT_A)

    def hashmix(value):
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * u32(_MULT_A)
        value = value * hash_const
        return value ^ (value >> u32(16))

    def mix(x, y):
        result = u32(_MIX_L) * x - u32(_MIX_R) * y
        return result ^ (result >> u32(16))

    with np.errstate(over="ignore"):
        pool = [hashmix(entropy[i]) for i in range(_POOL)]
        for source in range(_POOL):
            for target in range(_POOL):
                if source != target:
                    pool[target] = mix(pool[target], hashmix(pool[source]))
        words, multiplier = [], u32(_INIT_B)
        for word in pool[:2]:  # generate_state(1, uint64): two 32-bit words, the first the low half
            value = word ^ multiplier
            multiplier = multiplier * u32(_MULT_B)
            value = value * multiplier
            words.append((value ^ (value >> u32(16))).astype(np.uint64))
    return (words[0] | (words[1] << np.uint64(32))).tolist()


def epoch_permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(PERMUTATION_STREAM, seed, epoch, 0))
    return torch.randperm(length, generator=generator)


def dequantization_noise(sample_shape: torch.Size, seed: int, epoch: int, positions: range) -> torch.Tensor:
    """U[0, 1) per pixel (in grey levels), one independent stream per (seed, epoch, position in epoch)."""
    noise, generator = torch.empty(len(positions), *sample_shape), torch.Generator()
    for sample, stream_seed in zip(noise, derived_seeds(NOISE_STREAM, seed, epoch, positions)):
        sample.uniform_(0.0, 1.0, generator=generator.manual_seed(stream_seed))
    return noise


def flip_mask(seed: int, epoch: int, positions: range) -> torch.Tensor:
    """A fair coin per (seed, epoch, position in epoch): which samples a random horizontal flip mirrors."""
    return torch.tensor([stream_seed & 1 for stream_seed in derived_seeds(FLIP_STREAM, seed, epoch, positions)],
                        dtype=torch.bool)


def to_signed_unit(images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as x/127.5 - 1; with dequantization noise U[0, 1) the original's
    (x + noise)/128 - 1 (SRGANs datasets/imagenet.py), which stays inside tanh's range [-1, 1)."""
    if noise is None:
        return images.float().div_(127.5).sub_(1.0)
    return images.float().add_(noise).div_(128.0).sub_(1.0)


class InfiniteBatchIterator:
    """Endless (x: float32 N x C x H x W, y: int64 N) micro-batches for one rank; see the module doc."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        if batch_size < 1 or seed < 0 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(f"InfiniteBatchIterator: need batch_size >= 1, seed >= 0, num_workers >= 0 and 0 <= rank "
                             f"< world_size; got batch_size={batch_size}, seed={seed}, num_workers={num_workers}, "
                             f"rank={rank}, world_size={world_size}")
        if len(dataset) < batch_size * world_size:
            raise DatasetError(f"dataset: {len(dataset)} images are fewer than one global micro-batch of "
                               f"{batch_size} x {world_size} ranks; use a larger data set or a smaller micro_batchsize")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
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

    def _remaining_epoch_loader(self) -> DataLoader:
        """The rest of this epoch's micro-batches for this rank; a loader worker makes whole micro-batches (flips
        and noise included), so with workers the main process only receives them."""
        order = epoch_permutation(len(self.dataset), self.seed, self._epoch)
        used = order[:self.batches_per_epoch * self.global_batch_size]
        rank_batches = used.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        starts = [b * self.global_batch_size + self.rank * self.batch_size for b in range(self.batches_per_epoch)]
        batches = EpochBatches(self.dataset, self.seed, self._epoch, rank_batches[self._batch_in_epoch:].tolist(),
                               starts[self._batch_in_epoch:])
        # A private generator: otherwise DataLoader draws its worker base seed from the global RNG,
        # and the model's random stream would depend on when loaders happen to be created.
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, generator=torch.Generator())


class EpochBatches(Dataset):
    """Item k: the k-th micro-batch (float32 images in [-1, 1], int64 labels) of ``batches``, the dataset indices of
    consecutive micro-batches of one epoch whose first samples sit at ``starts`` in it (which seeds their flips and
    noise)."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int, batches: list[list[int]], starts: list[int]):
        self.dataset, self.seed, self.epoch, self.batches, self.starts = dataset, seed, epoch, batches, starts

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices, positions = self.batches[k], range(self.starts[k], self.starts[k] + len(self.batches[k]))
        many = getattr(self.dataset, "batch", None)  # a data set's own batched read, where it has one
        images, labels = many(indices) if many else default_collate([self.dataset[i] for i in indices])
        if getattr(self.dataset, "random_flip", False):
            flips = flip_mask(self.seed, self.epoch, positions)
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        noise = dequantization_noise(images.shape[1:], self.seed, self.epoch, positions) if self.dataset.dequantize \
            else None
        return to_signed_unit(images, noise), labels.long()
