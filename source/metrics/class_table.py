"""`evaluation.py classes`: the classifier report of a snapshot's generator, with its real data and a table."""
from __future__ import annotations

from torch.utils.data import Dataset

from source.config import Config, first_line
from source.datasets import DatasetError, build_dataset, reference_args

from .describe import describe_batchnorm
from .groups import GROUPS
from .longtail import training_class_counts
from .repeats import plus_minus

DEFAULT_SPLIT = "test"


def classifier_real_data(config: Config) -> tuple[Dataset, str, list[str]]:
    """(real images, what they are, notes): evaluation.reference_split, else the balanced test split, else
    (a data set without one) the training data, with a note."""
    name, chosen = config.dataset.name, config.evaluation.reference_split
    try:
        args = reference_args(name, config.dataset.args, chosen or DEFAULT_SPLIT)
    except DatasetError as error:
        if chosen is not None:
            raise
        note = f"the real images are the training data: {first_line(error)}"
        return build_dataset(name, config.dataset.args), f"{name} training data", [note]
    return build_dataset(name, args), f"the balanced {name} {args.split} split", []


def known_training_counts(config: Config) -> tuple[list[int] | None, list[str]]:
    """Training images per class, or None and a note when the data set cannot tell (no groups then)."""
    try:
        return training_class_counts(config), []
    except DatasetError as error:
        return None, [f"training counts unknown, no many/medium/few groups: {first_line(error)}"]


def _row(*cells: object) -> str:
    return f"{cells[0]!s:<8}{cells[1]!s:>8}  {cells[2]!s:<18}{cells[3]!s:<18}"


def format_class_table(record: dict) -> str:
    """Per class: training count, accuracy, diversity (mean ± sample std over repeats); group means; FID/KID."""
    counts = record.get("train_counts") or []
    lines = [_row("class", "train", "accuracy", "diversity")]
    for label in record["accuracy_per_class"]:
        count = counts[int(label)] if counts else "?"
        lines.append(_row(label, count, plus_minus(record, f"accuracy_per_class.{label}"),
                          plus_minus(record, f"diversity_per_class.{label}")))
    lines.append(_row("all", sum(counts) if counts else "?", plus_minus(record, "accuracy"),
                      plus_minus(record, "diversity")))
    for name in GROUPS:
        members = record["group_classes"].get(name)
        if members:
            lines.append(_row(name, f"{len(members)} cl.", plus_minus(record, f"groups.{name}.accuracy"),
                              plus_minus(record, f"groups.{name}.diversity")))
        elif record["group_classes"]:
            lines.append(f"{name:<8}{'0 cl.':>8}  (no class in this group)")
    protocol = record["protocol"]
    repeats = len(protocol["seeds"])
    spread = f"mean ± sample std over {repeats} repeats" if repeats > 1 else "one repeat"
    weights = "the EMA of G" if protocol["generator"] == "ema" else "G's raw weights"
    weights = f"{weights} ({describe_batchnorm(protocol)})"
    lines.append(f"classifier FID {plus_minus(record, 'classifier_FID')}, "
                 f"KID {plus_minus(record, 'classifier_KID', 5)} vs {protocol['real_images']} real images "
                 f"({protocol['real']}) | {protocol['samples_per_class']} samples per class of {weights}, {spread} | "
                 f"groups: {protocol['groups']}")
    return "\n".join(lines)
