"""Where each asset keeps its files under the data root.

One folder per asset and class, so a DVC ``out`` and a Dagster partition are
the same thing, and an auditor can find any stage's output without a database.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    data_dir: Path

    def folder(self, name: str, tissue_class: str | None = None, step: int | None = None) -> Path:
        """The folder of that name for a class and step, so that a stage can name the folders it reads."""
        found = getattr(self, name)
        if isinstance(found, Path):
            return found
        return found(tissue_class, step) if "step" in inspect.signature(found).parameters else found(tissue_class)

    @property
    def raw_root(self) -> Path:
        return self.data_dir / "raw"

    def raw(self, tissue_class: str) -> Path:
        return self.raw_root / tissue_class

    def slide_inventory(self, tissue_class: str) -> Path:
        return self.data_dir / "slide_inventory" / tissue_class

    @property
    def base_model(self) -> Path:
        """The base_model asset: its summary, and for base_model.source `trained` the model it trained."""
        return self.data_dir / BASE_MODEL_ASSET

    def square_crops(self, tissue_class: str) -> Path:
        return self.data_dir / "square_crops" / tissue_class

    def augmented_crops(self, tissue_class: str) -> Path:
        return self.data_dir / "augmented_crops" / tissue_class

    def hypernetwork_checkpoints(self, tissue_class: str) -> Path:
        return self.data_dir / "hypernetwork_checkpoints" / tissue_class

    def imported_hypernetworks_inbox(self, tissue_class: str) -> Path:
        """Where a lab drops AUTOMATIC1111 .pt hypernetworks it already has."""
        return self.data_dir / "imported_hypernetworks" / tissue_class

    def imported_hypernetwork_index(self, tissue_class: str) -> Path:
        return self.data_dir / "imported_hypernetwork_index" / tissue_class

    def imported_synthetic_images(self, tissue_class: str) -> Path:
        return self.data_dir / "imported_synthetic_images" / tissue_class

    def synthetic_images(self, tissue_class: str, step: int) -> Path:
        return self.data_dir / "synthetic_images" / tissue_class / str(step)

    def checkpoint_metrics(self, tissue_class: str, step: int) -> Path:
        return self.data_dir / "checkpoint_metrics" / tissue_class / str(step)

    @property
    def metrics_summary(self) -> Path:
        """DVC metrics (metrics.json) and plots (metrics.csv) at the top; tables and figures in details/."""
        return self.data_dir / "metrics_summary"

    @property
    def metrics_details(self) -> Path:
        return self.metrics_summary / "details"

    @property
    def classifier_utility(self) -> Path:
        """One folder per release candidate, and the DVC metrics (utility.json) and plot across them at the top."""
        return self.data_dir / "classifier_utility"

    def release(self, name: str) -> Path:
        return self.data_dir / "releases" / name

    @property
    def cache(self) -> Path:
        return self.data_dir / ".cache"


# The base model's asset name, and its folder under the data root.
BASE_MODEL_ASSET = "base_model"
IMAGES = "images"
INDEX = "index.parquet"
INVENTORY = "inventory.parquet"
HOLDOUT = "holdout.parquet"
PREVIEW = "preview.png"
SUMMARY = "summary.json"
LOSS_PLOT = "loss.png"
