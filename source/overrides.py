"""``--set KEY=VALUE`` on a config's raw mapping: applying it, adapting the data set's arguments when it changes the
data set, and saying whose a validation error is (the file's or the command line's)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

from source.typed import ConfigError, first_line


def blame_overrides(error: ConfigError, source: str, overrides: list[str], given: dict, changed: dict) -> ConfigError:
    """Whose a validation error ("SOURCE: KEY: why") is: "--set KEY: why" where --set gave the value at KEY (KEY is an
    override's key or lies under one, or --set made it); else, with overrides, "SOURCE with --set K1, K2: KEY: why",
    since a check of KEY may read values beside it that --set changed (a model's arguments together, the batch
    sizes against each other); the file's alone without --set."""
    names = [override.partition("=")[0].strip() for override in overrides]
    if not names or not str(error).startswith(f"{source}: "):
        return error
    text = str(error).removeprefix(f"{source}: ")
    key = text.split(":", 1)[0]
    if any(key == name or key.startswith((f"{name}.", f"{name}[")) for name in names) or (
            _value_at(given, key) is _ABSENT and _value_at(changed, key) is not _ABSENT):
        return ConfigError(f"--set {text}")
    return ConfigError(f"{source} with --set {', '.join(names)}: {text}")


def _value_at(raw: Any, key: str) -> Any:
    """The value at a dotted key with list indices (``evaluation.metrics[0]``); ``_ABSENT`` where there is none."""
    node = raw
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
        index = int(part[1:-1]) if part.startswith("[") else None
        if index is not None and isinstance(node, list) and index < len(node):
            node = node[index]
        elif index is None and isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _ABSENT
    return node


_ABSENT = object()


def apply_override(raw: dict, override: str, source: str = "--set") -> None:
    """Apply ``a.b.c=value`` to the nested dict; the value is parsed as YAML (``1e-4``, ``true``, ``[1, 2]``)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. updater.apply_SR=true")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"--set {key}: {first_line(error)}") from None
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {key}: '{'.'.join(parts[:depth + 1])}' is not a mapping")
        node = child
    node[parts[-1]] = value


def mapping(parent: Any, key: str) -> dict:
    """``parent[key]`` when both are mappings, else {} (wrong types are reported by validation, later)."""
    child = parent.get(key) if isinstance(parent, dict) else None
    return child if isinstance(child, dict) else {}


def adapt_dataset_args(raw: dict, file_name: Any, file_args: dict, file_reference_split: Any) -> None:
    """Let ``--set dataset.name=synthetic`` (or any other data set) work on any config.

    When the name changes, the file's args belong to another data set (ImageNet's ``root`` and ``size``) and are
    dropped unless ``--set`` gave them, except its long tail's ratio and seed (the recipe's class imbalance, which any
    data set that takes one keeps; its ``n_max`` counts the file's images); so is the file's
    ``evaluation.reference_split`` where the new data set has no such split (its reference is then its training
    data). The synthetic data take resolution, channels and classes from the generator.
    """
    from source.datasets import DATASETS, SPLITS

    dataset = raw.get("dataset")
    if not isinstance(dataset, dict) or dataset.get("name") not in DATASETS:
        return
    args = dataset.setdefault("args", {}) or {}
    if not isinstance(args, dict):
        return
    dataset["args"] = args
    if file_name is not None and dataset["name"] != file_name:
        valid = {f.name for f in dataclasses.fields(DATASETS[dataset["name"]][0])}
        for key in [k for k in args if k not in valid or (k != "long_tail" and k in file_args
                                                            and args[k] == file_args[k])]:
            del args[key]
        tail, file_tail = mapping(args, "long_tail"), mapping(file_args, "long_tail")
        if tail.get("n_max") is not None and tail.get("n_max") == file_tail.get("n_max"):
            del tail["n_max"]  # a head class's image count in the file's data set
        evaluation = mapping(raw, "evaluation")
        if file_reference_split is not None and evaluation.get("reference_split") == file_reference_split \
                and file_reference_split not in SPLITS.get(dataset["name"], ()):
            del evaluation["reference_split"]
    if dataset["name"] == "synthetic":
        gen_args = mapping(mapping(mapping(raw, "models"), "generator"), "args")
        args.setdefault("size", gen_args.get("resolution", 32))
        args.setdefault("channels", gen_args.get("channels", 3))
        args.setdefault("n_classes", max(1, gen_args.get("n_classes", 0)))
