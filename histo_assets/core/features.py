"""Image feature extractors for the metrics: the FID Inception-v3, or a seeded random CNN fallback.

Both take uint8 ``[N, 3, H, W]`` tensors and return features from ``forward``,
the contract of torchmetrics' custom ``feature=`` modules, so either can also be
plugged into torchmetrics' metric classes.

The FID Inception is written in plain torch because torchvision and
torch-fidelity cannot be installed next to torchmetrics in this environment
(environment.md §2). Its weights are never downloaded: they are project data,
given as a path or through ``HISTO_ASSETS_INCEPTION_WEIGHTS``. Without them the
pipeline still runs on a fixed-seed random CNN, whose numbers only support
relative comparisons inside one run and are labelled as such.

The networks are in core/feature_networks.py, imported when one is built:
what identifies an extractor needs no torch, so checking whether a metric
stage is unchanged stays cheap.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from histo_assets.core.io import Log, sha256_file

if TYPE_CHECKING:
    from histo_assets.core.feature_networks import ImageFeatureExtractor

WEIGHTS_ENV = "HISTO_ASSETS_INCEPTION_WEIGHTS"
PUBLISHED_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# SHA-256 of the file pytorch-fid and torch-fidelity publish (95,628,359 bytes);
# its first 8 hex digits are the "6726825d" in the file name (torch.hub convention).
PUBLISHED_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

INCEPTION_NAME = "inception-v3-fid"
FALLBACK_NAME = "random-conv-fallback"
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURES = 2048
INCEPTION_CLASSES = 1008
# pytorch-fid's resize: torch bilinear, align_corners=False, no antialiasing.
# torchmetrics >= 1.8 antialiases by default and torch-fidelity uses a TF1-exact
# bilinear, so for inputs other than 299x299 the three give different FIDs.
INCEPTION_RESIZE_MODE = "bilinear"
INCEPTION_ANTIALIAS = False

FALLBACK_INPUT_SIZE = 128
FALLBACK_FEATURES = 256
FALLBACK_RESIZE_MODE = "bilinear"
FALLBACK_ANTIALIAS = True

# The one implementation whose numbers ours may be compared with. The same Inception
# weights in torch-fidelity, TensorFlow FID, torchmetrics >= 1.8 or clean-fid go
# through other resizes and scalings, so their FIDs differ from ours on inputs that
# are not 299x299 (reference doc §4, §5b).
COMPARABLE_PYTORCH_FID = "pytorch-fid"
COMPARABLE_NONE = "none"

def preprocessing_label(size: int, resize_mode: str, antialias: bool) -> str:
    """What happens to a uint8 image before the network, in words: FIDs differ when any step differs."""
    smoothing = "with" if antialias else "no"
    return f"uint8 RGB /255, {resize_mode} resize to {size}x{size} (align_corners=False, {smoothing} antialias), 2x-1"


def existing_weights(path: str | os.PathLike) -> Path:
    """The weights file, or an error saying that nothing is downloaded and what to do instead."""
    weights = Path(path)
    if not weights.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {weights}. Nothing is downloaded: place "
            f"{PUBLISHED_WEIGHTS_FILENAME} there (set metrics.inception_weights or {WEIGHTS_ENV}), "
            "or leave both unset to use the random-conv fallback."
        )
    return weights


@dataclass(frozen=True)
class FeatureExtractorInfo:
    """What produced a set of features; recorded next to every metric so numbers are never mis-compared."""

    name: str
    feature_dim: int
    input_size: int
    resize_mode: str
    antialias: bool
    weights_path: str | None
    weights_sha256: str | None
    # COMPARABLE_PYTORCH_FID only for the published weights; never a claim about other FID libraries.
    comparable_with: str
    preprocessing: str
    inception_score_available: bool
    note: str


def build_extractor(weights_path: str | None, seed: int) -> tuple[ImageFeatureExtractor, FeatureExtractorInfo]:
    """The FID Inception if weights are given (argument, else ``HISTO_ASSETS_INCEPTION_WEIGHTS``), else the fallback.

    A path that is given but missing raises rather than falling back, so a
    typo cannot quietly turn a real FID run into a random-feature one.
    ``seed`` only seeds the fallback network.
    """
    from histo_assets.core.feature_networks import InceptionV3FID, RandomConvFeatures

    info = extractor_info(weights_path, seed)
    if info.weights_path is None:
        return RandomConvFeatures(seed), info
    return InceptionV3FID.from_weights(info.weights_path), info


def extractor_info(weights_path: str | None, seed: int) -> FeatureExtractorInfo:
    """What identifies the extractor :func:`build_extractor` loads, without loading it.

    Fingerprints and feature-cache names need only this, so checking whether
    a stage is unchanged never loads the Inception network.
    """
    path = weights_path or os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        return FeatureExtractorInfo(
            name=FALLBACK_NAME,
            feature_dim=FALLBACK_FEATURES,
            input_size=FALLBACK_INPUT_SIZE,
            resize_mode=FALLBACK_RESIZE_MODE,
            antialias=FALLBACK_ANTIALIAS,
            weights_path=None,
            weights_sha256=None,
            comparable_with=COMPARABLE_NONE,
            preprocessing=preprocessing_label(FALLBACK_INPUT_SIZE, FALLBACK_RESIZE_MODE, FALLBACK_ANTIALIAS),
            inception_score_available=False,
            note=(
                f"No Inception weights given: features come from a random CNN (seed {seed}). FID/KID values "
                "support comparisons within this run only and are not comparable with published FID. "
                "Inception Score is not available: it needs the Inception classifier's logits."
            ),
        )
    weights = existing_weights(path)
    digest = _weights_sha256(str(weights), *_stat_key(weights))
    published = digest == PUBLISHED_WEIGHTS_SHA256
    note = (
        "Published FID Inception weights with pytorch-fid's preprocessing (bilinear resize without antialias, "
        "2x/255-1): values are comparable with pytorch-fid only, not with TensorFlow FID, torch-fidelity, "
        "torchmetrics >= 1.8 or clean-fid, which resize or scale differently."
        if published
        else f"Inception weights differ from the published file (sha256 {PUBLISHED_WEIGHTS_SHA256[:12]}...): "
        "values are not comparable with published FID/IS."
    )
    return FeatureExtractorInfo(
        name=INCEPTION_NAME,
        feature_dim=INCEPTION_FEATURES,
        input_size=INCEPTION_INPUT_SIZE,
        resize_mode=INCEPTION_RESIZE_MODE,
        antialias=INCEPTION_ANTIALIAS,
        weights_path=str(path),
        weights_sha256=digest,
        comparable_with=COMPARABLE_PYTORCH_FID if published else COMPARABLE_NONE,
        preprocessing=preprocessing_label(INCEPTION_INPUT_SIZE, INCEPTION_RESIZE_MODE, INCEPTION_ANTIALIAS),
        inception_score_available=True,
        note=note + " Inception Score is available from the 1008-class logits.",
    )


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _weights_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """The weights' hash, once per process for an unchanged file: every partition's fingerprint quotes it."""
    return sha256_file(path)


def _as_uint8_hwc(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be PIL images or uint8 HxWx3 arrays, got {array.dtype} {array.shape}")
    return array


def extract_features(
    module: ImageFeatureExtractor,
    images: Iterable[Image.Image | np.ndarray],
    batch_size: int,
    log: Log | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N x D float32) and logits (None without a class head) for a stream of images.

    Images are read lazily, so a generator over files never holds the whole
    set in memory. A batch is cut early when the image size changes: every
    image is processed on its own anyway, so results do not depend on batching.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(module.parameters()).device
    features: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        tensor = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            batch_features, batch_logits = module.features_and_logits(tensor)
        features.append(batch_features.float().cpu().numpy())
        if batch_logits is not None:
            logits.append(batch_logits.float().cpu().numpy())
        batch.clear()

    started = time.perf_counter()
    total = len(images) if hasattr(images, "__len__") else None
    for image in tqdm(images, total=total, desc="features", unit="img"):
        array = _as_uint8_hwc(image)
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            flush()
        batch.append(array)
    if batch:
        flush()
    if not features:
        raise ValueError("no images to extract features from")
    stacked = np.concatenate(features)
    if log is not None:
        elapsed = time.perf_counter() - started
        log(f"extracted {stacked.shape[1]}-d features of {len(stacked)} images in {elapsed:.1f} s")
    return stacked, (np.concatenate(logits) if module.has_logits else None)
