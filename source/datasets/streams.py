"""Per-sample random streams of the training data: epoch order, flips and dequantization noise.

Every draw is a pure function of (stream, seed, epoch, the sample's position in the epoch), so a sample gets the
same flip and noise whichever rank, world size, loader worker or resumed run makes its batch. A sample's key is
numpy's SeedSequence of those four integers (``derived_seeds`` computes it for many positions at once); its flip
is the key's lowest bit. The loader draws a sample's noise from torch's CPU generator seeded with its key (fast
on a CPU: 0.3 ms for a 128 px image); batches made on the device (``performance.data_on_device``) draw it from a
counter-based hash of (key, pixel) instead (a few dozen kernels for a whole batch, the same bits on any device):
the same distribution, another stream.
"""
import numpy as np
import torch

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


def sample_keys(stream: int, seed: int, epoch: int, positions: range) -> torch.Tensor:
    """The samples' 64-bit keys as int64 (the same bits, read as signed)."""
    keys = np.asarray(derived_seeds(stream, seed, epoch, positions), dtype=np.uint64)
    return torch.from_numpy(keys.view(np.int64))


def epoch_permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(PERMUTATION_STREAM, seed, epoch, 0))
    return torch.randperm(length, generator=generator)


def dequantization_noise(sample_shape: torch.Size, seed: int, epoch: int, positions: range) -> torch.Tensor:
    """The loader's U[0, 1) per pixel (in grey levels): torch's CPU generator seeded with each sample's key."""
    noise, generator = torch.empty(len(positions), *sample_shape), torch.Generator()
    for sample, stream_seed in zip(noise, derived_seeds(NOISE_STREAM, seed, epoch, positions)):
        sample.uniform_(0.0, 1.0, generator=generator.manual_seed(stream_seed))
    return noise


def flip_mask(flip_keys: torch.Tensor) -> torch.Tensor:
    """A fair coin per sample (its key's lowest bit): which samples a random horizontal flip mirrors."""
    return (flip_keys & 1).bool()


_MASK32, _MUELLER = 0xFFFFFFFF, 0x45D9F3B


def _mix32_(words: torch.Tensor) -> torch.Tensor:
    """Thomas Mueller's 32-bit integer hash (a bijection with full avalanche), in place on int64 holding 32-bit
    words: its multiplier has 27 bits, so no product overflows (torch leaves int64 overflow undefined)."""
    for _ in range(2):
        words.bitwise_xor_(words >> 16).mul_(_MUELLER).bitwise_and_(_MASK32)
    return words.bitwise_xor_(words >> 16)


def hashed_dequantization_noise(noise_keys: torch.Tensor, sample_shape: torch.Size) -> torch.Tensor:
    """U[0, 1) per pixel (in grey levels), made on the keys' device: pixel i of the sample with key k gets
    mix32(mix32(i ^ mix32(k_low)) ^ mix32(k_high))'s top 24 bits / 2**24, a float32 the same on every device.
    The key's words are mixed first, so keys that differ in a few bits do not give related noise."""
    n_pixels = int(np.prod(sample_shape))
    low, high = (_mix32_(noise_keys & _MASK32)[:, None], _mix32_((noise_keys >> 32) & _MASK32)[:, None])
    words = torch.arange(n_pixels, dtype=torch.int64, device=noise_keys.device) ^ low
    words = _mix32_(_mix32_(words).bitwise_xor_(high))
    return (words >> 8).float().mul_(2.0 ** -24).view(len(noise_keys), *sample_shape)


def to_signed_unit(images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as x/127.5 - 1; with dequantization noise U[0, 1) the original's
    (x + noise)/128 - 1 (SRGANs datasets/imagenet.py), inside tanh's range (1 only where float32 rounds 255 + noise
    up to 256). The divisions are IEEE's on every device (CUDA multiplies by the reciprocal of a Python number,
    one bit off for 127.5; a tensor divisor is divided exactly)."""
    if noise is None:
        return images.float().div_(torch.full((), 127.5, device=images.device)).sub_(1.0)
    return images.float().add_(noise).div_(128.0).sub_(1.0)  # 1/128 is exact


def finish_batch(images: torch.Tensor, labels: torch.Tensor, flip_keys: torch.Tensor | None,
                 noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and their labels -> the training batch: mirrored where the flip keys say, dequantized with
    ``noise``, as float32 in [-1, 1]; ``None``: no flips, no noise. Both loaders' last step."""
    if flip_keys is not None:
        images = torch.where(flip_mask(flip_keys)[:, None, None, None], images.flip(-1), images)
    return to_signed_unit(images, noise), labels.long()
