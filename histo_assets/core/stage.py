"""Skip-if-unchanged bookkeeping for stage output folders.

Each stage folder carries ``summary.json`` with the fingerprint of everything
that produced it (input hashes, the params it read, the code version). A
re-run with the same fingerprint reuses the folder instead of recomputing,
which is what makes a no-change refresh cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from histo_assets.core.io import atomic_write_json, stable_hash

SUMMARY_FILE = "summary.json"
RUN_MARKER = "run.json"


# Settings that decide how fast a stage runs, never what it writes: changing them must not rebuild it.
SPEED_ONLY_SETTINGS = ("workers",)


def fingerprint(**inputs: Any) -> str:
    return stable_hash(inputs)


def output_settings(section: dict[str, Any]) -> dict[str, Any]:
    """A params section without its speed-only settings, for fingerprints."""
    return {key: value for key, value in section.items() if key not in SPEED_ONLY_SETTINGS}


def read_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def current_summary(folder: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The stored summary if the folder was produced from exactly these inputs."""
    summary = read_summary(folder)
    if summary and summary.get("fingerprint") == expected_fingerprint:
        return summary
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
