"""Images/s of the ImageNet JPEG path against the prepared path, through the same InfiniteBatchIterator.

    python -m benchmarks.bench_loaders [--images 1024] [--epochs 2] [--repeats 2] [--workers N]
        [--out benchmarks/results/loaders_cpu.json]

Writes a temporary folder of JPEGs the size of a typical ImageNet photo (500 x 375, landscape and
portrait; smooth colour fields plus grain, quality 90), prepares it with ``source.datasets.prepare``
(timed: the one-time cost), then reads micro-batches of 32 at 128 px from both data sets with
num_workers = cores, with dequantization on (as training does) and off (the loader alone). After a
warm-up batch, ``epochs`` epochs are timed, which includes each epoch's worker start, as in training.
The settings alternate within each repeat, so load from other jobs on a shared machine falls on all
of them; the best repeat of each is reported.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from benchmarks.results_io import save_result
from source.datasets import ImageNet, ImageNetArgs, InfiniteBatchIterator, PreparedImageNet, PreparedImageNetArgs
from source.datasets.streams import dequantization_noise, to_signed_unit
from source.datasets.prepare import prepare_imagenet
from source.provenance import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BATCH, SIZE, CLASSES = 32, 128, 4


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colours plus grain: JPEG sizes and decode cost close to photos, unlike pure noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 14, smooth.shape), 0, 255).astype(np.uint8))


def write_jpegs(root: Path, count: int) -> float:
    """count JPEGs in CLASSES class folders; returns their mean size in kB."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"n{index % CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (500, 375) if index % 3 else (375, 500)
        photo_like(rng, width, height).save(folder / f"{index:05d}.JPEG", quality=90)
    return sum(path.stat().st_size for path in root.rglob("*.JPEG")) / count / 1e3


def images_per_second(dataset, workers: int, epochs: int) -> float:
    batches = InfiniteBatchIterator(dataset, batch_size=BATCH, seed=0, num_workers=workers)
    next(batches)  # warm-up: the first epoch's workers start and the page cache fills
    steps = epochs * batches.batches_per_epoch
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * BATCH / (time.perf_counter() - start)


def main_process_ms(repeats: int = 5) -> dict:
    """Per-batch cost of the iterator's own work besides reading: flips, noise, float conversion. A loader worker
    does it with the reading (the training process itself with num_workers 0; before, it always did: the key's
    name is from then)."""
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    noise = dequantization_noise(images.shape[1:], 0, 0, range(BATCH))

    def best_ms(action) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    return {"dequantization_noise": best_ms(lambda: dequantization_noise(images.shape[1:], 0, 0, range(BATCH))),
            "to_float_with_noise": best_ms(lambda: to_signed_unit(images, noise)),
            "to_float": best_ms(lambda: to_signed_unit(images))}


def markdown(result: dict) -> str:
    rows = "\n".join(f"| {name} | {result['jpeg'][name]:.0f} | {result['prepared'][name]:.0f} | "
                     f"{result['ratio'][name]:.1f}x |" for name in result["ratio"])
    machine, cost = result["machine"], result["main_process_ms_per_batch"]
    return f"""# Data loaders on CPU: JPEG path vs prepared (`benchmarks/bench_loaders.py`)

Machine: {machine['cpu_count']} cores ({machine['cpu']}), torch {machine['torch']}, Pillow {machine['pillow']},
load average {machine['load_before'][0]:.1f} before and {machine['load_after'][0]:.1f} after the run (shared machine).
{result['images']} JPEGs of 500 x 375 / 375 x 500 ({result['jpeg_kB']:.0f} kB mean), {SIZE} px, micro-batch {BATCH},
num_workers {result['workers']}, {result['epochs']} epochs timed after a warm-up batch, best of {result['repeats']}
alternating repeats. Images/s through `InfiniteBatchIterator` (the training data stream):

| dequantization | JPEG path | prepared | prepared / JPEG |
|---|---|---|---|
{rows}

Each timed epoch starts its workers anew, as training does; with {result['images'] // BATCH} batches per epoch here
against 40,000 on ImageNet that start weighs far more than in training, so the prepared figures and the
ratios are lower bounds. The iterator's own work besides reading (done by the loader worker that reads the
batch), timed alone: per batch
{cost['dequantization_noise']:.1f} ms for the noise (one seeded generator per sample) and
{cost['to_float_with_noise']:.1f} ms for the float conversion ({cost['to_float']:.1f} ms without noise), against
{1e3 * BATCH / result['prepared']['off']:.0f} ms per batch for the whole prepared stream without dequantization.

One-time preparation with {result['workers']} workers: {result['prepare_images_per_s']:.0f} images/s
(ImageNet's 1,281,167 images: about {1281167 / result['prepare_images_per_s'] / 3600:.1f} h at this rate, which scales with cores; 63 GB at 128 px).
Raw numbers: `loaders_cpu.json`.
"""


def measure(images: int, epochs: int, repeats: int, workers: int) -> dict:
    """Writes the JPEGs, prepares them (timed) and times both streams; every number of the report."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        jpeg_kB = write_jpegs(Path(scratch, "jpeg"), images)
        start = time.perf_counter()
        prepare_imagenet(str(Path(scratch, "jpeg")), None, SIZE, str(Path(scratch, "prepared")), workers)
        prepare_rate = images / (time.perf_counter() - start)
        speeds = {"jpeg": {}, "prepared": {}}
        for _ in range(repeats):
            for dequantize in (True, False):
                name = "on" if dequantize else "off"
                datasets = {"jpeg": ImageNet(ImageNetArgs(root=str(Path(scratch, "jpeg")), size=SIZE,
                                                          dequantize=dequantize)),
                            "prepared": PreparedImageNet(PreparedImageNetArgs(path=str(Path(scratch, "prepared")),
                                                                              dequantize=dequantize))}
                for kind, dataset in datasets.items():
                    speed = images_per_second(dataset, workers, epochs)
                    speeds[kind][name] = max(speed, speeds[kind].get(name, 0.0))
    return {
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "pillow": PIL.__version__,
                    "load_before": load_before, "load_after": os.getloadavg()},
        "images": images, "jpeg_kB": jpeg_kB, "workers": workers, "epochs": epochs,
        "repeats": repeats, "batch": BATCH, "size": SIZE, "prepare_images_per_s": prepare_rate,
        "main_process_ms_per_batch": main_process_ms(),
        **speeds, "ratio": {name: speeds["prepared"][name] / speeds["jpeg"][name] for name in speeds["jpeg"]},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/loaders_cpu.json")
    args = parser.parse_args(argv)
    result = measure(args.images, args.epochs, args.repeats, args.workers)
    save_result(result, args.out)
    args.out.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
