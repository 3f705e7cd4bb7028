"""``--set KEY=VALUE`` on a config's raw mapping: applying it, adapting the data set's arguments when it changes the
data set, and saying whose a validation error is (the file's or the command line's)."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import yaml

from source.typed import ConfigError, StrictLoader, first_line


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


def leftover_arguments(overrides: list[str], extra: list[str]) -> str:
    """argparse's complaint about arguments it could not place, with their likely cause: a --set split by spaces."""
    split = [override for override in overrides if "=" not in override or override.endswith("=")]
    if split:
        return f"--set {split[0]} {extra[0]}: write KEY=VALUE as one argument, without spaces around '='"
    return f"unrecognized arguments: {' '.join(extra)}"


def apply_override(raw: dict, override: str, source: str = "--set") -> None:
    """Apply ``a.b.c=value`` to the nested dict; the value is parsed as YAML (``1e-4``, ``true``, ``[1, 2]``)."""
    key, sep, text = override.partition("=")
    key = key.strip()  # a quoted 'KEY = VALUE'
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. updater.apply_SR=true")
    try:
        value = yaml.load(text, Loader=StrictLoader)
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


def overridden(overrides: list[str], key: str) -> bool:
    """Whether one of ``overrides`` (``KEY=VALUE``) sets ``key`` or a mapping above it."""
    names = [override.partition("=")[0].strip() for override in overrides]
    return any(key == name or key.startswith(f"{name}.") for name in names)


def adapt_dataset_args(raw: dict, file_name: Any, overrides: list[str]) -> None:
    """Let ``--set dataset.name=synthetic`` (or any other data set) work on any config.

    When the name changes, the file's args belong to another data set (ImageNet's ``root`` and ``size``) and are
    dropped unless ``--set`` gave them, except its long tail's ratio and seed (the recipe's class imbalance, which any
    data set that takes one keeps; its ``n_max`` counts the file's images). The file's
    ``evaluation.reference_split`` becomes the new data set's held-out split where that lacks it (CIFAR-10's test is
    LSUN's eval). A data set that resizes to a ``size`` gets the generator's resolution unless ``--set`` gave one;
    the synthetic data take channels and classes from the generator too.
    """
    from source.datasets import DATASETS

    dataset = raw.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("name"), str) or dataset["name"] not in DATASETS:
        return
    args = dataset.setdefault("args", {}) or {}
    if not isinstance(args, dict):
        return
    dataset["args"] = args
    gen_args = mapping(mapping(mapping(raw, "models"), "generator"), "args")
    if file_name is not None and dataset["name"] != file_name:
        _drop_the_files_args(args, DATASETS[dataset["name"]][0], overrides)
        if not overridden(overrides, "evaluation.reference_split"):
            _held_out_split(mapping(raw, "evaluation"), dataset["name"])
        size = next((f for f in dataclasses.fields(DATASETS[dataset["name"]][0]) if f.name == "size"), None)
        if "resolution" in gen_args and size is not None and size.default is not None:  # None: the files' (prepared)
            args.setdefault("size", gen_args["resolution"])
    if dataset["name"] == "synthetic":
        args.setdefault("size", _int_or(gen_args.get("resolution"), 32))
        args.setdefault("channels", _int_or(gen_args.get("channels"), 3))
        args.setdefault("n_classes", max(1, _int_or(gen_args.get("n_classes"), 0)))


def _int_or(value: Any, default: int) -> int:
    """``value`` where it is an integer, else ``default``: a generator's wrong value is validation's to report."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _drop_the_files_args(args: dict, args_type: type, overrides: list[str]) -> None:
    valid = {f.name for f in dataclasses.fields(args_type)}
    for key in list(args):
        if key not in valid or (key != "long_tail" and not overridden(overrides, f"dataset.args.{key}")):
            del args[key]
    tail = mapping(args, "long_tail")
    if "n_max" in tail and not overridden(overrides, "dataset.args.long_tail.n_max"):
        del tail["n_max"]  # a head class's image count in the file's data set


def _held_out_split(evaluation: dict, name: str) -> None:
    """The file's reference split where the data set has it, else the data set's held-out split, its last (none
    set: the training data, whatever the data set)."""
    from source.datasets import SPLITS

    splits = SPLITS.get(name, ())
    if evaluation.get("reference_split") not in (None, *splits) and len(splits) > 1:
        evaluation["reference_split"] = splits[-1]
