"""Image-quality metrics computed from feature arrays: FID, KID, IS, precision/recall, memorisation.

Every function takes features (or logits) that were already extracted, so the
same code scores Inception features, the random-conv fallback or any domain
encoder, and can be checked against closed-form answers without any network
weights. Maths runs in float64: FID on ~150-image sets subtracts traces of
similar size, and float32 loses most of the significant digits there.

The Fréchet square-root term and the polynomial MMD come from torchmetrics
(pinned in pyproject.toml) so the numbers match the library the field uses;
both are importable without torch-fidelity. Everything random (KID subsets,
IS splits) draws from ``numpy.random.default_rng(seed)``, never global state,
unlike torchmetrics' own metric classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import entr, softmax
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

KID_KERNEL_DEGREE = 3
KID_KERNEL_COEF = 1.0
# Rows of the query set compared at once in the k-NN metrics; bounds memory to
# about _ROW_CHUNK x N distances whatever the set sizes.
_ROW_CHUNK = 1024

ArrayLike = np.ndarray | torch.Tensor


def _as_matrix(values: ArrayLike, name: str, min_rows: int = 1) -> np.ndarray:
    """A finite float64 N x D copy; rejects shapes that would give silently wrong metrics."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples x dimensions), got shape {matrix.shape}")
    if matrix.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {matrix.shape[0]}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return matrix


def _same_dimension(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names} have different feature dimensions: {a.shape[1]} vs {b.shape[1]}")


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N-1) covariance, the statistics pytorch-fid and torchmetrics use."""
    matrix = _as_matrix(features, "features", min_rows=2)
    return matrix.mean(axis=0), np.atleast_2d(np.cov(matrix, rowvar=False))


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    """Fréchet distance between two Gaussians, ||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    Exposed separately so published reference statistics (e.g. an ``.npz`` of
    mu/sigma) can be scored without their images, and so the analytic
    identities can be tested exactly.
    """
    mean1, mean2 = (torch.as_tensor(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mean1.ndim != 1 or mean1.shape != mean2.shape:
        raise ValueError(f"means must be vectors of equal length, got {tuple(mean1.shape)}, {tuple(mean2.shape)}")
    dim = mean1.shape[0]
    if cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"covariances must be {dim}x{dim}, got {tuple(cov1.shape)}, {tuple(cov2.shape)}")
    return float(_compute_fid(mean1, cov1, mean2, cov2))


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """FID when the features are Inception pool features; biased upward at small N, so keep N fixed."""
    a = _as_matrix(features_a, "features_a", min_rows=2)
    b = _as_matrix(features_b, "features_b", min_rows=2)
    _same_dimension(a, b, "features_a and features_b")
    return frechet_distance_from_stats(*feature_statistics(a), *feature_statistics(b))


def draw_kid_subsets(
    n_a: int, n_b: int, subset_size: int, subsets: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each KID subset, (subsets x subset_size) per set, drawn without replacement.

    Public so a caller can record or re-check exactly which samples each
    subset used. Raises instead of clamping an oversized subset: torchmetrics
    raises too, and a silently smaller subset would make the recorded
    ``subset_size`` wrong.
    """
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be at least 2 for the unbiased MMD estimate, got {subset_size}")
    if subset_size > min(n_a, n_b):
        raise ValueError(
            f"KID subset_size {subset_size} exceeds the smaller set ({n_a} vs {n_b} samples); "
            f"use subset_size <= {min(n_a, n_b)} (the unbiased estimate's expectation does not depend on it)"
        )
    rng = np.random.default_rng(seed)
    rows_a, rows_b = [], []
    for _ in range(subsets):
        rows_a.append(rng.choice(n_a, size=subset_size, replace=False))
        rows_b.append(rng.choice(n_b, size=subset_size, replace=False))
    return np.stack(rows_a), np.stack(rows_b)


def kernel_distance(
    features_a: ArrayLike, features_b: ArrayLike, subset_size: int, subsets: int, seed: int
) -> tuple[float, float]:
    """KID: mean and population std (ddof 0, as torch-fidelity and torchmetrics) of unbiased MMD².

    The kernel is the cubic polynomial (x.y / D + 1)^3 of Bińkowski et al.
    2018. KID is unbiased, so unlike FID it is comparable across the small,
    unequal per-class sample sizes of this project; it can be slightly negative.
    """
    a = _as_matrix(features_a, "features_a")
    b = _as_matrix(features_b, "features_b")
    _same_dimension(a, b, "features_a and features_b")
    rows_a, rows_b = draw_kid_subsets(len(a), len(b), subset_size, subsets, seed)
    tensor_a, tensor_b = torch.from_numpy(a), torch.from_numpy(b)
    gamma = 1.0 / a.shape[1]
    values = np.array(
        [
            float(
                poly_mmd(
                    tensor_a[torch.from_numpy(ia)],
                    tensor_b[torch.from_numpy(ib)],
                    degree=KID_KERNEL_DEGREE,
                    gamma=gamma,
                    coef=KID_KERNEL_COEF,
                )
            )
            for ia, ib in zip(rows_a, rows_b)
        ]
    )
    return float(values.mean()), float(values.std())


def inception_score(logits: ArrayLike, splits: int, seed: int) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))): mean and population std over ``splits`` shuffled splits.

    Takes logits rather than probabilities so the softmax is done once, here,
    in float64. With the FID Inception these must be its bias-free 1008-class
    logits, which is what the original IS code, torch-fidelity and
    torchmetrics feed the softmax. The per-split KL is computed as
    H(p(y)) - mean_x H(p(y|x)), which stays finite when a class has zero
    probability. Std uses ddof 0 like torch-fidelity (torchmetrics uses ddof 1).
    """
    matrix = _as_matrix(logits, "logits")
    if not 1 <= splits <= len(matrix):
        raise ValueError(f"splits must be between 1 and the number of samples ({len(matrix)}), got {splits}")
    probabilities = softmax(matrix, axis=1)[np.random.default_rng(seed).permutation(len(matrix))]
    scores = np.array(
        [
            np.exp(entr(part.mean(axis=0)).sum() - entr(part).sum(axis=1).mean())
            for part in np.array_split(probabilities, splits)
        ]
    )
    return float(scores.mean()), float(scores.std())


def _distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances; the matmul shortcut would turn identical points into tiny non-zeros."""
    return torch.cdist(
        torch.from_numpy(queries), torch.from_numpy(references), compute_mode="donot_use_mm_for_euclid_dist"
    ).numpy()


def _kth_neighbour_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point (column 0 of a sorted row is itself)."""
    radii = [
        np.partition(_distances(points[start : start + _ROW_CHUNK], points), k, axis=1)[:, k]
        for start in range(0, len(points), _ROW_CHUNK)
    ]
    return np.concatenate(radii)


def _fraction_inside_manifold(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Share of queries inside at least one hypersphere (centre, radius): the k-NN manifold estimate."""
    inside = [
        (_distances(queries[start : start + _ROW_CHUNK], centres) <= radii[None, :]).any(axis=1)
        for start in range(0, len(queries), _ROW_CHUNK)
    ]
    return float(np.concatenate(inside).mean())


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds in feature space.

    Precision: share of generated samples inside the real manifold (fidelity).
    Recall: share of real samples inside the generated manifold (coverage).
    They separate the two failure modes that FID mixes into one number, e.g.
    a model copying a few training crops has high precision but low recall.
    """
    real_matrix = _as_matrix(real, "real")
    fake_matrix = _as_matrix(fake, "fake")
    _same_dimension(real_matrix, fake_matrix, "real and fake")
    smaller = min(len(real_matrix), len(fake_matrix))
    if not 1 <= k < smaller:
        raise ValueError(f"k must be between 1 and {smaller - 1} (one less than the smaller set), got {k}")
    precision = _fraction_inside_manifold(fake_matrix, real_matrix, _kth_neighbour_radii(real_matrix, k))
    recall = _fraction_inside_manifold(real_matrix, fake_matrix, _kth_neighbour_radii(fake_matrix, k))
    return precision, recall


@dataclass(frozen=True)
class MemorisationResult:
    """Per generated image: its most similar training image and their cosine similarity."""

    nearest_index: np.ndarray
    similarity: np.ndarray
    threshold: float

    @property
    def flagged(self) -> np.ndarray:
        """Generated images at or above the threshold: likely near-copies of a training crop."""
        return self.similarity >= self.threshold

    @property
    def rate(self) -> float:
        return float(self.flagged.mean())


def _unit_rows(matrix: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has all-zero feature rows; cosine similarity is undefined for them")
    return matrix / norms


def memorisation(fake: ArrayLike, train: ArrayLike, threshold: float) -> MemorisationResult:
    """Nearest training image by cosine similarity, to catch generations that copy the training set.

    FID against training crops rewards copying, so a low FID is only
    meaningful together with a low copy rate. Cosine similarity on raw features
    is the distance torchmetrics' MiFID uses. Inception pool features are
    non-negative, so even unrelated images score well above 0: calibrate the
    threshold against a real-vs-real baseline (held-out crops vs training crops).
    """
    fake_units = _unit_rows(_as_matrix(fake, "fake"), "fake")
    train_units = _unit_rows(_as_matrix(train, "train"), "train")
    _same_dimension(fake_units, train_units, "fake and train")
    nearest, similarity = [], []
    for start in range(0, len(fake_units), _ROW_CHUNK):
        scores = fake_units[start : start + _ROW_CHUNK] @ train_units.T
        best = scores.argmax(axis=1)
        nearest.append(best)
        similarity.append(scores[np.arange(len(best)), best])
    return MemorisationResult(
        nearest_index=np.concatenate(nearest).astype(np.int64),
        similarity=np.concatenate(similarity),
        threshold=float(threshold),
    )
