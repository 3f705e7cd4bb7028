"""docs/config.md names every key the config accepts, with the type and default the code has, and no other key."""
import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from source.config import Config
from source.datasets import DATASETS
from source.datasets.longtail import LongTailArgs
from source.models import MODELS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|([^|]*)\|([^|]*)\|([^|]*)\|$")
REQUIRED = "required"


def sections() -> dict[str, dict[str, tuple[str, str, str]]]:
    """Each '## ' or '### ' heading's first word (backticks dropped) -> its rows: key -> (type, default, meaning)."""
    found, rows = {}, None
    for line in PAGE.read_text().splitlines():
        if line.startswith("#"):
            rows = found.setdefault(re.sub("[`:]", "", line.lstrip("#").split()[0]), {})
        elif (match := ROW.match(line)) and rows is not None:
            key, *cells = (cell.strip() for cell in match.groups())
            assert key not in rows, f"{key} twice in one section of {PAGE.name}"
            rows[key] = tuple(cells)
    return found


def type_text(hint) -> str:
    """How the page writes a type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(args)
    if origin is Union and type(None) in args:
        return f"{type_text(next(a for a in args if a is not type(None)))} or null"
    if origin is Union:  # bool or a literal: apply_SR's true, false or auto
        return "true, false or " + " or ".join(typing.get_args(args[1]))
    if origin is list:
        inner = type_text(args[0])
        return "list of " + inner.removeprefix("one of ")
    return {dict: "mapping", Any: "mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def leaves(cls, prefix: str = "") -> dict[str, tuple[str, object]]:
    """A dataclass's keys (nested ones dotted) -> (type text, default)."""
    out, hints = {}, typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            out.update(leaves(hints[field.name], f"{prefix}{field.name}."))
            continue
        default = (field.default if field.default is not dataclasses.MISSING else
                   field.default_factory() if field.default_factory is not dataclasses.MISSING else REQUIRED)
        out[prefix + field.name] = type_text(hints[field.name]), default
    return out


def assert_documented(rows: dict, expected: dict[str, tuple[str, object]], where: str) -> None:
    assert set(rows) == set(expected), (f"{where}: keys the page lacks {sorted(set(expected) - set(rows))}, keys "
                                        f"the code lacks {sorted(set(rows) - set(expected))}")
    for key, (type_, default) in expected.items():
        page_type, page_default, meaning = rows[key]
        assert page_type == type_, f"{where} {key}: the page says type {page_type!r}, the code {type_!r}"
        said = page_default if page_default == REQUIRED else yaml.safe_load(page_default)
        same_kind = type(said) is type(default) or (type(default) is float and type(said) is int)  # true is not 1
        assert said == default and same_kind, f"{where} {key}: the page says {page_default!r}, the code {default!r}"
        assert meaning, f"{where} {key}: no meaning"


def test_every_config_key_is_on_the_page_with_its_type_and_default():
    found = sections()
    rows = {key: row for name in ("Top", "Adam", "updater", "evaluation", "performance") for key, row in
            found[name].items()}
    assert_documented(rows, leaves(Config), "config")


def test_every_models_arguments_are_on_the_page():
    found = sections()
    for name, model in MODELS.items():
        hints = typing.get_type_hints(model.__init__)
        expected = {p.name: (type_text(hints[p.name]), REQUIRED if p.default is inspect.Parameter.empty else p.default)
                    for p in inspect.signature(model).parameters.values()}
        assert_documented(found[name], expected, name)


def test_every_data_sets_arguments_are_on_the_page():
    found = sections()
    assert_documented(found["dataset.args"], {f"long_tail.{k}": v for k, v in leaves(LongTailArgs).items()},
                      "dataset.args")
    for name, (args, _) in DATASETS.items():
        expected = {key: value for key, value in leaves(args).items() if not key.startswith("long_tail.")}
        rows = dict(found[name])
        if any(key.startswith("long_tail.") for key in leaves(args)):  # a row pointing at the shared table
            type_, default, meaning = rows.pop("long_tail", ("?", "?", ""))
            assert (type_, default) == ("", "") and meaning.startswith("see above"), f"{name}: no long_tail row"
        assert_documented(rows, expected, name)
