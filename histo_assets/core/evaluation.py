"""Scoring one checkpoint's synthetic images against real crops, choosing among checkpoints, and the summary.

Real-set features are cached under the content hash of the images and the
extractor's identity, so evaluating K checkpoints costs K generated-set
feature passes plus one pass per real set, not K x (generated + real).
Every row carries the extractor's identity, what its numbers are comparable
with, the preprocessing, the sample sizes, bootstrap intervals and flags for
every sample-size problem, so a fallback-feature FID is never mistaken for a
published-scale Inception FID, nor a 4-crop FID for a meaningful one.
"""

from __future__ import annotations

import importlib.metadata
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from histo_assets.core.errors import HistoAssetsError
from histo_assets.core.features import FeatureExtractorInfo, build_extractor, extract_features, extractor_info
from histo_assets.core.io import (
    Log,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
    stable_hash,
)
from histo_assets.core.layout import HOLDOUT, IMAGES, SUMMARY, Layout
from histo_assets.core.metrics import (
    bootstrap_fid_kid,
    centred_interval,
    frechet_distance,
    inception_score,
    intervals_overlap,
    kernel_distance,
    memorisation,
    precision_recall,
)
from histo_assets.core.plots import metric_curves
from histo_assets.core.previews import contact_sheet
from histo_assets.core.schemas import (
    HELD_OUT_CROPS,
    METRICS_TABLE,
    PUBLISHED_METRICS,
    CheckpointMetricsSummary,
    MetricsDetails,
    check_summary,
)
from histo_assets.core.seeding import derive_seed
from histo_assets.core.stage import read_summary
from histo_assets.core.steps import BASELINE_STEP

if TYPE_CHECKING:
    from histo_assets.core.feature_networks import ImageFeatureExtractor

LIBRARIES = ("torch", "torchmetrics", "diffusers", "numpy", "scipy")

# Row flags, in the order they are written, and what each means (shown in the dataset card).
SMALL_REFERENCE = "small_reference"
FID_RANK_DEFICIENT = "fid_rank_deficient"
KID_SUBSET_ABOVE_N = "kid_subset_above_n"
IS_SPLIT_ABOVE_N = "is_split_above_n"
PR_K_ABOVE_N = "pr_k_above_n"
FLAG_MEANINGS = {
    SMALL_REFERENCE: "fewer held-out reference images than metrics.min_reference",
    FID_RANK_DEFICIENT: "a set has no more images than feature dimensions, so its covariance is singular and FID "
    "is dominated by small-sample bias",
    KID_SUBSET_ABOVE_N: "metrics.kid_subset_size exceeds a set, so KID used subsets of the whole smaller set "
    "(kid_subset_size records the size used) and kid_std shows generated-side variation only; "
    "the bootstrap interval is the uncertainty to read",
    IS_SPLIT_ABOVE_N: "fewer generated images than metrics.is_images_per_split: IS is one split of them all and "
    "not comparable with rows at the configured split size",
    PR_K_ABOVE_N: "metrics.pr_k is not below both set sizes: precision and recall were not computed "
    "rather than computed with a smaller k, which would inflate precision",
}
FLAG_SEPARATOR = ";"

# The published columns as a list, the form pandas selects columns by.
TABLE_COLUMNS = list(PUBLISHED_METRICS.columns)
# metrics keys that only the summary reads: changing them must not re-score any checkpoint.
SUMMARY_ONLY_SETTINGS = ("best_checkpoint_metric", "best_checkpoint_tie")
# The folder under the data cache that holds FeatureCache's files.
FEATURE_CACHE = "features"
# The tissue_class of the rows that pool every class, per step.
ALL_CLASSES = "all"
# Images per row of the originals-versus-generated grids.
GRID_IMAGES = 8
CURVES_FILE = "curves.png"
# The full metric table in details/, which the release copies its metrics from.
METRICS_TABLE_FILE = "metrics.parquet"


@dataclass(frozen=True)
class SelectionMetric:
    """A metrics.best_checkpoint_metric choice: its column, its direction and its interval columns, if any."""

    column: str
    lower_is_better: bool
    interval: tuple[str, str] | None = None


SELECTION_METRICS = {
    "kid": SelectionMetric("kid_mean", True, ("kid_ci_low", "kid_ci_high")),
    "kid_mean": SelectionMetric("kid_mean", True, ("kid_ci_low", "kid_ci_high")),
    "fid": SelectionMetric("fid", True, ("fid_ci_low", "fid_ci_high")),
    "fid_vs_train": SelectionMetric("fid_vs_train", True),
    "memorisation_rate": SelectionMetric("memorisation_rate", True),
    "is_mean": SelectionMetric("is_mean", False),
    "precision": SelectionMetric("precision", False),
    "recall": SelectionMetric("recall", False),
}
TIE_RULES = ("lowest", "earliest")


@dataclass(frozen=True)
class MetricSettings:
    kid_subset_size: int
    kid_subsets: int
    pr_k: int
    memorisation_threshold: float
    is_images_per_split: int
    batch_size: int
    bootstrap_resamples: int
    confidence_level: float
    min_reference: int
    seed: int


def scoring_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``metrics`` settings a checkpoint's row depends on, for its fingerprint."""
    return {key: value for key, value in section.items() if key not in SUMMARY_ONLY_SETTINGS}


@dataclass(frozen=True)
class FeatureSet:
    features: np.ndarray
    logits: np.ndarray | None

    def __len__(self) -> int:
        return len(self.features)

    def concat(self, other: FeatureSet) -> FeatureSet:
        logits = None if self.logits is None or other.logits is None else np.concatenate([self.logits, other.logits])
        return FeatureSet(np.concatenate([self.features, other.features]), logits)


def image_set_hash(paths: Sequence[Path]) -> str:
    """Content hash of a set of images, independent of order and folder."""
    return stable_hash(sorted((p.name, sha256_file(p)) for p in paths))


def library_versions() -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in LIBRARIES)


class FeatureCache:
    """Features of image sets, stored as .npz under (extractor identity, image-set hash).

    One instance serves one evaluation, during which the images do not change, so
    each set's content hash is computed once even though the same held-out and
    training sets are looked up for every checkpoint. ``extractor`` may be a
    function that loads the network: it is then called only when features must
    be extracted, so naming cached sets (fingerprints) never loads it.
    """

    def __init__(self, cache_dir: Path, extractor: ImageFeatureExtractor | Callable[[], ImageFeatureExtractor],
                 info: FeatureExtractorInfo, batch_size: int):
        self.cache_dir = cache_dir
        self._extractor = extractor
        self.info = info
        self.batch_size = batch_size
        self.identity = stable_hash([info.name, info.weights_sha256, info.feature_dim, info.resize_mode, info.note])
        self._set_hashes: dict[tuple[Path, ...], str] = {}

    @property
    def extractor(self) -> ImageFeatureExtractor:
        from histo_assets.core.feature_networks import ImageFeatureExtractor

        if not isinstance(self._extractor, ImageFeatureExtractor):
            self._extractor = self._extractor()
        return self._extractor

    def path_for(self, paths: Sequence[Path]) -> Path:
        key = tuple(sorted(paths))
        if key not in self._set_hashes:
            self._set_hashes[key] = image_set_hash(key)
        return self.cache_dir / f"{self.identity[:16]}-{self._set_hashes[key][:32]}.npz"

    def features(self, paths: Sequence[Path], log: Log | None = None) -> FeatureSet:
        paths = sorted(paths)
        cached = self.path_for(paths)
        if cached.is_file():
            with np.load(cached) as data:
                return FeatureSet(data["features"], data["logits"] if "logits" in data else None)
        images = (Image.open(p).convert("RGB") for p in paths)
        features, logits = extract_features(self.extractor, images, self.batch_size, log=log)
        buffer = io.BytesIO()
        arrays = {"features": features} | ({"logits": logits} if logits is not None else {})
        np.savez(buffer, **arrays)
        atomic_write_bytes(cached, buffer.getvalue())
        return FeatureSet(features, logits)


def feature_cache(section: Mapping[str, Any], layout: Layout, params_dir: Path, master_seed: int) -> FeatureCache:
    """The cache of params' ``metrics`` extractor, one for every stage that featurises images.

    Sharing it is what lets the utility classifier reuse the features the
    metrics computed. A relative weights path is relative to the params file.
    """
    weights = section["inception_weights"]
    if weights is not None:
        weights = str((params_dir / weights).resolve())
    seed = derive_seed(master_seed, "feature_extractor")
    return FeatureCache(layout.cache / FEATURE_CACHE, lambda: build_extractor(weights, seed)[0],
                        extractor_info(weights, seed), int(section["batch_size"]))


def held_out_crops(layout: Layout, tissue_class: str) -> list[Path]:
    holdout = HELD_OUT_CROPS.read(layout.augmented_crops(tissue_class) / HOLDOUT, columns=["crop_file"])
    return [layout.square_crops(tissue_class) / IMAGES / name for name in holdout["crop_file"]]


def real_sets(layout: Layout, tissue_class: str) -> tuple[list[Path], list[Path]]:
    """(held-out crops: the reference set, training images: what the hypernetwork saw)."""
    return held_out_crops(layout, tissue_class), sorted((layout.augmented_crops(tissue_class) / IMAGES).glob("*.png"))


def generated_files(layout: Layout, tissue_class: str, step: int) -> list[Path]:
    return sorted((layout.synthetic_images(tissue_class, step) / IMAGES).glob("*.png"))


def _kid(reference: FeatureSet, generated: FeatureSet, settings: MetricSettings, flags: list[str]) -> dict:
    """KID at the configured subset size, or at the smaller set's size with a flag.

    torch-fidelity and torchmetrics refuse a subset larger than a set. Here the
    per-class held-out sets can be a handful of crops, and refusing would leave
    every row without the metric the best-checkpoint rule uses; the subset
    mean of unbiased MMD² is unbiased at any size >= 2, so KID stays
    meaningful. What clamping breaks is kid_std (every subset holds the whole
    reference set), hence the flag and the bootstrap interval next to it.
    """
    size = min(settings.kid_subset_size, len(reference), len(generated))
    if size < settings.kid_subset_size:
        flags.append(KID_SUBSET_ABOVE_N)
    if size < 2:
        return {"kid_mean": None, "kid_std": None, "kid_subset_size": None}
    mean, std = kernel_distance(reference.features, generated.features, size, settings.kid_subsets, settings.seed)
    return {"kid_mean": mean, "kid_std": std, "kid_subset_size": size}


def _intervals(row: dict, reference: FeatureSet, generated: FeatureSet, settings: MetricSettings) -> dict:
    """Bootstrap intervals of FID and KID, from one seed for every row.

    The same seed gives checkpoints with equal set sizes the same resampled
    reference rows, so their intervals differ by the generated sets only.
    """
    empty = {"fid_ci_low": None, "fid_ci_high": None, "kid_ci_low": None, "kid_ci_high": None}
    if min(len(reference), len(generated)) < 2:
        return empty
    fid, kid = bootstrap_fid_kid(
        reference.features, generated.features, settings.bootstrap_resamples, derive_seed(settings.seed, "bootstrap")
    )
    out = dict(empty)
    for name, replicates, floor in (("fid", fid, 0.0), ("kid", kid, None)):
        point = row["fid"] if name == "fid" else row["kid_mean"]
        interval = None if point is None else centred_interval(point, replicates, settings.confidence_level, floor)
        if interval is not None:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = interval
    return out


def _inception(generated: FeatureSet, info: FeatureExtractorInfo, settings: MetricSettings, flags: list[str]) -> dict:
    if generated.logits is None or not info.inception_score_available:
        return {"is_mean": None, "is_std": None, "is_images_per_split": None,
                "is_note": "not computed: needs Inception logits, and this extractor has none"}
    size = settings.is_images_per_split
    if len(generated) < size:
        flags.append(IS_SPLIT_ABOVE_N)
        size = len(generated)
    mean, std = inception_score(generated.logits, size, settings.seed)
    splits = len(generated) // size
    return {"is_mean": mean, "is_std": std, "is_images_per_split": size,
            "is_note": f"{splits} splits of {size} images ({len(generated) - splits * size} left out)"}


def _precision_recall(reference: FeatureSet, generated: FeatureSet, settings: MetricSettings, flags: list[str]) -> dict:
    """At the configured k or not at all: a k near N_ref makes every radius nearly the farthest neighbour."""
    row = {"precision": None, "recall": None, "pr_k": settings.pr_k}
    if settings.pr_k >= min(len(reference), len(generated)):
        flags.append(PR_K_ABOVE_N)
    else:
        row["precision"], row["recall"] = precision_recall(reference.features, generated.features, settings.pr_k)
    return row


def score_checkpoint(
    generated: FeatureSet,
    reference: FeatureSet,
    train: FeatureSet,
    info: FeatureExtractorInfo,
    settings: MetricSettings,
) -> dict:
    """One metric-table row: the generated set against held-out reals (and, for context, the training crops).

    Memorisation uses cosine similarity of features centred on the training
    mean: raw CNN features are all non-negative, so uncentred cosines of
    unrelated images are already high. A generated image counts as a near-copy
    when it is closer to a training image than the params threshold and than
    every held-out real crop is (those are by construction not copies), which
    calibrates the rule to the extractor in use.
    """
    flags: list[str] = []
    if len(reference) < settings.min_reference:
        flags.append(SMALL_REFERENCE)
    if min(len(reference), len(generated)) <= info.feature_dim:
        flags.append(FID_RANK_DEFICIENT)
    row: dict = {
        "n_generated": len(generated),
        "n_reference": len(reference),
        "n_train": len(train),
        "feature_dim": info.feature_dim,
        "fid": frechet_distance(reference.features, generated.features) if len(reference) >= 2 else None,
        "fid_vs_train": frechet_distance(train.features, generated.features) if len(train) >= 2 else None,
    }
    row.update(_kid(reference, generated, settings, flags))
    row.update(_intervals(row, reference, generated, settings))
    row.update(confidence_level=settings.confidence_level, bootstrap_resamples=settings.bootstrap_resamples)
    row.update(_inception(generated, info, settings, flags))
    row.update(_precision_recall(reference, generated, settings, flags))
    centre = train.features.mean(axis=0) if len(train) >= 2 else 0.0
    threshold = settings.memorisation_threshold
    row["reference_max_train_similarity"] = None
    if len(reference):
        held_out = memorisation(reference.features - centre, train.features - centre, threshold)
        row["reference_max_train_similarity"] = float(held_out.similarity.max())
        threshold = max(threshold, row["reference_max_train_similarity"])
    copies = memorisation(generated.features - centre, train.features - centre, threshold)
    row["memorisation_threshold"] = threshold
    row["memorisation_rate"] = copies.rate
    row["max_train_similarity"] = float(copies.similarity.max())
    row.update(
        flags=FLAG_SEPARATOR.join(flag for flag in FLAG_MEANINGS if flag in flags),
        extractor=info.name,
        comparable_with=info.comparable_with,
        preprocessing=info.preprocessing,
        extractor_note=info.note,
        libraries=library_versions(),
    )
    return row


def checkpoint_row(
    cache: FeatureCache, generated: Sequence[Path], reference: Sequence[Path], train: Sequence[Path],
    settings: MetricSettings, *, tissue_class: str, step: int, log: Log | None = None,
) -> dict:
    """One class's and checkpoint's row of the metric table, from the cached features of its image sets."""
    row = score_checkpoint(cache.features(generated, log=log), cache.features(reference, log=log),
                           cache.features(train, log=log), cache.info, settings)
    return {"tissue_class": tissue_class, "step": step} | row


def row_description(row: dict) -> str:
    """One metric row as the run's log reports it: the figures with their intervals, the extractor and the flags."""
    return (f"{row['tissue_class']} step {row['step']}: FID {row['fid']} [{row['fid_ci_low']}, {row['fid_ci_high']}], "
            f"KID {row['kid_mean']} [{row['kid_ci_low']}, {row['kid_ci_high']}] ({row['extractor']}; "
            f"flags: {row['flags'] or 'none'})")


def combined_rows(cache: FeatureCache, layout: Layout, classes: Sequence[str], steps: Sequence[int],
                  settings: MetricSettings) -> list[dict]:
    """Table 3.6 of the thesis: all classes pooled, per step (from cached features).

    The real sets are the same at every step, so they are pooled once: looking
    them up in the cache hashes every image.
    """
    real = [real_sets(layout, tissue_class) for tissue_class in classes]
    reference = reduce(FeatureSet.concat, [cache.features(files) for files, _ in real])
    train = reduce(FeatureSet.concat, [cache.features(files) for _, files in real])
    rows = []
    for step in steps:
        generated = reduce(FeatureSet.concat, [cache.features(generated_files(layout, c, step)) for c in classes])
        row = score_checkpoint(generated, reference, train, cache.info, settings)
        rows.append({"tissue_class": ALL_CLASSES, "step": step} | row)
    return rows


# ---- choosing among checkpoints -------------------------------------------------------------


def selection_metric(name: str) -> SelectionMetric:
    if name not in SELECTION_METRICS:
        raise ValueError(f"metrics.best_checkpoint_metric must be one of {sorted(SELECTION_METRICS)}, got {name!r}")
    return SELECTION_METRICS[name]


def _interval(row: pd.Series, metric: SelectionMetric) -> tuple[float, float] | None:
    if metric.interval is None:
        return None
    low, high = (row[c] for c in metric.interval)
    return None if pd.isna(low) or pd.isna(high) else (float(low), float(high))


def overlapping_steps(table: pd.DataFrame, metric_name: str) -> pd.Series:
    """Per row, the other steps of its class whose interval of the selection metric overlaps its own.

    Overlap means the two checkpoints cannot be told apart at this confidence
    level (it is conservative: non-overlap shows a difference, overlap does
    not prove equality). None where the row or the metric has no interval.
    """
    metric = selection_metric(metric_name)
    out = pd.Series([None] * len(table), index=table.index, dtype=object)
    for _, group in table.groupby("tissue_class"):
        intervals = {index: _interval(row, metric) for index, row in group.iterrows()}
        for index, own in intervals.items():
            if own is None:
                continue
            steps = sorted(
                int(group.at[other, "step"]) for other, theirs in intervals.items()
                if other != index and theirs is not None and intervals_overlap(own, theirs)
            )
            out[index] = FLAG_SEPARATOR.join(map(str, steps))
    return out


@dataclass(frozen=True)
class Choice:
    """A class's chosen checkpoint and the ones its interval cannot tell apart from the lowest/highest value."""

    step: int
    best_value_step: int
    indistinguishable: list[int]
    has_intervals: bool

    @property
    def decisive(self) -> bool | None:
        """Whether the best value's interval overlaps no other checkpoint's; None without intervals."""
        return None if not self.has_intervals else self.indistinguishable == [self.best_value_step]


def best_checkpoints(table: pd.DataFrame, metric_name: str, tie: str) -> dict[str, Choice]:
    """Per class, the checkpoint with the best value of the selection metric, with its intervals considered.

    The best value (ties on the value: the earliest step) defines the set of
    checkpoints whose interval overlaps its own, which the summary reports as
    indistinguishable. ``tie`` decides within that set: ``lowest`` keeps the
    best value, ``earliest`` takes the earliest step in it (the cheapest
    checkpoint to train, and the least exposed to memorisation), on the view
    that a difference the intervals cannot confirm is no reason to train longer.
    """
    if tie not in TIE_RULES:
        raise ValueError(f"metrics.best_checkpoint_tie must be one of {list(TIE_RULES)}, got {tie!r}")
    metric = selection_metric(metric_name)
    choices = {}
    for tissue_class, group in table.dropna(subset=[metric.column]).groupby("tissue_class"):
        ordered = group.sort_values([metric.column, "step"], ascending=[metric.lower_is_better, True])
        best = ordered.iloc[0]
        own = _interval(best, metric)
        tied = [int(best["step"])]
        if own is not None:
            tied = sorted(int(row["step"]) for _, row in group.iterrows()
                          if (theirs := _interval(row, metric)) is not None and intervals_overlap(own, theirs))
        step = min(tied) if tie == "earliest" else int(best["step"])
        choices[str(tissue_class)] = Choice(step, int(best["step"]), tied, own is not None)
    return choices


def _json_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    return value.item() if isinstance(value, np.generic) else value


def dvc_metrics(table: pd.DataFrame, choices: Mapping[str, Choice], metric_name: str, tie: str,
                verdicts: Mapping[str, dict] | None = None) -> dict:
    """metrics.json for `dvc metrics show`: each class's chosen checkpoint, its scores, intervals, flags and labels."""
    classes = {}
    for tissue_class, choice in choices.items():
        row = table[(table["tissue_class"] == tissue_class) & (table["step"] == choice.step)].iloc[0]
        values = {column: _json_value(row[column]) for column in TABLE_COLUMNS[2:] if column in row.index}
        classes[tissue_class] = {
            "best_step": choice.step,
            "indistinguishable_steps": FLAG_SEPARATOR.join(map(str, choice.indistinguishable)),
            "decisive": choice.decisive,
        } | {k: v for k, v in values.items() if v is not None}
        if verdicts and tissue_class in verdicts:
            verdict = verdicts[tissue_class]
            classes[tissue_class] |= {"against_base_model": verdict["verdict"],
                                      f"base_model_{metric_name}": verdict[f"base_model_{metric_name}"]}
    first = table.iloc[0]
    return {
        "best_by": metric_name,
        "tie_rule": tie,
        "extractor": str(first["extractor"]),
        "comparable_with": str(first["comparable_with"]),
        "preprocessing": str(first["preprocessing"]),
        "confidence_level": _json_value(first["confidence_level"]),
        "bootstrap_resamples": _json_value(first["bootstrap_resamples"]),
        "classes": classes,
    }


def metric_series(table: pd.DataFrame, names: Sequence[str]) -> dict[str, dict[str, list[tuple]]]:
    """(step, value, interval low, interval high) per metric and class, for the curves; NaN where no interval."""
    series = {}
    for name in names:
        if not table[name].notna().any():
            continue
        column = SELECTION_METRICS[name].column if name in SELECTION_METRICS else name
        interval = SELECTION_METRICS[name].interval if name in SELECTION_METRICS else None
        series[name] = {}
        for tissue_class, group in table.groupby("tissue_class", sort=False):
            points = []
            for row in group.itertuples():
                value = getattr(row, column)
                if pd.isna(value):
                    continue
                low, high = (getattr(row, c) for c in interval) if interval else (None, None)
                points.append((int(row.step), float(value), *(float("nan") if pd.isna(v) else float(v) for v in (low, high))))
            series[name][str(tissue_class)] = points
    return series


def metrics_notes(table: pd.DataFrame, choices: Mapping[str, Choice], metric_name: str, tie: str) -> str:
    """How to read the metric table, for the dataset card: labels, intervals, the flags present, ties."""
    first = table.iloc[0]
    level = float(first["confidence_level"])
    lines = [
        f"Features: `{first['extractor']}` ({int(first['feature_dim'])}-d); preprocessing: {first['preprocessing']}. "
        f"Comparable with: **{first['comparable_with']}**"
        + (" (other FID implementations preprocess differently)." if first["comparable_with"] != "none"
           else " (values support comparisons within this table only)."),
        "",
        f"`fid_ci_*` and `kid_ci_*` are {level:.0%} bootstrap intervals ({int(first['bootstrap_resamples'])} "
        "seeded resamples of both the generated and the reference set), centred on the point estimate. "
        "`overlapping_steps` lists the checkpoints of the same class whose interval of the selection metric "
        "overlaps the row's: those cannot be told apart.",
    ]
    present = {flag for value in table["flags"].dropna() for flag in str(value).split(FLAG_SEPARATOR) if flag}
    if present:
        lines += ["", "Flags in `flags`:"]
        lines += [f"- `{flag}`: {meaning}" for flag, meaning in FLAG_MEANINGS.items() if flag in present]
    lines += ["", f"Checkpoint choice: best `{metric_name}`, tie rule `{tie}`."]
    for tissue_class, choice in choices.items():
        if choice.decisive is False:
            others = [s for s in choice.indistinguishable if s != choice.step]
            lines.append(f"- {tissue_class}: step {choice.step} cannot be told apart from step(s) "
                         f"{', '.join(map(str, others))} within the intervals.")
    return "\n".join(lines)


def baseline_verdicts(table: pd.DataFrame, choices: Mapping[str, Choice], metric_name: str) -> dict[str, dict]:
    """Per class, whether the chosen checkpoint beats step 0, the base model with the same prompt and no hypernetwork.

    The question a lab asks before spending a GPU on hypernetworks. ``better``
    or ``worse`` only when the two intervals do not overlap; otherwise the
    verdict is ``indistinguishable``, and without intervals ``unknown``.
    """
    metric = selection_metric(metric_name)
    verdicts = {}
    for tissue_class, choice in choices.items():
        rows = table[table["tissue_class"] == tissue_class].set_index("step")
        if BASELINE_STEP not in rows.index or pd.isna(rows.at[BASELINE_STEP, metric.column]):
            continue
        base, chosen = rows.loc[BASELINE_STEP], rows.loc[choice.step]
        own, theirs = _interval(chosen, metric), _interval(base, metric)
        if own is None or theirs is None:
            verdict = "unknown"
        elif intervals_overlap(own, theirs):
            verdict = "indistinguishable"
        else:
            improved = chosen[metric.column] < base[metric.column]
            verdict = "better" if improved == metric.lower_is_better else "worse"
        verdicts[tissue_class] = {"step": choice.step, metric_name: _json_value(chosen[metric.column]),
                                  f"base_model_{metric_name}": _json_value(base[metric.column]), "verdict": verdict}
    return verdicts


def baseline_notes(verdicts: Mapping[str, dict], metric_name: str) -> str:
    lines = [f"Against the base model (step {BASELINE_STEP}: same prompt, no hypernetwork), by `{metric_name}`:"]
    lines += [f"- {tissue_class}: step {v['step']} {v[metric_name]:.4g} vs base model {v[f'base_model_{metric_name}']:.4g}: "
              + {"better": "the hypernetwork is better", "worse": "the hypernetwork is worse",
                 "indistinguishable": "the intervals overlap: no difference shown",
                 "unknown": "no intervals to compare"}[v["verdict"]]
              for tissue_class, v in verdicts.items()]
    return "\n".join(lines)


# ---- the summary across classes and checkpoints ---------------------------------------------


class UnscoredCheckpointError(HistoAssetsError):
    """A summary across checkpoints was asked for before every checkpoint was scored."""


def scored_checkpoints(layout: Layout, classes: Sequence[str],
                       steps: Sequence[int]) -> dict[tuple[str, int], CheckpointMetricsSummary]:
    """Every class's and step's checkpoint_metrics summary; refused, naming them, while any is missing."""
    found = {(c, step): read_summary(layout.checkpoint_metrics(c, step), CheckpointMetricsSummary)
             for c in classes for step in steps}
    missing = [f"{c} step {step}" for (c, step), summary in found.items() if summary is None]
    if missing:
        raise UnscoredCheckpointError(f"checkpoint_metrics missing for {', '.join(missing)}; materialise it first")
    return found


def summarise_rows(cache: FeatureCache, layout: Layout, rows: Sequence[dict], classes: Sequence[str],
                   steps: Sequence[int], settings: MetricSettings, metric_name: str, tie: str) -> str:
    """The checkpoints' rows with every class pooled per step, written as the metrics_summary folder; the rows' hash."""
    rows = [*rows, *combined_rows(cache, layout, classes, steps, settings)]
    write_metrics_summary(layout, metrics_table(rows, metric_name), classes, steps, metric_name, tie)
    return stable_hash(rows)


def metrics_table(rows: Sequence[dict], metric_name: str) -> pd.DataFrame:
    """The rows as one table, each with the steps its interval of the selection metric cannot tell apart."""
    table = pd.DataFrame(rows)
    table["overlapping_steps"] = overlapping_steps(table, metric_name)
    return table


def grid_file(tissue_class: str) -> str:
    return f"grid_{tissue_class}.png"


def comparison_grid(layout: Layout, tissue_class: str, steps: Sequence[int]) -> Image.Image:
    """Originals above generated images at every step, like the thesis's Figure 3.5."""
    originals = sorted((layout.augmented_crops(tissue_class) / IMAGES).glob("orig-*.png"))[:GRID_IMAGES]
    rows, labels = [originals + [None] * (GRID_IMAGES - len(originals))], ["original"]
    for step in steps:
        files = generated_files(layout, tissue_class, step)[:GRID_IMAGES]
        rows.append(files + [None] * (GRID_IMAGES - len(files)))
        labels.append("base model" if step == BASELINE_STEP else f"step {step}")
    blank = Image.new("RGB", (8, 8), (255, 255, 255))
    cells = [Image.open(f) if f is not None else blank for row in rows for f in row]
    return contact_sheet(cells, columns=GRID_IMAGES, thumb=96, row_labels=labels)


def write_metrics_summary(layout: Layout, table: pd.DataFrame, classes: Sequence[str], steps: Sequence[int],
                          metric_name: str, tie: str) -> dict[str, Any]:
    """The metrics_summary folder, and the fields of its details/summary.json.

    DVC reads the top level (metrics.json, metrics.csv and the per-class plots
    CSVs); people read details/ (the full table, curves and grids). Files are
    replaced one by one; the asset reuses the whole folder when no
    checkpoint's scores changed.
    """
    out, details = layout.metrics_summary, layout.metrics_details
    # Step 0 is scored, never chosen: its images carry no class-specific training.
    choices = best_checkpoints(table[(table["tissue_class"] != ALL_CLASSES) & (table["step"] != BASELINE_STEP)],
                               metric_name, tie)
    verdicts = baseline_verdicts(table, choices, metric_name)
    metric_curves(
        metric_series(table, ("fid", "kid_mean", "is_mean")), details / CURVES_FILE,
        title=f"metrics vs training step ({table['extractor'].iloc[0]}, comparable with {table['comparable_with'].iloc[0]})",
    )
    for tissue_class in classes:
        atomic_save_png(details / grid_file(tissue_class), comparison_grid(layout, tissue_class, steps))
    METRICS_TABLE.write(details / METRICS_TABLE_FILE, table)
    atomic_write_text(out / "metrics.csv", table[TABLE_COLUMNS].to_csv(index=False))
    for tissue_class, group in table.groupby("tissue_class"):
        atomic_write_text(out / "plots" / f"{tissue_class}.csv", group[TABLE_COLUMNS[1:]].sort_values("step").to_csv(index=False))
    atomic_write_json(out / "metrics.json", dvc_metrics(table, choices, metric_name, tie, verdicts))
    summary = {
        "best": {c: choice.step for c, choice in choices.items()}, "best_by": metric_name, "tie_rule": tie,
        "indistinguishable": {c: choice.indistinguishable for c, choice in choices.items()}, "steps": steps,
        "extractor_note": table["extractor_note"].iloc[0],
        "metrics_notes": metrics_notes(table, choices, metric_name, tie) + "\n\n" + baseline_notes(verdicts, metric_name),
        "against_base_model": verdicts,
    }
    atomic_write_json(details / SUMMARY, check_summary(MetricsDetails, summary, details / SUMMARY))
    return summary
