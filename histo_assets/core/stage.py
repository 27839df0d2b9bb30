"""Skip-if-unchanged bookkeeping for stage output folders.

Each stage folder carries ``summary.json`` with the fingerprint of everything
that produced it (input hashes, the params it read, the code version). A
re-run with the same fingerprint reuses the folder instead of recomputing,
which is what makes a no-change refresh cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histo_assets.core.io import stable_hash

SUMMARY_FILE = "summary.json"


def fingerprint(**inputs: Any) -> str:
    return stable_hash(inputs)


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
