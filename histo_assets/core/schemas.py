"""The columns of every parquet table and the fields of every summary.json the pipeline writes, declared once.

A table is written by one stage and read by later ones, the release and the
lineage audit. With its columns declared here, writers check a frame before
writing it and readers check a file as they read it, so a renamed or missing
column fails where it happens, naming the table and the file, not as a
KeyError or a silently absent field stages later.

Each stage folder's summary.json is a TypedDict here: static checkers see its
fields where it is read, and ``check_summary`` refuses, when it is written and
when it is read, a summary whose fields differ from its declaration. Every
summary has ``fingerprint``, the hash of the inputs it was built from (see
core/stage.py); ``data_version``, where present, is what Dagster and later
stages see change.

No dagster or torch import: the lineage audit runs in a plain clone of a release.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import pandas as pd

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.io import atomic_write_parquet


class SchemaError(HistoAssetsError, ValueError):
    """A frame or parquet file without its table's columns; the message names the table, file and columns."""


@dataclass(frozen=True)
class TableSchema:
    """A parquet table's columns, in the order it is written.

    ``extra_columns`` lets further columns follow the declared ones, for a
    table whose callers add their own (the release manifest's provenance).
    ``ordered`` False is for a table whose writers do not fix the order:
    checking it then leaves the order, and so the written bytes, as they are.
    """

    name: str
    columns: tuple[str, ...]
    extra_columns: bool = False
    ordered: bool = True

    def check(self, frame: pd.DataFrame, source: str | os.PathLike | None = None) -> pd.DataFrame:
        """The frame with its columns in this order (itself when they already are); ``source`` names it in errors."""
        present = list(frame.columns)
        missing = [column for column in self.columns if column not in present]
        unexpected = [] if self.extra_columns else [column for column in present if column not in self.columns]
        if missing or unexpected:
            problems = [f"{label} {', '.join(map(str, names))}" for label, names in
                        (("missing", missing), ("unexpected", unexpected)) if names]
            where = f"{source}: " if source is not None else ""
            raise SchemaError(f"{where}wrong columns for the {self.name}: {'; '.join(problems)}")
        if not self.ordered:
            return frame
        order = [*self.columns, *(column for column in present if column not in self.columns)]
        return frame if present == order else frame[order]

    def read(self, path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The table at ``path``, checked; only ``columns`` (which must be this table's), if given."""
        frame = pd.read_parquet(path)
        if columns is None:
            return self.check(frame, path)
        unknown = [column for column in columns if column not in self.columns]
        if unknown:
            raise ValueError(f"the {self.name} has no columns {', '.join(unknown)}")
        narrowed = replace(self, columns=tuple(columns), extra_columns=True)
        return narrowed.check(frame, path)[list(columns)]

    def write(self, path: str | os.PathLike, frame: pd.DataFrame) -> Path:
        return atomic_write_parquet(path, self.check(frame, path))


# slide_inventory/<class>/inventory.parquet: every usable raw file and its hash, by which later stages name slides.
SLIDE_INVENTORY = TableSchema(
    "slide inventory", ("path", "sha256", "bytes", "width", "height", "levels", "mpp", "reader", "mode"),
)
# square_crops/<class>/index.parquet: each crop and the source pixels it was cut from.
CROP_INDEX = TableSchema("crop index", (
    "crop_file", "crop_sha256", "source_path", "source_sha256", "level", "x", "y", "size", "read_size",
    "tissue_fraction",
))
# augmented_crops/<class>/index.parquet: each training image and the crop and operations it came from.
AUGMENTED_INDEX = TableSchema(
    "augmented crop index", ("file", "sha256", "kind", "source_crop", "source_crop_sha256", "operations", "seed"),
)
# augmented_crops/<class>/holdout.parquet: the metrics' reference set, and the rule and region that held each out.
HELD_OUT_CROPS = TableSchema(
    "held-out crop table", ("crop_file", "crop_sha256", "rule", "group", "source_path", "x", "y", "size", "region"),
)
# imported_hypernetwork_index/<class>/index.parquet: the lab's usable .pt files, so their images can be generated.
IMPORTED_HYPERNETWORK_INDEX = TableSchema("imported hypernetwork index", (
    "file", "path", "sha256", "name", "step", "sizes", "unused_sizes", "activation", "layer_structure",
    "sd_checkpoint", "sd_checkpoint_name",
))
# synthetic_images/<class>/<step>/index.parquet: each generated PNG and everything needed to regenerate or audit it.
GENERATION_INDEX = TableSchema("generation index", (
    "file", "sha256", "seed", "index", "tissue_class", "checkpoint_step", "prompt", "negative_prompt", "sampler",
    "steps", "cfg_scale", "width", "height", "batch_size", "multiplier", "hypernetwork_name", "hypernetwork_file",
    "hypernetwork_sha256", "hypernetwork_short_hash", "base_model_name", "base_model_sha256", "base_model_short_hash",
))
# What metrics.csv, the DVC plots CSVs and the pipeline's release publish of the metrics table.
PUBLISHED_METRICS = TableSchema("published metrics table", (
    "tissue_class", "step",
    "fid", "fid_ci_low", "fid_ci_high",
    "kid_mean", "kid_std", "kid_ci_low", "kid_ci_high", "kid_subset_size",
    "is_mean", "is_std", "is_images_per_split",
    "precision", "recall", "pr_k",
    "memorisation_rate",
    "n_generated", "n_reference", "feature_dim",
    "confidence_level", "bootstrap_resamples",
    "flags", "overlapping_steps",
    "extractor", "comparable_with", "preprocessing",
))
# metrics_summary/details/metrics.parquet: all scores, which the release copies; unordered: reused rows come key-sorted.
METRICS_TABLE = TableSchema("metrics table", PUBLISHED_METRICS.columns + (
    "n_train", "fid_vs_train", "is_note", "reference_max_train_similarity", "memorisation_threshold",
    "max_train_similarity", "extractor_note", "libraries",
), ordered=False)
# A release's manifest.parquet: each image, its class, step and hash; the caller's provenance keys follow, sorted.
RELEASE_MANIFEST = TableSchema(
    "release manifest", ("path", "tissue_class", "checkpoint_step", "sha256"), extra_columns=True,
)
# A release's lineage.parquet: training images back to crops and raw slides, so an audit needs only the release.
RELEASE_LINEAGE = TableSchema("release lineage table", (
    "tissue_class", "training_image", "training_image_sha256", "kind", "operations", "augmentation_seed",
    "square_crop", "square_crop_sha256", "raw_slide", "raw_slide_sha256", "level", "x", "y", "size",
))


class SlideInventorySummary(TypedDict):
    """``fingerprint`` is of the raw files' names, sizes and times; ``data_version`` of their content hashes."""

    fingerprint: str
    data_version: str
    count: int
    problems: list[dict[str, str]]


class SquareCropsSummary(TypedDict):
    fingerprint: str
    data_version: str
    count: int
    problems: list[dict[str, str]]


class AugmentedCropsSummary(TypedDict):
    fingerprint: str
    data_version: str
    count: int
    train_crops: int
    held_out_crops: int
    holdout_rule: str
    holdout_reason: str
    guard_crops: list[str]
    holdout_by_source: list[list[Any]]


class _DescribedBaseModel(TypedDict):
    fingerprint: str
    source: str
    name: str | None
    sha256: str
    short_hash: str
    path: str
    architecture: dict[str, Any]


class BaseModelSummary(_DescribedBaseModel, total=False):
    """Every base model is described; one trained here adds the data it learnt from and the time it took."""

    training_set: dict[str, Any]
    seconds: float


class HypernetworkCheckpointsSummary(TypedDict):
    fingerprint: str
    name: str
    training_set: str
    checkpoints: list[dict[str, Any]]
    final_loss: float | None
    steps_per_second: float
    device: str
    base_model_sha256: str
    base_model_short_hash: str
    resumed_from: str | None


class ImportedHypernetworkIndexSummary(TypedDict):
    fingerprint: str
    data_version: str
    count: int
    problems: list[dict[str, str]]


class SyntheticImagesSummary(TypedDict):
    """Step 0's images come from the base model alone: no checkpoint file, hash or training set."""

    fingerprint: str
    data_version: str
    count: int
    checkpoint_file: str | None
    checkpoint_sha256: str | None
    training_set: str | None
    run_id: str


class ImportedSyntheticImagesSummary(TypedDict):
    fingerprint: str
    images: dict[str, int]
    run_id: str


class CheckpointMetricsSummary(TypedDict):
    """``row`` is one row of the metrics table (METRICS_TABLE's columns but ``overlapping_steps``)."""

    fingerprint: str
    row: dict[str, Any]


class MetricsSummarySummary(TypedDict):
    """metrics_summary/summary.json: what the folder was built from; the findings are in MetricsDetails."""

    fingerprint: str
    data_version: str


class MetricsDetails(TypedDict):
    """metrics_summary/details/summary.json: the chosen checkpoints and how to read the figures."""

    best: dict[str, int]
    best_by: str
    tie_rule: str
    indistinguishable: dict[str, str]
    steps: list[int]
    extractor_note: str
    metrics_notes: str
    against_base_model: dict[str, Any]


class ClassifierUtilitySummary(TypedDict):
    fingerprint: str
    best_step_by_utility: dict[str, int] | None
    verdicts: dict[str, Any]
    notes: str


Summary = TypeVar("Summary", bound=Mapping[str, Any])


def check_summary(kind: type[Summary], summary: Mapping[str, Any], source: str | os.PathLike) -> Summary:
    """``summary`` itself, if its fields are exactly ``kind``'s (optional ones may be absent); ``source`` names it."""
    required, allowed = kind.__required_keys__, kind.__required_keys__ | kind.__optional_keys__
    missing, unexpected = sorted(required - summary.keys()), sorted(summary.keys() - allowed)
    if missing or unexpected:
        problems = [f"{label} {', '.join(names)}" for label, names in (("missing", missing), ("unexpected", unexpected))
                    if names]
        raise SchemaError(f"{source}: wrong fields for a {kind.__name__}: {'; '.join(problems)}")
    return summary  # type: ignore[return-value]
