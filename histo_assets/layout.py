"""Where each asset keeps its files under the data root.

One folder per asset and class, so a DVC ``out`` and a Dagster partition are
the same thing, and an auditor can find any stage's output without a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    @property
    def raw_root(self) -> Path:
        return self.data_dir / "raw"

    def raw(self, tissue_class: str) -> Path:
        return self.raw_root / tissue_class

    def raw_slides(self, tissue_class: str) -> Path:
        return self.data_dir / "raw_slides" / tissue_class

    def square_crops(self, tissue_class: str) -> Path:
        return self.data_dir / "square_crops" / tissue_class

    def augmented_crops(self, tissue_class: str) -> Path:
        return self.data_dir / "augmented_crops" / tissue_class


IMAGES = "images"
INDEX = "index.parquet"
INVENTORY = "inventory.parquet"
HOLDOUT = "holdout.parquet"
PREVIEW = "preview.png"
SUMMARY = "summary.json"
