"""What a training run names its files in its output folder.

Apart from ``training`` so that ``histo-assets lineage`` can find a run's
settings without importing torch and diffusers (seconds on every call);
nothing here may import them.
"""

from __future__ import annotations

import re
from pathlib import Path


def checkpoint_path(out_dir: str | Path, name: str, steps: int) -> Path:
    return Path(out_dir) / f"{name}-{steps}.pt"


def final_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.pt"


def loss_csv_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}-loss.csv"


def settings_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}-settings.json"


def existing_checkpoints(out_dir: str | Path, name: str) -> dict[int, Path]:
    """``<name>-N.pt`` files in ``out_dir`` by N."""
    pattern = re.compile(rf"^{re.escape(name)}-(\d+)\.pt$")
    found = {}
    folder = Path(out_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match and path.is_file():
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))
