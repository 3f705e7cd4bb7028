"""performance.data_on_device: the data set held on the device and batches made there (source/datasets/device_batches.py)."""
import numpy as np
import pytest
import torch

import train
from source.config import ConfigError, load_config
from source.datasets import (CIFAR10Args, DatasetError, FashionMNISTArgs, InfiniteBatchIterator, SyntheticArgs,
                             build_dataset)
from source.datasets.device_batches import DeviceBatchIterator
from source.datasets.streams import (FLIP_STREAM, NOISE_STREAM, epoch_permutation, finish_batch,
                                     hashed_dequantization_noise, sample_keys)
from source.training import build
from source.training.checkpoint import load_snapshot
from source.training.distributed import World
from test_datasets import draw, write_cifar_standin, write_fashion_standin
from test_training import CONFIGS, tensors_equal


@pytest.fixture
def cifar(tmp_path):
    write_cifar_standin(tmp_path, per_batch=9)  # 45 training images: an epoch of 5 micro-batches of 8
    return build_dataset("cifar10", CIFAR10Args(root=str(tmp_path), random_flip=True))


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_device_batches_are_the_loaders_with_another_noise(cifar, rank, world_size):
    """Order, sharding, flips and labels bit for bit over three epochs; the noise differs, below one grey level."""
    loader = draw(InfiniteBatchIterator(cifar, batch_size=4, seed=7, rank=rank, world_size=world_size), 16)
    device = draw(DeviceBatchIterator(cifar, batch_size=4, seed=7, device="cpu", rank=rank,
                                      world_size=world_size), 16)
    for (x_loader, y_loader), (x_device, y_device) in zip(loader, device):
        assert torch.equal(y_loader, y_device) and y_device.dtype == torch.int64
        # (u8 + U[0, 1)) / 128 - 1 both: a pixel from another image or flip would differ by grey levels
        assert (x_loader - x_device).abs().max() < 1 / 128 + 1e-6
        assert not torch.equal(x_loader, x_device), "the hashed noise is another stream"
        assert x_device.dtype == torch.float32 and -1 <= x_device.min() and x_device.max() <= 1


def test_device_batches_without_noise_equal_the_loaders_bit_for_bit(tmp_path):
    write_fashion_standin(tmp_path, count=150)  # 37 batches of 4 per epoch: chunks of 16, 16 and 5
    data = build_dataset("fashion_mnist", FashionMNISTArgs(root=str(tmp_path), dequantize=False, size=16))
    loader = draw(InfiniteBatchIterator(data, batch_size=4, seed=3), 80)
    device = draw(DeviceBatchIterator(data, batch_size=4, seed=3, device="cpu"), 80)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(loader, device))


def test_each_device_batch_is_made_from_its_seed_epoch_and_positions(cifar):
    """Rank 1 of 2 over three epochs: every batch rebuilt from the streams' functions of (seed, epoch, its samples'
    positions in the epoch); noise that ignored the epoch, seed or rank offset would differ."""
    iterator = DeviceBatchIterator(cifar, batch_size=4, seed=7, device="cpu", rank=1, world_size=2)
    images, labels = cifar.in_memory_images(), torch.as_tensor(cifar.labels)
    per_epoch = iterator.batches_per_epoch
    for n, (x, y) in enumerate(draw(iterator, 3 * per_epoch)):
        epoch, batch = divmod(n, per_epoch)
        positions = range(batch * 8 + 4, batch * 8 + 8)  # global batch 8: rank 1 takes its second half
        rows = epoch_permutation(len(cifar), 7, epoch)[list(positions)]
        noise = hashed_dequantization_noise(sample_keys(NOISE_STREAM, 7, epoch, positions), images.shape[1:])
        expected = finish_batch(images[rows], labels[rows], sample_keys(FLIP_STREAM, 7, epoch, positions), noise)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1]), (epoch, batch)


@pytest.mark.parametrize("stop_after", [3, 5, 6])  # mid-epoch, at and after the epoch boundary
def test_device_batches_resume_exactly(cifar, stop_after):
    uninterrupted = draw(DeviceBatchIterator(cifar, batch_size=8, seed=2, device="cpu"), stop_after + 6)
    interrupted = DeviceBatchIterator(cifar, batch_size=8, seed=2, device="cpu")
    draw(interrupted, stop_after)
    resumed = DeviceBatchIterator(cifar, batch_size=8, seed=2, device="cpu")
    resumed.load_state_dict(interrupted.state_dict())
    for (x, y), (x_ref, y_ref) in zip(draw(resumed, 6), uninterrupted[stop_after:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_hashed_noise_is_uniform_independent_and_a_function_of_the_key():
    keys = sample_keys(NOISE_STREAM, 0, 0, range(2048))
    noise = hashed_dequantization_noise(keys, torch.Size([1, 32, 32]))
    assert noise.shape == (2048, 1, 32, 32) and 0 <= noise.min() and noise.max() < 1
    flat = noise.flatten(1).numpy()
    counts = np.histogram(flat, bins=64, range=(0, 1))[0]
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 120, f"chi2 {chi2:.0f} on 63 degrees of freedom"  # p ~ 1e-5
    assert abs(flat.mean() - 0.5) < 2e-3 and abs(flat.var() - 1 / 12) < 1e-3
    for a, b in ((flat[:, :-1], flat[:, 1:]), (flat[:-1], flat[1:])):  # neighbouring pixels, neighbouring samples
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 4e-3
    # a sample's noise depends on its key alone, not on the batch it comes in
    again = hashed_dequantization_noise(keys[[5, 1000]], torch.Size([1, 32, 32]))
    assert torch.equal(again, noise[[5, 1000]])
    for bit in (0, 40):  # both halves of the 64-bit key matter, each bit to every pixel (not a permutation)
        one_bit = hashed_dequantization_noise(keys ^ (1 << bit), torch.Size([1, 32, 32])).flatten(1).numpy()
        assert abs(np.corrcoef(one_bit.ravel(), flat.ravel())[0, 1]) < 4e-3, bit
        assert not np.array_equal(np.sort(one_bit, axis=1), np.sort(flat, axis=1)), bit


def test_data_sets_read_from_disk_or_too_large_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="performance.data_on_device: dataset 'imagenet' is read from disk as it "
                                          "goes; only the data sets held in memory .*cifar10, fashion_mnist, stl10, synth"):
        load_config(CONFIGS / "demo.yaml", ["dataset.name=imagenet", "dataset.args.root=/x",
                                            "performance.data_on_device=true"])
    huge = build_dataset("synthetic", SyntheticArgs(count=10**6, size=128, channels=3))
    with pytest.raises(DatasetError, match=r"1000000 synthetic images would take 45.8 GiB; hold at most 2 GiB"):
        DeviceBatchIterator(huge, batch_size=8, seed=0, device="cpu")


def test_synthetic_images_on_the_device_are_its_items(tmp_path):
    data = build_dataset("synthetic", SyntheticArgs(count=20, size=8, channels=3, dequantize=True))
    assert torch.equal(data.in_memory_images()[13], data[13][0])
    loader = draw(InfiniteBatchIterator(data, batch_size=4, seed=1), 6)
    device = draw(DeviceBatchIterator(data, batch_size=4, seed=1, device="cpu"), 6)
    for (x_loader, y_loader), (x_device, y_device) in zip(loader, device):
        assert torch.equal(y_loader, y_device) and (x_loader - x_device).abs().max() < 1 / 128 + 1e-6


def tiny_fashion(root, *extra) -> list[str]:
    return [f"dataset.args.root={root}", "models.generator.args.ch=8", "models.discriminator.args.ch=8",
            "batchsize=8", "micro_batchsize=4", "num_workers=0", "deterministic=true", "display_interval=1",
            "preview_interval=1000", "updater.apply_SR=true", "updater.sr.interval=2", "iteration=3",
            "snapshot_interval=3", *extra]


def train_tiny(out, overrides) -> int:
    return train.main(["--config", str(CONFIGS / "demo.yaml"), "--out", str(out)]
                      + [a for o in overrides for a in ("--set", o)])


def test_training_on_device_batches_is_training_on_the_loaders(tmp_path):
    """Through train.py: without noise, the same three iterations bit for bit; with it, a run that trains."""
    write_fashion_standin(tmp_path / "data", count=40)
    runs = {}
    for name, extra in {"loader": [], "device": ["performance.data_on_device=true"]}.items():
        out = tmp_path / name
        assert train_tiny(out, tiny_fashion(tmp_path / "data", "dataset.args.dequantize=false", *extra)) == 0
        runs[name] = load_snapshot(out / "snapshots" / "snapshot_iter_3.pt", training_state=True)
    for net in ("gen", "dis"):
        assert tensors_equal(runs["loader"][net], runs["device"][net]), net
    noisy = tiny_fashion(tmp_path / "data", "performance.data_on_device=true")
    batches = build.build_batches(load_config(CONFIGS / "demo.yaml", noisy), World(0, 0, 1, torch.device("cpu")))
    assert isinstance(batches, DeviceBatchIterator) and batches.dataset.dequantize
    assert train_tiny(tmp_path / "noisy", noisy) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dequantize", [True, False])
def test_gpu_batches_equal_those_made_on_the_cpu(tmp_path, dequantize):
    """The hash is integer arithmetic and the conversion IEEE division: a CUDA device gives the CPU's bits (without
    noise: the loader's too)."""
    write_cifar_standin(tmp_path, per_batch=9)
    cifar = build_dataset("cifar10", CIFAR10Args(root=str(tmp_path), random_flip=True, dequantize=dequantize))
    on_cpu = draw(DeviceBatchIterator(cifar, batch_size=8, seed=4, device="cpu"), 7)
    on_gpu = draw(DeviceBatchIterator(cifar, batch_size=8, seed=4, device="cuda"), 7)
    for (x, y), (x_gpu, y_gpu) in zip(on_cpu, on_gpu):
        assert x_gpu.is_cuda and torch.equal(x, x_gpu.cpu()) and torch.equal(y, y_gpu.cpu())
    if not dequantize:
        loader = draw(InfiniteBatchIterator(cifar, batch_size=8, seed=4), 7)
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(loader, on_cpu))
