"""Scoring one checkpoint's synthetic images against real crops.

Real-set features are cached under the content hash of the images and the
extractor's identity, so evaluating K checkpoints costs K generated-set
feature passes plus one pass per real set, not K x (generated + real).
Every row carries the extractor's identity and note, so a fallback-feature FID
is never mistaken for a published-scale Inception FID.
"""

from __future__ import annotations

import importlib.metadata
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histo_assets.core.features import FeatureExtractorInfo, ImageFeatureExtractor, extract_features
from histo_assets.core.io import atomic_write_bytes, sha256_file, stable_hash
from histo_assets.core.metrics import frechet_distance, inception_score, kernel_distance, memorisation, precision_recall

LIBRARIES = ("torch", "torchmetrics", "diffusers", "numpy", "scipy")


@dataclass(frozen=True)
class MetricSettings:
    kid_subset_size: int
    kid_subsets: int
    pr_k: int
    memorisation_threshold: float
    is_splits: int
    batch_size: int
    seed: int


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
    training sets are looked up for every checkpoint.
    """

    def __init__(self, cache_dir: Path, extractor: ImageFeatureExtractor, info: FeatureExtractorInfo, batch_size: int):
        self.cache_dir = cache_dir
        self.extractor = extractor
        self.info = info
        self.batch_size = batch_size
        self.identity = stable_hash([info.name, info.weights_sha256, info.feature_dim, info.resize_mode, info.note])
        self._set_hashes: dict[tuple[Path, ...], str] = {}

    def path_for(self, paths: Sequence[Path]) -> Path:
        key = tuple(sorted(paths))
        if key not in self._set_hashes:
            self._set_hashes[key] = image_set_hash(key)
        return self.cache_dir / f"{self.identity[:16]}-{self._set_hashes[key][:32]}.npz"

    def features(self, paths: Sequence[Path], log: Callable[[str], None] | None = None) -> FeatureSet:
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


def _kid(reference: FeatureSet, generated: FeatureSet, settings: MetricSettings) -> tuple[float | None, float | None, int]:
    """KID with the subset size clamped to the smaller set, as small per-class sets require; the size used is recorded."""
    size = min(settings.kid_subset_size, len(reference), len(generated))
    if size < 2:
        return None, None, size
    mean, std = kernel_distance(reference.features, generated.features, size, settings.kid_subsets, settings.seed)
    return mean, std, size


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
    row: dict = {
        "n_generated": len(generated),
        "n_reference": len(reference),
        "n_train": len(train),
        "fid": frechet_distance(reference.features, generated.features) if len(reference) >= 2 else None,
        "fid_vs_train": frechet_distance(train.features, generated.features) if len(train) >= 2 else None,
    }
    row["kid_mean"], row["kid_std"], row["kid_subset_size"] = _kid(reference, generated, settings)
    if generated.logits is not None and info.inception_score_available:
        splits = min(settings.is_splits, len(generated))
        row["is_mean"], row["is_std"] = inception_score(generated.logits, splits, settings.seed)
        row["is_note"] = f"{splits} splits"
    else:
        row["is_mean"], row["is_std"] = None, None
        row["is_note"] = "not computed: needs Inception logits, and this extractor has none"
    k = min(settings.pr_k, len(reference) - 1, len(generated) - 1)
    if k >= 1:
        row["precision"], row["recall"] = precision_recall(reference.features, generated.features, k)
    else:
        row["precision"], row["recall"] = None, None
    row["pr_k"] = k
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
        extractor=info.name,
        extractor_dim=info.feature_dim,
        resize_mode=info.resize_mode,
        comparable_with_published=info.comparable_with_published,
        extractor_note=info.note,
        libraries=library_versions(),
    )
    return row
