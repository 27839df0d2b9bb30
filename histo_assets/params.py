"""Loading ``params.yaml``: the one source of defaults.

A params file may name a parent with ``extends:``; its keys are deep-merged
over the parent's. ``HISTO_ASSETS_PARAMS`` points the whole project (Dagster
definitions, CLI, tests) at another file. Single keys can be overridden with
``section.key=value`` strings, the syntax of ``dvc exp run -S``, which is also
what Dagster run config passes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from histo_assets.core.io import stable_hash

PARAMS_ENV = "HISTO_ASSETS_PARAMS"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS_FILE = PROJECT_ROOT / "params.yaml"


class ParamsError(ValueError):
    """A params file or override that cannot be used."""


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ParamsError(f"params files extend each other in a loop: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _deep_merge(_read_chain(path.parent / parent, seen + (path,)), data)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {assignment!r} is not of the form section.key=value")
    return key.strip().split("."), yaml.safe_load(raw)


def _expected_type(current: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """What an override of a key must be, judged by the key's value in the params files; None: anything."""
    if current is None:
        return None  # an optional setting, off by default: its settings object checks the value
    if isinstance(current, bool):
        return "true or false", lambda value: isinstance(value, bool)
    if isinstance(current, int):
        return "a whole number", lambda value: isinstance(value, int) and not isinstance(value, bool)
    if isinstance(current, float):
        return "a number", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, str):
        return "text", lambda value: isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if isinstance(current, list):
        return "a list, e.g. [1, 2]", lambda value: isinstance(value, list)
    return "a mapping, e.g. {key: value}", lambda value: isinstance(value, Mapping)


def apply_overrides(values: Mapping[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """``values`` with each ``section.key=value`` applied, each checked against the key's current type.

    An unknown key, or a value of another type than the params files give
    the key, raises :class:`ParamsError` naming the key, the value and what
    was expected, before any work starts. A number given for a text key (a
    learning-rate schedule, say) is kept as the text typed.
    """
    result = copy.deepcopy(dict(values))
    for assignment in assignments:
        keys, value = parse_override(assignment)
        dotted = ".".join(keys)
        node = result
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise ParamsError(f"override {assignment!r}: {'.'.join(keys[: depth + 1])} is not a section")
            node = node[key]
        if keys[-1] not in node:
            known = ", ".join(sorted(str(key) for key in node))
            raise ParamsError(f"override {assignment!r}: unknown key {dotted}; known here: {known}")
        expected = _expected_type(node[keys[-1]])
        if expected is not None and not expected[1](value):
            raise ParamsError(f"override {assignment!r}: {dotted} must be {expected[0]} "
                              f"(params has {node[keys[-1]]!r}), not {value!r}")
        if isinstance(node[keys[-1]], str) and not isinstance(value, str):
            value = assignment.partition("=")[2].strip()
        node[keys[-1]] = value
    return result


@dataclass(frozen=True)
class Params:
    """Resolved parameters plus the file they came from."""

    values: dict[str, Any]
    source: Path

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def classes(self) -> list[str]:
        return list(self.values["classes"])

    @property
    def data_dir(self) -> Path:
        return (self.source.parent / self.values["data_dir"]).resolve()

    @property
    def seed(self) -> int:
        return int(self.values["seed"])

    @property
    def resolution(self) -> int:
        return int(self.values["resolution"])

    def section_hash(self, *keys: str) -> str:
        """Fingerprint of the given top-level keys, for cache keys and code versions."""
        return stable_hash({key: self.values.get(key) for key in keys})

    def with_overrides(self, assignments: Iterable[str]) -> Params:
        assignments = list(assignments)
        if not assignments:
            return self
        return Params(apply_overrides(self.values, assignments), self.source)


def params_path(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path).resolve()
    env = os.environ.get(PARAMS_ENV)
    return Path(env).resolve() if env else DEFAULT_PARAMS_FILE


def load_params(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Params:
    source = params_path(path)
    values = _read_chain(source)
    for required in ("data_dir", "classes", "seed", "resolution"):
        if required not in values:
            raise ParamsError(f"{source}: missing required key {required!r}")
    classes = values["classes"]
    if not classes or len(set(classes)) != len(classes):
        raise ParamsError(f"{source}: 'classes' must be a non-empty list of distinct names")
    for name in classes:
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ParamsError(f"{source}: class name {name!r} must be letters, digits, '_' or '-'")
    return Params(values, source).with_overrides(overrides)
