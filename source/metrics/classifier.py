"""A small Fashion-MNIST classifier as a class-aware instrument, and what it measures of a generator.

Inception features say little about 32x32 gray clothes, and nothing about whether G draws the class
it is asked for. This CNN (0.16 M parameters, 2.6 M multiply-adds per image, trained once by
`python -m source.metrics.classifier train --out data/classifiers/fashion_mnist.pt`, see
`classifier_training.py`) reads 1x32x32 images in [-1, 1], the toolkit's zero-padded Fashion-MNIST,
and gives 10 logits and 128-d penultimate features. `class_report` measures a conditional G with it:

- accuracy of class c: the share of G(z, c) samples the classifier assigns to c;
- diversity of class c: mean_{i != j} |f(G(z_i, c)) - f(G(z_j, c))|_2 divided by the same mean over the
  real images of class c (f = penultimate features): 1 = as diverse as the data, -> 0 = collapsed;
- classifier FID and KID: the Fréchet distance and KID between the features of all samples (the same
  number of every class) and those of the real images (the balanced test split).

Weights are a plain state dict read with torch.load(weights_only=True); a JSON beside them records
how they were made and their sha256, which is checked on loading.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from source.files import load_refusal, torch_load
from source.training.checkpoint import non_finite, state_mismatch
from source.typed import first_line

from .fid import feature_statistics, frechet_distance
from .generate import eval_mode, generate_uint8, sample_inputs
from .groups import GROUPS, class_groups
from .kid import kernel_inception_distance
from .repeats import summarize

# the committed weights, found from any working directory
DEFAULT_WEIGHTS = str(Path(__file__).resolve().parents[2] / "data" / "classifiers" / "fashion_mnist.pt")
IMAGE_SHAPE = (1, 32, 32)
N_CLASSES = 10
FEATURES = 128
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
# the trained weights are 0.6 MB and their record a few hundred bytes: far larger files are not read (or hashed)
MAX_WEIGHTS_BYTES, MAX_RECORD_BYTES = 64 * 2**20, 2**20
DIVERSITY = ("mean pairwise L2 distance of the classifier's 128-d penultimate features within one class's samples, "
             "divided by the same for that class's real images (1 = as diverse as the data, 0 = collapsed)")


class ClassifierUnavailable(ValueError):
    """The classifier weights are missing, damaged, or do not fit the data they are asked about."""


def _block(inputs: int, outputs: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]


class SmallClassifier(nn.Module):
    """1x32x32 in [-1, 1] -> 10 logits; `features` is the 128-d layer before the last linear one."""

    def __init__(self, n_classes: int = N_CLASSES, channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            *_block(channels, 16), nn.MaxPool2d(2),  # 16x16
            *_block(16, 32), nn.MaxPool2d(2),        # 8x8
            *_block(32, 64), nn.MaxPool2d(2),        # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURES, n_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (as the data set loads them and as generated images are quantized) -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_problem(state: object) -> str | None:
    """Why a loaded file is not SmallClassifier's state dict, naming the first tensor that differs, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state dict"
    other = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if other is not None:
        return f"its entry {str(other)[:100]!r} is a {type(state[other]).__name__}, not a tensor"
    return state_mismatch("its tensors", SmallClassifier().state_dict(), state)


def record_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def load_classifier(path: str | Path = DEFAULT_WEIGHTS,
                    device: torch.device | str = "cpu") -> tuple[SmallClassifier, dict]:
    """The classifier in eval mode and its training record ({} when there is no JSON beside the weights)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ClassifierUnavailable(f"classifier weights {path}: {'a folder' if path.is_dir() else 'not a file'}; "
                                    f"name the weights file (such as {DEFAULT_WEIGHTS})")
    if not path.exists():
        raise ClassifierUnavailable(f"classifier weights {path} do not exist; train them with "
                                    f"`python -m source.metrics.classifier train --out {path}` or pass --classifier")
    for file, limit in ((path, MAX_WEIGHTS_BYTES), (record_path(path), MAX_RECORD_BYTES)):
        if file.is_file() and file.stat().st_size > limit:
            raise ClassifierUnavailable(f"{file}: {file.stat().st_size:,} bytes, more than a SmallClassifier's "
                                        f"{'weights' if file == path else 'record'} ever holds ({limit:,}); not read")
    try:
        record = json.loads(record_path(path).read_text()) if record_path(path).is_file() else {}
    except (OSError, ValueError, RecursionError) as error:
        raise ClassifierUnavailable(f"{record_path(path)} is not a readable record ({first_line(error)})") from None
    if not isinstance(record, dict):
        raise ClassifierUnavailable(f"{record_path(path)} is not a classifier's record (a JSON mapping)")
    if "sha256" in record and record["sha256"] != sha256(path):
        raise ClassifierUnavailable(f"{path} does not match the sha256 recorded in {record_path(path)}; "
                                    "the weights were replaced or damaged")
    try:
        state = torch_load(path)
    except Exception as error:  # noqa: BLE001: unpickling refusals, not a torch file, damage: all one message
        raise ClassifierUnavailable(f"{path} is not a SmallClassifier state dict ({load_refusal(error)})") from None
    if problem := weights_problem(state):
        raise ClassifierUnavailable(f"{path} is not a SmallClassifier state dict: {problem}")
    model = SmallClassifier()
    model.load_state_dict(state)
    broken = non_finite(state)
    if broken:  # a NaN head bias read as 100 % accuracy for one class, a NaN BN statistic as FID nan
        raise ClassifierUnavailable(f"{path}: NaN or infinite values in {', '.join(broken[:3])}")
    return model.to(device).eval(), record


@torch.no_grad()
def classify(model: SmallClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 128], predicted classes [N]) of uint8 images."""
    with eval_mode(model):
        device = next(model.parameters()).device
        features = model.features(to_input(images.to(device)))
        return features.double().cpu().numpy(), model.head(features).argmax(1).cpu().numpy()


def dataset_features(model: SmallClassifier, dataset: Dataset, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 128], labels [N]) of every image of a data set, in item order."""
    features, labels = [], []
    for images, batch_labels in DataLoader(dataset, batch_size=batch_size, generator=torch.Generator()):
        features.append(classify(model, images)[0])
        labels.append(np.asarray(batch_labels))
    return np.concatenate(features), np.concatenate(labels)


def mean_pairwise_distance(features: np.ndarray, chunk: int = 1024) -> float:
    """mean over i != j of |x_i - x_j|_2, in chunks (n x n distances of a large class would not fit)."""
    n = len(features)
    if n < 2:
        raise ValueError(f"a mean pairwise distance needs at least 2 samples, got {n}")
    points = torch.from_numpy(np.asarray(features, dtype=np.float64))
    total = sum(float(torch.cdist(points[start:start + chunk], points).sum()) for start in range(0, n, chunk))
    return total / (n * (n - 1))  # the diagonal contributes zeros


def check_generator(gen: nn.Module, model: SmallClassifier, device: torch.device,
                    unconditional: bool = False) -> None:
    """One-line refusal when G's images or classes are not what the classifier reads (``unconditional``: a G
    without classes is accepted too)."""
    n_classes = model.head.out_features
    z, _ = sample_inputs(1, gen.dim_z, 0, seed=0)
    shape = tuple(next(generate_uint8(gen, z, torch.zeros(1, dtype=torch.long) if gen.n_classes else None, 1,
                                      device)).shape[1:])
    classes_ok = gen.n_classes in ((0, n_classes) if unconditional else (n_classes,))
    if not classes_ok or shape != IMAGE_SHAPE:
        raise ClassifierUnavailable(f"the classifier reads {n_classes} classes of {'x'.join(map(str, IMAGE_SHAPE))} "
                                    f"images (Fashion-MNIST); this generator makes {gen.n_classes} classes of "
                                    f"{'x'.join(map(str, shape))}")


def class_samples(gen: nn.Module, model: SmallClassifier, samples_per_class: int, seed: int, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, predictions, requested labels) of samples_per_class samples of every class, one seed."""
    labels = torch.arange(gen.n_classes).repeat_interleave(samples_per_class)
    z, labels = sample_inputs(len(labels), gen.dim_z, gen.n_classes, seed, labels)
    parts = [classify(model, images) for images in generate_uint8(gen, z, labels, batch_size, device)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), labels.numpy()


def one_repeat(gen, model, real: tuple[np.ndarray, np.ndarray], real_spread: dict[int, float], groups: dict,
               samples_per_class: int, seed: int, batch_size: int, device: torch.device, kid_subsets: int) -> dict:
    """Accuracy and diversity per class, their group and overall means, classifier FID/KID: one latent seed."""
    features, predicted, labels = class_samples(gen, model, samples_per_class, seed, batch_size, device)
    classes = range(gen.n_classes)
    accuracy = {c: float(np.mean(predicted[labels == c] == c)) for c in classes}
    diversity = {c: mean_pairwise_distance(features[labels == c]) / real_spread[c] for c in classes}
    record = {"accuracy": float(np.mean(list(accuracy.values()))),
              "diversity": float(np.mean(list(diversity.values()))),
              "accuracy_per_class": {str(c): v for c, v in accuracy.items()},
              "diversity_per_class": {str(c): v for c, v in diversity.items()},
              "groups": {name: {"accuracy": float(np.mean([accuracy[c] for c in members])),
                                "diversity": float(np.mean([diversity[c] for c in members]))}
                         for name, members in groups.items() if members}}
    record["classifier_FID"] = frechet_distance(*feature_statistics(features), *feature_statistics(real[0]))
    record["classifier_KID"], record["classifier_KID_std"] = kernel_inception_distance(
        features, real[0], subsets=kid_subsets, subset_size=KID_SUBSET_SIZE)
    return record


def class_report(gen: nn.Module, classifier: SmallClassifier, real_dataset: Dataset, samples_per_class: int = 500,
                 seed: int = 0, repeats: int = 1, batch_size: int = 100, device: torch.device | str = "cpu",
                 train_counts: list[int] | None = None, many_above: int = 100, few_at_most: int = 40,
                 kid_subsets: int = KID_SUBSETS) -> dict:
    """Per-class accuracy and diversity, group means, classifier FID/KID of a conditional G.

    Repeat r draws its latents from seed + r; the top-level numbers are means over the repeats,
    `repeat_std` their sample standard deviations (ddof=1, with 2 or more repeats), `repeats` each one.
    Groups (many > many_above >= medium > few_at_most >= few training images) need `train_counts`.
    """
    device = torch.device(device)
    check_generator(gen, classifier, device)
    real = dataset_features(classifier, real_dataset)
    missing = [c for c in range(gen.n_classes) if (real[1] == c).sum() < 2]
    if missing:
        raise ClassifierUnavailable(f"the real images hold fewer than 2 images of classes {missing[:10]}")
    real_spread = {c: mean_pairwise_distance(real[0][real[1] == c]) for c in range(gen.n_classes)}
    groups = class_groups(train_counts, many_above, few_at_most) if train_counts else {}
    seeds = [seed + r for r in range(repeats)]
    records = [one_repeat(gen, classifier, real, real_spread, groups, samples_per_class, s, batch_size, device,
                          kid_subsets) for s in seeds]
    report = summarize(records, seeds)
    report["train_counts"] = train_counts
    report["group_classes"] = {name: groups.get(name, []) for name in GROUPS} if groups else {}
    report["protocol"] = {"samples_per_class": samples_per_class, "seeds": seeds, "real_images": len(real[1]),
                          "diversity": DIVERSITY, "features": f"classifier penultimate layer ({FEATURES}-d)",
                          "kid_subsets": kid_subsets,
                          "kid_subset_size": min(KID_SUBSET_SIZE, samples_per_class * gen.n_classes, len(real[1])),
                          "groups": f"many > {many_above}, medium {few_at_most + 1}..{many_above}, "
                                    f"few <= {few_at_most} training images per class"}
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "train":
        print("usage: python -m source.metrics.classifier train --out PATH [--epochs N] [--seed S]", file=sys.stderr)
        return 2
    from .classifier_training import main as train_main  # training pulls in the data set; measuring does not

    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
