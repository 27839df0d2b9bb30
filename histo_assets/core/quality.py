"""Image-folder inspections behind the per-class asset checks.

Training a hypernetwork for hours on a folder with unreadable, mis-sized or
duplicated images wastes the most expensive step, so these run before it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from histo_assets.core.io import sha256_file


@dataclass
class FolderReport:
    count: int = 0
    undecodable: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)
    wrong_mode: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)


def inspect_images(folder: Path, expected_size: int) -> FolderReport:
    """Decode every PNG fully and compare size, mode and content hash."""
    report = FolderReport()
    by_hash: dict[str, list[str]] = defaultdict(list)
    for path in sorted(folder.glob("*.png")):
        report.count += 1
        by_hash[sha256_file(path)].append(path.name)
        try:
            with Image.open(path) as image:
                image.load()
                size, mode = image.size, image.mode
        except (OSError, SyntaxError, ValueError) as error:
            report.undecodable.append(f"{path.name}: {error}")
            continue
        if size != (expected_size, expected_size):
            report.wrong_size.append(f"{path.name}: {size[0]}x{size[1]}")
        if mode != "RGB":
            report.wrong_mode.append(f"{path.name}: {mode}")
    report.duplicates = [names for names in by_hash.values() if len(names) > 1]
    return report
