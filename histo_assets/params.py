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

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import atomic_write_text, stable_hash

PARAMS_ENV = "HISTO_ASSETS_PARAMS"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS_FILE = PROJECT_ROOT / "params.yaml"
# What `dvc repro` reads: the chosen params file with its `extends:` chain merged (resolve-params writes it).
RESOLVED_PARAMS_FILE = PROJECT_ROOT / "params.resolved.yaml"


class ParamsError(HistoAssetsError, ValueError):
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


# Keys whose params value is one kind of several the key takes; their settings object checks the value.
SEVERAL_KINDS = {"release.checkpoints": "best, utility, all or a list of steps"}


def value_kind(dotted: str, current: Any) -> str | None:
    """What an override of a key must be, judged by the key's value in the params files; None: anything.

    The CLI's checks and the Dagster run-config schema both follow it, so the
    launchpad refuses what ``--set`` refuses.
    """
    if current is None or dotted in SEVERAL_KINDS:
        return None  # an optional setting, off by default, or one of several kinds: its settings object checks the value
    if isinstance(current, bool):
        return "bool"
    if isinstance(current, int):
        return "int"
    if isinstance(current, float):
        return "float"
    if isinstance(current, str):
        return "text"
    if isinstance(current, list):
        return "list"
    return "mapping"


def _is_whole(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


_KIND_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("true or false", lambda value: isinstance(value, bool)),
    "int": ("a whole number", _is_whole),
    "float": ("a number", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)),
    "text": ("text", lambda value: isinstance(value, (str, int, float)) and not isinstance(value, bool)),
    "list": ("a list, e.g. [1, 2]", lambda value: isinstance(value, list)),
    "mapping": ("a mapping, e.g. {key: value}", lambda value: isinstance(value, Mapping)),
}


def _whole_numbers_kept_whole(current: Any, value: Any) -> Any:
    """A list of whole numbers given back as whole numbers when the params list is of whole numbers.

    Dagster's Float config type turns 100 into 100.0; without this, a
    launchpad override of checkpoint steps would change fingerprints and
    partition names that the same override through ``--set`` leaves alone.
    """
    if (isinstance(current, list) and current and all(_is_whole(item) for item in current) and isinstance(value, list)
            and all(isinstance(item, float) and item.is_integer() for item in value)):
        return [int(item) for item in value]
    return value


def _assign(values: dict[str, Any], keys: list[str], value: Any, typed: str | None, shown: str) -> None:
    """Set one key in place, checked against its kind; ``typed`` is the text as typed, kept for text keys."""
    dotted = ".".join(keys)
    node = values
    for depth, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            raise ParamsError(f"override {shown}: {'.'.join(keys[: depth + 1])} is not a section")
        node = node[key]
    if keys[-1] not in node:
        known = ", ".join(sorted(str(key) for key in node))
        raise ParamsError(f"override {shown}: unknown key {dotted}; known here: {known}")
    current = node[keys[-1]]
    kind = value_kind(dotted, current)
    if kind is not None and not _KIND_CHECKS[kind][1](value):
        raise ParamsError(f"override {shown}: {dotted} must be {_KIND_CHECKS[kind][0]} (params has {current!r}), not {value!r}")
    if kind == "text" and not isinstance(value, str):
        value = typed if typed is not None else str(value)
    node[keys[-1]] = _whole_numbers_kept_whole(current, value)


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
        _assign(result, keys, value, assignment.partition("=")[2].strip(), repr(assignment))
    return result


def override_leaves(values: Mapping[str, Any], nested: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    """(keys, value) of every setting in a nested override, descending only into the params' own sections."""
    for key, value in nested.items():
        keys = (*prefix, str(key))
        if isinstance(value, Mapping) and isinstance(values.get(key), Mapping):
            yield from override_leaves(values[key], value, keys)
        else:
            yield list(keys), value


def apply_nested_overrides(values: Mapping[str, Any], nested: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with a nested override (Dagster run config's shape of params) applied, checked like ``--set``."""
    result = copy.deepcopy(dict(values))
    for keys, value in override_leaves(values, nested):
        _assign(result, keys, value, None, repr(f"{'.'.join(keys)}={value!r}"))
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

    @property
    def steps(self) -> list[int]:
        """The steps every class is evaluated at: the base model's step 0, then every checkpoint step."""
        # Imported here: core.steps brings pandas, which `resolve-params` and the CLI's start need not load.
        from histo_assets.core.steps import evaluated_steps

        return evaluated_steps(self.values["training"]["checkpoint_steps"])

    def section_hash(self, *keys: str) -> str:
        """Fingerprint of the given top-level keys, for cache keys and code versions."""
        return stable_hash({key: self.values.get(key) for key in keys})

    def with_overrides(self, assignments: Iterable[str]) -> Params:
        assignments = list(assignments)
        if not assignments:
            return self
        return Params(apply_overrides(self.values, assignments), self.source)

    def with_nested_overrides(self, nested: Mapping[str, Any]) -> Params:
        return Params(apply_nested_overrides(self.values, nested), self.source) if nested else self

    def nested_overrides(self, assignments: Iterable[str]) -> dict[str, Any]:
        """``section.key=value`` overrides as the nested mapping Dagster's run config takes, with checked values."""
        nested: dict[str, Any] = {}
        for assignment in assignments:
            keys, _ = parse_override(assignment)
            node, value = nested, self.values
            for key in keys:
                value = value[key]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = copy.deepcopy(value)
        return nested


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


def write_resolved(params: Params, path: str | os.PathLike = RESOLVED_PARAMS_FILE) -> Path:
    """Write ``params`` as one file without ``extends:``, for tools that read a single YAML file (DVC).

    Relative paths in params (``data_dir``, model files, ...) are relative to
    the file's folder, so the resolved copy must sit in the same folder as the
    file it was resolved from, or those paths would point elsewhere.
    """
    path = Path(path).resolve()
    if path.parent != params.source.parent:
        raise ParamsError(f"{params.source} is not in {path.parent}: its relative paths would change meaning in "
                          f"{path}; put the params file in {path.parent}")
    atomic_write_text(path, f"# Resolved from {params.source.name} by `histo-assets resolve-params`; do not edit.\n"
                      + yaml.safe_dump(params.values, sort_keys=False))
    return path
