"""Skip-if-unchanged bookkeeping for stage output folders.

Each stage folder carries ``summary.json`` with the fingerprint of everything
that produced it (input hashes, the params it read, the code version). A
re-run with the same fingerprint reuses the folder instead of recomputing,
which is what makes a no-change refresh cheap.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histo_assets.core.io import Log, atomic_directory, atomic_write_json, stable_hash
from histo_assets.core.layout import SUMMARY
from histo_assets.core.schemas import SchemaError, Summary, check_summary

RUN_MARKER = "run.json"


# Settings that decide how fast a stage runs, never what it writes: changing them must not rebuild it.
SPEED_ONLY_SETTINGS = ("workers",)


def fingerprint(**inputs: Any) -> str:
    return stable_hash(inputs)


def output_settings(section: dict[str, Any]) -> dict[str, Any]:
    """A params section without its speed-only settings, for fingerprints."""
    return {key: value for key, value in section.items() if key not in SPEED_ONLY_SETTINGS}


def file_stats(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each file in a flat folder: DVC's stand-in for content hashes.

    Stages whose inputs are files a lab drops in (raw slides, imported
    hypernetworks) fingerprint these, so an unchanged folder is not re-hashed;
    a rewritten file with the same bytes is re-hashed and keeps its data version.
    """
    if not folder.is_dir():
        return []
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())


def read_summary(folder: Path, kind: type[Summary] | None = None) -> Summary | None:
    """The folder's summary, None if it has none (or an unreadable one); with ``kind``, checked to have its fields."""
    path = folder / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if kind is None else check_summary(kind, summary, path)


def current_summary(folder: Path, expected_fingerprint: str, kind: type[Summary]) -> Summary | None:
    """The stored summary if the folder was produced from exactly these inputs, in this version's format.

    A summary with other fields (written before its format changed) is not
    current: the stage rebuilds rather than fail on a folder it can remake.
    """
    summary = read_summary(folder)
    if not summary or summary.get("fingerprint") != expected_fingerprint:
        return None
    try:
        return check_summary(kind, summary, folder / SUMMARY)
    except SchemaError:
        return None


def prepare_resumable(folder: Path, expected_fingerprint: str) -> bool:
    """Keep an interrupted run of the same inputs so it can resume; clear anything older.

    Long stages (training) write into their folder as they go, so the folder
    cannot be swapped in atomically at the end; a marker records which inputs
    the partial contents belong to.
    """
    marker = folder / RUN_MARKER
    try:
        resumable = json.loads(marker.read_text()) == {"fingerprint": expected_fingerprint}
    except (OSError, json.JSONDecodeError):
        resumable = False
    if folder.exists() and not resumable:
        shutil.rmtree(folder)
    atomic_write_json(marker, {"fingerprint": expected_fingerprint})
    return resumable


def build_or_reuse(
    out: Path, stage_fingerprint: str, build: Callable[[Path], dict[str, Any]], kind: type[Summary], *,
    log: Log | None = None, in_place: bool = False,
) -> tuple[Summary, bool]:
    """The stage's summary and whether it was reused: rebuilt only when the fingerprint changed.

    ``build`` writes the stage's files into the folder it is given and returns
    the summary's fields; the fingerprint is added here, so every summary has
    it, and the summary is checked against ``kind`` (core/schemas.py) before
    it is written. By default the folder is a staging copy swapped in whole at
    the end, so a failed build leaves the previous output intact. ``in_place``
    is for stages that must write as they go (training resumes from its own
    partial output; see :func:`prepare_resumable`): then only the summary,
    written last, marks the folder complete.
    """
    summary = current_summary(out, stage_fingerprint, kind)
    if summary is not None:
        if log:
            log(f"inputs and params unchanged, reusing {out}")
        return summary, True

    def build_with_summary(folder: Path) -> Summary:
        summary = check_summary(kind, {"fingerprint": stage_fingerprint, **build(folder)}, out / SUMMARY)
        atomic_write_json(folder / SUMMARY, summary)
        return summary

    if in_place:
        return build_with_summary(out), False
    with atomic_directory(out) as staging:
        summary = build_with_summary(staging)
    return summary, False
