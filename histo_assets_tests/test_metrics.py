"""core/metrics.py: FID, KID, IS, bootstrap intervals, precision/recall and memorisation against closed forms and
independent formulas."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.linalg
import torch

from histo_assets.core.feature_networks import RandomConvFeatures
from histo_assets.core.features import extract_features
from histo_assets.core.metrics import (
    bootstrap_fid_kid,
    centred_interval,
    draw_kid_subsets,
    fid_kid_of_resamples,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    kernel_distance,
    memorisation,
    precision_recall,
)


def _correlated_features(seed: int, n: int, dim: int, shift: float = 0.0, sample: int = 0) -> np.ndarray:
    """Gaussian features whose correlation depends on ``seed``; ``sample`` draws another set from it."""
    mixing = np.random.default_rng(seed).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng([seed, sample]).normal(size=(n, dim)) @ mixing + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula, written independently: Tr sqrtm(S1 S2) via scipy."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def _unbiased_poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(u, v) = (u.v / d + 1)^3, written from Gretton et al. 2012 eq. 3."""
    m, dim = x.shape

    def kernel(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return (u @ v.T / dim + 1.0) ** 3

    off_diagonal = ~np.eye(m, dtype=bool)
    within = (kernel(x, x)[off_diagonal].sum() + kernel(y, y)[off_diagonal].sum()) / (m * (m - 1))
    return float(within - 2.0 * kernel(x, y).mean())


def _textures(seed: int, n: int, cell: int, tint: tuple[int, int, int], size: int = 64) -> np.ndarray:
    """Blocky colour noise: ``cell`` sets the texture scale, ``tint`` the mean colour."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(scale=40.0, size=(n, size // cell, size // cell, 3))
    fine = coarse.repeat(cell, axis=1).repeat(cell, axis=2)
    return np.clip(fine + np.array(tint), 0, 255).astype(np.uint8)


def test_fid_of_a_set_against_itself_is_zero():
    features = _correlated_features(0, n=200, dim=64)
    assert abs(frechet_distance(features, features)) < 1e-8 * np.trace(np.cov(features, rowvar=False))


def test_fid_unit_mean_shift_in_2048_dims_with_identity_covariance_is_2048():
    dim = 2048
    eye = np.eye(dim)
    fid = frechet_distance_from_stats(np.zeros(dim), eye, np.ones(dim), eye)
    assert fid == pytest.approx(2048.0, abs=1e-6)


def test_fid_equal_covariances_reduce_to_squared_mean_distance():
    sigma = np.cov(_correlated_features(1, n=100, dim=16), rowvar=False)
    mu1, mu2 = np.zeros(16), np.linspace(-1.0, 2.0, 16)
    expected = float(((mu1 - mu2) ** 2).sum())
    assert frechet_distance_from_stats(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)


def test_fid_agrees_with_scipy_sqrtm_formula():
    a = _correlated_features(2, n=400, dim=48)
    b = _correlated_features(3, n=300, dim=48, shift=0.3)
    ours = frechet_distance(a, b)
    assert ours > 1.0
    assert ours == pytest.approx(_scipy_fid(a, b), rel=1e-6)


def test_fid_accepts_torch_tensors_and_rejects_mismatched_dimensions():
    a = _correlated_features(4, n=50, dim=8)
    b = _correlated_features(5, n=50, dim=8)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b)) == pytest.approx(
        frechet_distance(a.astype(np.float32), b), rel=1e-12
    )
    with pytest.raises(ValueError, match="different feature dimensions"):
        frechet_distance(a, b[:, :4])


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_two():
    same_a = _correlated_features(10, n=300, dim=32, sample=0)
    same_b = _correlated_features(10, n=300, dim=32, sample=1)
    shifted = same_b + 0.5
    kid_same, _ = kernel_distance(same_a, same_b, subset_size=100, subsets=50, seed=0)
    kid_diff, std_diff = kernel_distance(same_a, shifted, subset_size=100, subsets=50, seed=0)
    assert abs(kid_same) < 0.05 * kid_diff
    assert kid_diff > 5 * std_diff > 0


def test_kid_agrees_with_independent_unbiased_mmd_on_the_same_subsets():
    a = _correlated_features(20, n=120, dim=24)
    b = _correlated_features(21, n=90, dim=24, shift=0.2)
    rows_a, rows_b = draw_kid_subsets(len(a), len(b), subset_size=40, subsets=7, seed=3)
    assert rows_a.shape == rows_b.shape == (7, 40)
    assert all(len(set(row)) == 40 for row in rows_a)
    reference = np.array([_unbiased_poly_mmd2(a[ia], b[ib]) for ia, ib in zip(rows_a, rows_b)])
    mean, std = kernel_distance(a, b, subset_size=40, subsets=7, seed=3)
    assert mean == pytest.approx(reference.mean(), rel=1e-9)
    assert std == pytest.approx(reference.std(), rel=1e-9)


def test_kid_is_seeded_and_refuses_oversized_subsets():
    a = _correlated_features(30, n=60, dim=8)
    b = _correlated_features(31, n=50, dim=8, shift=0.1)
    assert kernel_distance(a, b, 20, 10, seed=5) == kernel_distance(a, b, 20, 10, seed=5)
    assert kernel_distance(a, b, 20, 10, seed=5) != kernel_distance(a, b, 20, 10, seed=6)
    with pytest.raises(ValueError, match="exceeds the smaller set"):
        kernel_distance(a, b, subset_size=51, subsets=10, seed=5)


def test_inception_score_of_uniform_logits_is_one():
    mean, std = inception_score(np.zeros((40, 1008)), images_per_split=10, seed=0)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_n_distinct_confident_classes_is_n():
    n = 10
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(0, 5 * n, 5)] = 1e4
    mean, std = inception_score(logits, images_per_split=n, seed=0)
    assert mean == pytest.approx(float(n), rel=1e-9)
    assert std == 0.0


def test_inception_score_splits_are_seeded():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(60, 20))
    assert inception_score(logits, images_per_split=20, seed=1) == inception_score(logits, images_per_split=20, seed=1)
    assert inception_score(logits, images_per_split=20, seed=1) != inception_score(logits, images_per_split=20, seed=2)
    with pytest.raises(ValueError, match="images_per_split"):
        inception_score(logits, images_per_split=61, seed=1)


def test_inception_score_uses_whole_splits_of_the_given_size():
    logits = np.random.default_rng(4).normal(scale=3.0, size=(47, 20))
    mean, std = inception_score(logits, images_per_split=15, seed=9)
    order = np.random.default_rng(9).permutation(47)[:45]
    probabilities = np.exp(logits[order]) / np.exp(logits[order]).sum(axis=1, keepdims=True)
    per_split = []
    for part in probabilities.reshape(3, 15, 20):
        marginal = part.mean(axis=0)
        per_split.append(np.exp((part * (np.log(part) - np.log(marginal))).sum(axis=1).mean()))
    assert mean == pytest.approx(np.mean(per_split), rel=1e-9)
    assert std == pytest.approx(np.std(per_split), rel=1e-9)


@pytest.mark.parametrize("n_a, n_b, dim", [(8, 60, 128), (60, 60, 16), (40, 30, 16), (90, 8, 4)])
def test_resample_formula_without_resampling_is_fid_and_full_set_kid(n_a, n_b, dim):
    a = _correlated_features(100, n=n_a, dim=dim)
    b = _correlated_features(101, n=n_b, dim=dim, shift=0.3)
    fid, kid = fid_kid_of_resamples(a, b, np.arange(n_a)[None], np.arange(n_b)[None])
    assert fid[0] == pytest.approx(frechet_distance(a, b), rel=1e-6)
    kernel = lambda u, v: (u @ v.T / dim + 1.0) ** 3  # noqa: E731
    within = [(kernel(x, x).sum() - np.trace(kernel(x, x))) / (len(x) * (len(x) - 1)) for x in (a, b)]
    assert kid[0] == pytest.approx(sum(within) - 2 * kernel(a, b).mean(), rel=1e-9)
    if n_a == n_b:
        assert kid[0] == pytest.approx(_unbiased_poly_mmd2(a, b), rel=1e-9)


def test_resampled_kid_never_pairs_a_repeated_sample_with_itself():
    a = _correlated_features(102, n=5, dim=8)
    b = _correlated_features(103, n=6, dim=8, shift=0.2)
    rows_a, rows_b = np.array([[0, 0, 1, 3, 3]]), np.array([[2, 2, 2, 4, 5, 5]])
    _, kid = fid_kid_of_resamples(a, b, rows_a, rows_b)
    kernel = lambda u, v: (u @ v.T / 8 + 1.0) ** 3  # noqa: E731

    def within(x: np.ndarray, rows: np.ndarray) -> float:
        pairs = [(i, j) for i in rows for j in rows if i != j]
        return float(np.mean([kernel(x[i : i + 1], x[j : j + 1])[0, 0] for i, j in pairs]))

    expected = within(a, rows_a[0]) + within(b, rows_b[0]) - 2 * kernel(a[rows_a[0]], b[rows_b[0]]).mean()
    assert kid[0] == pytest.approx(expected, rel=1e-9)
    _, single = fid_kid_of_resamples(a, b, np.zeros((1, 5), dtype=int), rows_b)
    assert np.isnan(single[0]), "a resample of one distinct sample has no within-set pairs"


def test_bootstrap_is_seeded_and_its_centred_interval_contains_the_point_estimate():
    a = _correlated_features(104, n=12, dim=32)
    b = _correlated_features(104, n=80, dim=32, sample=1)
    first, again, other = (bootstrap_fid_kid(a, b, resamples=200, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    fid, (fid_reps, kid_reps) = frechet_distance(a, b), first
    low, high = centred_interval(fid, fid_reps, 0.95, floor=0.0)
    assert 0.0 <= low < fid < high
    # FID's small-N bias moves the replicates up: the uncentred percentile interval would miss the estimate.
    assert np.quantile(fid_reps, 0.025) > fid
    kid, _ = kernel_distance(a, b, subset_size=12, subsets=50, seed=0)
    kid_low, kid_high = centred_interval(kid, kid_reps, 0.95)
    assert kid_low < kid < kid_high
    narrow = centred_interval(kid, kid_reps, 0.5)
    assert kid_low < narrow[0] < narrow[1] < kid_high
    assert centred_interval(1.0, [np.nan, 2.0], 0.95) is None
    with pytest.raises(ValueError, match="level"):
        centred_interval(1.0, kid_reps, 1.5)


def test_intervals_narrow_as_both_sets_grow():
    def width(n: int) -> float:
        a = _correlated_features(105, n=n, dim=16)
        b = _correlated_features(105, n=n, dim=16, sample=1)
        _, kid_reps = bootstrap_fid_kid(a, b, resamples=200, seed=0)
        low, high = centred_interval(0.0, kid_reps, 0.9)
        return high - low

    assert width(200) < width(50) / 2 < width(12) / 4


def test_precision_recall_of_identical_sets_is_one():
    features = _correlated_features(40, n=80, dim=16)
    assert precision_recall(features, features.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_of_disjoint_far_apart_sets_is_zero():
    real = _correlated_features(41, n=80, dim=16)
    fake = _correlated_features(42, n=60, dim=16, shift=1000.0)
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_counts_only_generated_samples_on_the_real_manifold():
    real = _correlated_features(43, n=100, dim=8)
    fake = np.concatenate([real[:50], real[50:] + 1000.0])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.5
    assert 0.5 <= recall < 1.0
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real, fake[:3], k=3)


def test_memorisation_flags_an_exact_copy_and_not_a_different_sample():
    train = np.random.default_rng(50).normal(size=(40, 16))
    different = np.random.default_rng(51).normal(size=16)
    result = memorisation(np.stack([train[7], different]), train, threshold=0.95)
    assert result.nearest_index[0] == 7
    assert result.similarity[0] == pytest.approx(1.0, abs=1e-12)
    assert result.similarity[1] < 0.95
    assert result.flagged.tolist() == [True, False]
    assert result.rate == 0.5


def test_memorisation_finds_a_copied_image_through_the_extractor():
    train_images = _textures(52, n=12, cell=8, tint=(200, 120, 170))
    generated = np.stack([train_images[5], _textures(53, n=1, cell=2, tint=(90, 60, 200))[0]])
    module = RandomConvFeatures(seed=0)
    train_features, _ = extract_features(module, list(train_images), batch_size=6)
    generated_features, _ = extract_features(module, list(generated), batch_size=6)
    result = memorisation(generated_features, train_features, threshold=0.999)
    assert result.nearest_index[0] == 5
    assert result.similarity[0] == pytest.approx(1.0, abs=1e-6)
    assert result.flagged.tolist() == [True, False]
