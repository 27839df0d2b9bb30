"""Image-quality metrics computed from feature arrays: FID, KID, IS, precision/recall, memorisation.

Every function takes features (or logits) that were already extracted, so the
same code scores Inception features, the random-conv fallback or any domain
encoder, and can be checked against closed-form answers without any network
weights. Maths runs in float64: FID on ~150-image sets subtracts traces of
similar size, and float32 loses most of the significant digits there.

The Fréchet square-root term and the polynomial MMD come from torchmetrics
(pinned in pyproject.toml) so the numbers match the library the field uses;
both are importable without torch-fidelity. They are imported where used:
importing torchmetrics takes about a second (its text metrics come with it),
which every CLI start would pay only to check fingerprints; torch and scipy likewise. Everything random (KID subsets,
IS splits, bootstrap resamples) draws from ``numpy.random.default_rng(seed)``,
never global state, unlike torchmetrics' own metric classes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

KID_KERNEL_DEGREE = 3
KID_KERNEL_COEF = 1.0
# Rows of the query set compared at once in the k-NN metrics; bounds memory to
# about _ROW_CHUNK x N distances whatever the set sizes.
_ROW_CHUNK = 1024

ArrayLike = "np.ndarray | torch.Tensor"  # a name for annotations: torch is imported where used


def _as_matrix(values: ArrayLike, name: str, min_rows: int = 1) -> np.ndarray:
    """A finite float64 N x D copy; rejects shapes that would give silently wrong metrics."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(values, torch.Tensor):
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
    import torch

    mean1, mean2 = (torch.as_tensor(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mean1.ndim != 1 or mean1.shape != mean2.shape:
        raise ValueError(f"means must be vectors of equal length, got {tuple(mean1.shape)}, {tuple(mean2.shape)}")
    dim = mean1.shape[0]
    if cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"covariances must be {dim}x{dim}, got {tuple(cov1.shape)}, {tuple(cov2.shape)}")
    from torchmetrics.image.fid import _compute_fid  # see the module docstring: imported where used

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
    import torch
    from torchmetrics.image.kid import poly_mmd  # see the module docstring: imported where used

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


def inception_score(logits: ArrayLike, images_per_split: int, seed: int) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))): mean and population std over splits of ``images_per_split`` images.

    The split size is fixed, not the number of splits, because IS grows with
    the images in a split (the same logits give about 9 at 15 per split and 17
    at 50): a fixed count of splits would make IS depend on how many images a
    run generated. There are N // ``images_per_split`` splits; the images left
    over after the seeded shuffle are not used.

    Takes logits rather than probabilities so the softmax is done once, here,
    in float64. With the FID Inception these must be its bias-free 1008-class
    logits, which is what the original IS code, torch-fidelity and
    torchmetrics feed the softmax. The per-split KL is computed as
    H(p(y)) - mean_x H(p(y|x)), which stays finite when a class has zero
    probability. Std uses ddof 0 like torch-fidelity (torchmetrics uses ddof 1).
    """
    from scipy.special import entr, softmax

    matrix = _as_matrix(logits, "logits")
    if not 1 <= images_per_split <= len(matrix):
        raise ValueError(
            f"images_per_split must be between 1 and the number of samples ({len(matrix)}), got {images_per_split}"
        )
    splits = len(matrix) // images_per_split
    order = np.random.default_rng(seed).permutation(len(matrix))[: splits * images_per_split]
    parts = softmax(matrix, axis=1)[order].reshape(splits, images_per_split, -1)
    scores = np.exp(entr(parts.mean(axis=1)).sum(axis=1) - entr(parts).sum(axis=2).mean(axis=1))
    return float(scores.mean()), float(scores.std())


def _distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances; the matmul shortcut would turn identical points into tiny non-zeros."""
    import torch

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


def _resample_chunk(n_a: int, n_b: int) -> int:
    """Resamples handled at once, so that the gathered cross block stays around 32 MB."""
    return max(1, 4_000_000 // (n_a * n_b))


def _counts(rows: np.ndarray, n: int) -> np.ndarray:
    """How often each original sample occurs in each resample (resamples x n)."""
    offsets = np.arange(len(rows))[:, None] * n
    return np.bincount((rows + offsets).ravel(), minlength=len(rows) * n).reshape(len(rows), n).astype(np.float64)


def _weighted_sum(counts_a: np.ndarray, matrix: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
    """Sum of ``matrix`` over all slot pairs of each resample, from the counts: no N x N gather per resample."""
    return ((counts_a @ matrix) * counts_b).sum(axis=1)


def _within_mean(kernel: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean kernel value over pairs of a resample's slots that hold different original samples.

    A bootstrap resample repeats samples; counting a repeat as a pair would put
    k(x, x) into the off-diagonal sum of the unbiased MMD² and bias it upward by
    about 1/N, a lot for a handful of reference crops. NaN when a resample holds
    a single distinct sample.
    """
    total = counts.sum(axis=1)
    repeats = (counts**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (_weighted_sum(counts, kernel, counts) - (counts**2) @ np.diag(kernel)) / (total**2 - repeats)


def fid_kid_of_resamples(
    features_a: ArrayLike, features_b: ArrayLike, rows_a: np.ndarray, rows_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FID and full-set unbiased KID of each resample (row indices, resamples x N per set).

    Works on the Gram matrices, so a resample costs O(N_a N_b min(N_a, N_b))
    whatever the feature dimension D: with centred, scaled feature rows A and
    B, Tr (S_a S_b)^1/2 is the nuclear norm of A B^T (the non-zero eigenvalues
    of S_a S_b are those of (A B^T)(A B^T)^T), which needs no D x D matrix.
    That makes a thousand resamples of 2048-d Inception features take seconds.
    The identity is exact; ``frechet_distance`` stays the point estimate
    because it is the formula the published libraries use.
    """
    a = _as_matrix(features_a, "features_a", min_rows=2)
    b = _as_matrix(features_b, "features_b", min_rows=2)
    _same_dimension(a, b, "features_a and features_b")
    rows_a, rows_b = np.asarray(rows_a, dtype=np.int64), np.asarray(rows_b, dtype=np.int64)
    if rows_a.ndim != 2 or rows_b.ndim != 2 or len(rows_a) != len(rows_b):
        raise ValueError(f"row indices must be resamples x N for both sets, got {rows_a.shape} and {rows_b.shape}")
    n_a, n_b, dim = rows_a.shape[1], rows_b.shape[1], a.shape[1]
    if min(n_a, n_b) < 2:
        raise ValueError(f"each resample needs at least 2 rows per set, got {n_a} and {n_b}")
    gram_aa, gram_bb, gram_ab = a @ a.T, b @ b.T, a @ b.T
    kernel_aa, kernel_bb, kernel_ab = ((g / dim + KID_KERNEL_COEF) ** KID_KERNEL_DEGREE for g in (gram_aa, gram_bb, gram_ab))
    fid, kid = np.empty(len(rows_a)), np.empty(len(rows_a))
    step = _resample_chunk(n_a, n_b)
    for start in range(0, len(rows_a), step):
        ia, ib = rows_a[start : start + step], rows_b[start : start + step]
        wa, wb = _counts(ia, len(a)), _counts(ib, len(b))
        mean_aa = _weighted_sum(wa, gram_aa, wa) / n_a**2
        mean_bb = _weighted_sum(wb, gram_bb, wb) / n_b**2
        trace_a = (wa @ np.diag(gram_aa) - n_a * mean_aa) / (n_a - 1)
        trace_b = (wb @ np.diag(gram_bb) - n_b * mean_bb) / (n_b - 1)
        ab = gram_ab[ia[:, :, None], ib[:, None, :]]
        mean_ab = ab.mean(axis=(1, 2))
        centred = ab - ab.mean(axis=2, keepdims=True) - ab.mean(axis=1, keepdims=True) + mean_ab[:, None, None]
        centred /= np.sqrt((n_a - 1) * (n_b - 1))
        # Singular values directly: square roots of the eigenvalues of M M^T would turn rounding noise in its
        # zero eigenvalues (rank <= N-1, often below min(N_a, N_b)) into errors of order 1e-8 times the largest.
        nuclear = np.linalg.svd(centred, compute_uv=False).sum(axis=1)
        fid[start : start + step] = mean_aa + mean_bb - 2 * mean_ab + trace_a + trace_b - 2 * nuclear
        cross = _weighted_sum(wa, kernel_ab, wb) / (n_a * n_b)
        kid[start : start + step] = _within_mean(kernel_aa, wa) + _within_mean(kernel_bb, wb) - 2 * cross
    return fid, kid


def bootstrap_fid_kid(
    features_a: ArrayLike, features_b: ArrayLike, resamples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """FID and KID of ``resamples`` bootstrap resamples: both sets drawn again with replacement, at their sizes.

    Both sets are resampled because both are samples: with a handful of
    held-out crops the reference side is the larger source of uncertainty,
    which KID's subset std cannot show.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n_a, n_b = len(_as_matrix(features_a, "features_a")), len(_as_matrix(features_b, "features_b"))
    rng = np.random.default_rng(seed)
    return fid_kid_of_resamples(
        features_a, features_b, rng.integers(0, n_a, size=(resamples, n_a)), rng.integers(0, n_b, size=(resamples, n_b))
    )


def centred_interval(
    point: float, replicates: ArrayLike, level: float, floor: float | None = None
) -> tuple[float, float] | None:
    """Bootstrap interval of ``level``, moved so that the replicates' median sits on the point estimate.

    A resample holds only about 63 % distinct images, and FID's small-N bias
    then shifts the whole bootstrap distribution upward: the plain percentile
    interval can miss the estimate it belongs to. Keeping the percentiles'
    spread around the point estimate keeps the sampling width without that
    shift. ``floor`` clips the lower end of a metric that cannot go below it
    (FID >= 0). None when fewer than two replicates are finite.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    tail = (1 - level) / 2
    low, middle, high = np.quantile(values, [tail, 0.5, 1 - tail])
    low = point + low - middle
    if floor is not None:
        low = max(low, floor)
    return float(low), float(point + high - middle)


def intervals_overlap(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether two closed intervals share a point: a conservative screen, as overlap does not prove equality."""
    return first[0] <= second[1] and second[0] <= first[1]


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
