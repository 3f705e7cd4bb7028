"""Plain data (parsed YAML, a snapshot's config) -> typed dataclasses, with one-line errors naming the key.

Generic over the dataclasses it is given: ``refine`` lets the caller check what depends on a value
(e.g. a model's arguments depend on its name) right after each dataclass is built. And back: typed ->
plain (``to_plain``), and the leaves in which two plain structures differ (``config_differences``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml


class ConfigError(Exception):
    """A user error in a config file or override; the message is one line."""


# A config has about a hundred values, four levels deep; YAML aliases (and pickle's shared references in snapshots)
# can make a kilobyte expand to billions when walked, and deep nesting exhausts Python's recursion, so anything this
# large or deep is refused before it is walked.
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_DEPTH = 32
MAX_MAPPING_KEYS = 1000


def check_expansion(raw: Any, source: str) -> None:
    """Count the values ``raw`` expands to and how deep, stopping at the limits (cycles and alias bombs end
    quickly)."""
    pending, count = [(raw, 0)], 0
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{source}: expands to more than {MAX_CONFIG_VALUES:,} values (nested YAML aliases?); "
                              "refused")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: nested deeper than {MAX_CONFIG_DEPTH} levels; refused")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple)):
            pending.extend((item, depth + 1) for item in value)


class StrictLoader(yaml.SafeLoader):
    """safe_load without merge keys (``<<``), which PyYAML expands while parsing, before any limit can count:
    some 850 bytes of merges of merges ask for tens of GB), at most MAX_CONFIG_DEPTH levels deep, and without two
    of YAML 1.1's silent readings: a key given twice (the last one won; also spelled otherwise, ``1`` and ``0x1``),
    base-60 numbers (``10:00`` was 600, ``1:30.0`` 90.0) and octal ones (``020000`` was 8192). A mapping holds at
    most MAX_MAPPING_KEYS keys: integer keys equal modulo 2^61 - 1 share a hash, and n of them took quadratic time
    to check and build (40k: 35 s)."""

    def flatten_mapping(self, node) -> None:
        if any(key.tag == "tag:yaml.org,2002:merge" for key, _ in node.value):
            raise yaml.constructor.ConstructorError(None, None, "merge keys (<<) are not supported", node.start_mark)
        if len(node.value) > MAX_MAPPING_KEYS:  # a config's mappings hold tens
            raise yaml.constructor.ConstructorError(None, None, f"a mapping of {len(node.value)} keys, more than "
                                                    f"{MAX_MAPPING_KEYS}", node.start_mark)
        seen = set()
        for key, _ in node.value:
            value = self.construct_object(key) if isinstance(key, yaml.ScalarNode) else id(key)
            if isinstance(key, yaml.ScalarNode) and value in seen:  # as the dict compares them: 1, 0x1, 1.0, true
                raise yaml.constructor.ConstructorError(None, None, f"the key {key.value!r} is given twice",
                                                        key.start_mark)
            seen.add(value)
        super().flatten_mapping(node)

    def construct_yaml_int(self, node):
        digits = str(node.value).replace("_", "").lstrip("+-")
        if ":" in digits or len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
            kind = "a base-60" if ":" in digits else "an octal"
            raise yaml.constructor.ConstructorError(None, None, f"{node.value} reads as {kind} number in YAML; "
                                                    "quote it, or write the number without it", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        if ":" in str(node.value):
            raise yaml.constructor.ConstructorError(None, None, f"{node.value} reads as a base-60 number in YAML; "
                                                    "quote it, or write the number", node.start_mark)
        return super().construct_yaml_float(node)

    def compose_node(self, parent, index):
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)
StrictLoader.add_constructor("tag:yaml.org,2002:float", StrictLoader.construct_yaml_float)


def read_yaml(path: Path, source: str) -> Any:
    """A config or study file's content, with one-line errors; refused past the limits above."""
    try:
        raw = yaml.load(path.read_text(), Loader=StrictLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where} ({getattr(error, 'problem', None) or first_line(error)})"
                          ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot be read ({first_line(error)})") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{source}: a value cannot be read ({first_line(error)})") from None
    check_expansion(raw, source)
    return raw


Refine = Callable[[Any, dict, str, str], Any]  # (instance, raw mapping, key, source) -> instance


def validate(value: Any, annotation: Any, key: str, source: str, refine: Refine | None = None) -> Any:
    if dataclasses.is_dataclass(annotation):
        return validate_dataclass(value, annotation, key, source, refine)
    return validate_value(value, annotation, key, source)


def validate_dataclass(value: Any, cls: type, key: str, source: str, refine: Refine | None = None) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key or 'top level'}: expected a mapping, got {describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(value, list(fields), key, source)
    kwargs = {}
    for name, f in fields.items():
        sub_key = f"{key}.{name}" if key else name
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {sub_key}: missing required key")
            continue
        kwargs[name] = validate(value[name], hints[name], sub_key, source, refine)
    instance = cls(**kwargs)
    return refine(instance, value, key, source) if refine else instance


def validate_value(value: Any, annotation: Any, key: str, source: str) -> Any:
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return validate_value(value, option, key, source)
            except ConfigError:
                continue
        raise _type_error(value, annotation, key, source)
    if origin is Literal:
        if value in typing.get_args(annotation) and type(value) in {type(a) for a in typing.get_args(annotation)}:
            return value
        raise _type_error(value, annotation, key, source)
    if annotation is type(None):
        if value is None:
            return None
        raise _type_error(value, annotation, key, source)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _is_number(value):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if annotation in (int, str, bool, list, dict):
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
        raise _type_error(value, annotation, key, source)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        item = (typing.get_args(annotation) or (Any,))[0]
        return [validate_value(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    raise _type_error(value, annotation, key, source)


def reject_unknown(value: dict, valid: list[str], key: str, source: str) -> None:
    for name in value:
        if name not in valid:
            where = f"{key}.{name}" if key else name
            raise ConfigError(f"{source}: {where}: unknown key{suggest(name, valid)}")


def suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _type_error(value: Any, annotation: Any, key: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: expected {_type_name(annotation)}, got {describe(value)}")


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def out_of_memory(error: Exception) -> str | None:
    """One line for running out of memory (torch's CUDA error, or its CPU allocator's RuntimeError), else None."""
    if type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error):
        return (f"out of memory ({first_line(error)[:300]}); smaller batches fit in less: micro_batchsize "
                "(accumulating more of them per iteration), gen_batchsize, evaluation.batch_size (--batch-size)")
    return None


# --- back to plain structures -----------------------------------------------------------------

def to_plain(value: Any) -> Any:
    """Typed config -> plain YAML-able structure (for config.yaml and snapshots)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}."""
    if isinstance(value, dict):
        flat = {}
        for k, v in value.items():
            flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: value}


def config_differences(old: dict, new: dict) -> list[str]:
    """Lines like ``updater.apply_SR: false -> true`` for every leaf that differs."""
    old_flat, new_flat = flatten(old), flatten(new)
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
        if before != after:
            lines.append(f"{key}: {_yaml_scalar(before)} -> {_yaml_scalar(after)}")
    return lines


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
