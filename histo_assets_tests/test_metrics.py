"""Metric maths against closed forms and independent formulas; extractors without any published weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from histo_assets.core.features import (
    COMPARABLE_NONE,
    FALLBACK_NAME,
    INCEPTION_NAME,
    WEIGHTS_ENV,
    InceptionV3FID,
    RandomConvFeatures,
    build_extractor,
    extract_features,
)
from histo_assets.core import features as features_module
from histo_assets.core.evaluation import (
    ALL_CLASSES,
    CURVES_FILE,
    FEATURE_CACHE,
    FID_RANK_DEFICIENT,
    IS_SPLIT_ABOVE_N,
    KID_SUBSET_ABOVE_N,
    PR_K_ABOVE_N,
    SMALL_REFERENCE,
    SUMMARY_ONLY_SETTINGS,
    TABLE_COLUMNS,
    FeatureSet,
    MetricSettings,
    best_checkpoints,
    comparison_grid,
    dvc_metrics,
    feature_cache,
    generated_files,
    grid_file,
    metrics_notes,
    metrics_table,
    overlapping_steps,
    real_sets,
    score_checkpoint,
    scoring_settings,
    write_metrics_summary,
)
from histo_assets.core.io import atomic_path, sha256_file
from histo_assets.core.layout import HOLDOUT, IMAGES, SUMMARY, Layout
from histo_assets.core.seeding import derive_seed
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
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import from_section


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


def _seeded_inception(seed: int) -> InceptionV3FID:
    """Random weights with non-trivial batch-norm statistics, so features are far from zero."""
    model = InceptionV3FID()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("conv.weight"):
                tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
            elif name.endswith(("running_var", "bn.weight")):
                tensor.copy_(0.75 + 0.25 * noise.abs())
            else:
                tensor.copy_(0.05 * noise)
    return model


# ---- FID ----------------------------------------------------------------------------------


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


# ---- KID ----------------------------------------------------------------------------------


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


# ---- IS -----------------------------------------------------------------------------------


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


# ---- bootstrap intervals ------------------------------------------------------------------


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


# ---- rows: sizes, flags and labels --------------------------------------------------------


def _info(dim: int, logits: bool = False) -> features_module.FeatureExtractorInfo:
    return features_module.FeatureExtractorInfo(
        name="test-features", feature_dim=dim, input_size=64, resize_mode="bilinear", antialias=False,
        weights_path=None, weights_sha256=None, comparable_with=COMPARABLE_NONE,
        preprocessing=features_module.preprocessing_label(64, "bilinear", False), inception_score_available=logits,
        note="test features",
    )


def _settings(seed: int = 11, **changes) -> MetricSettings:
    """params.yaml's metrics section, with fewer resamples to stay fast."""
    section = load_params(DEFAULT_PARAMS_FILE)["metrics"] | {"bootstrap_resamples": 200} | changes
    return from_section(MetricSettings, section, seed=seed)


def _gaussian(n: int, seed: int, scale: float = 1.0, dim: int = 32) -> np.ndarray:
    mixing = np.random.default_rng(0).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).normal(size=(n, dim)) * scale @ mixing


def test_params_defaults_select_by_kid_with_bootstrap_intervals():
    section = load_params(DEFAULT_PARAMS_FILE)["metrics"]
    assert section["best_checkpoint_metric"] == "kid" and section["best_checkpoint_tie"] == "lowest"
    assert "is_splits" not in section and section["is_images_per_split"] == 15
    settings = from_section(MetricSettings, section, seed=0)
    assert settings.bootstrap_resamples >= 200 and 0 < settings.confidence_level < 1 and settings.min_reference > 2


def test_a_row_is_deterministic_and_carries_sizes_intervals_and_labels():
    generated, reference, train = (FeatureSet(_gaussian(n, seed), None) for n, seed in ((150, 1), (60, 2), (40, 3)))
    row = score_checkpoint(generated, reference, train, _info(32), _settings(min_reference=50))
    assert row == score_checkpoint(generated, reference, train, _info(32), _settings(min_reference=50))
    assert (row["n_generated"], row["n_reference"], row["feature_dim"]) == (150, 60, 32)
    assert row["fid_ci_low"] < row["fid"] < row["fid_ci_high"]
    assert row["kid_ci_low"] < row["kid_mean"] < row["kid_ci_high"]
    assert (row["confidence_level"], row["bootstrap_resamples"]) == (0.95, 200)
    assert row["flags"] == "" and row["kid_subset_size"] == 50 and row["pr_k"] == 3
    assert row["comparable_with"] == "none" and "299" not in row["preprocessing"] and "64x64" in row["preprocessing"]
    assert set(TABLE_COLUMNS) - {"tissue_class", "step", "overlapping_steps"} <= set(row)
    assert score_checkpoint(generated, reference, train, _info(32), _settings(seed=12)) != row


def test_kid_subset_above_n_uses_the_smaller_set_and_says_so():
    generated, reference, train = (FeatureSet(_gaussian(n, seed), None) for n, seed in ((40, 4), (9, 5), (20, 6)))
    row = score_checkpoint(generated, reference, train, _info(32), _settings(kid_subset_size=50))
    assert row["kid_subset_size"] == 9
    assert row["flags"].split(";") == [SMALL_REFERENCE, FID_RANK_DEFICIENT, KID_SUBSET_ABOVE_N]
    assert row["kid_mean"] == kernel_distance(reference.features, generated.features, 9, 100, seed=11)[0]
    within = score_checkpoint(generated, reference, train, _info(32), _settings(kid_subset_size=9, min_reference=9))
    assert within["flags"] == FID_RANK_DEFICIENT and within["kid_mean"] == row["kid_mean"]


def test_inception_score_split_size_is_fixed_and_recorded():
    logits = np.random.default_rng(7).normal(scale=3.0, size=(40, 20))
    features = _gaussian(40, 8)
    generated = FeatureSet(features, logits)
    real = FeatureSet(_gaussian(60, 9), None)
    row = score_checkpoint(generated, real, real, _info(32, logits=True), _settings(is_images_per_split=15))
    assert row["is_images_per_split"] == 15 and row["is_note"] == "2 splits of 15 images (10 left out)"
    assert (row["is_mean"], row["is_std"]) == inception_score(logits, 15, seed=11)
    assert IS_SPLIT_ABOVE_N not in row["flags"]
    few = score_checkpoint(FeatureSet(features[:10], logits[:10]), real, real, _info(32, logits=True), _settings())
    assert few["is_images_per_split"] == 10 and IS_SPLIT_ABOVE_N in few["flags"].split(";")


def test_precision_recall_keep_k_or_are_left_out_with_a_flag():
    generated, train = FeatureSet(_gaussian(30, 10), None), FeatureSet(_gaussian(20, 11), None)
    row = score_checkpoint(generated, FeatureSet(_gaussian(3, 12), None), train, _info(32), _settings(pr_k=3))
    assert row["pr_k"] == 3 and row["precision"] is None and row["recall"] is None
    assert PR_K_ABOVE_N in row["flags"].split(";")
    enough = score_checkpoint(generated, FeatureSet(_gaussian(4, 12), None), train, _info(32), _settings(pr_k=3))
    assert enough["pr_k"] == 3 and enough["precision"] is not None and PR_K_ABOVE_N not in enough["flags"]


def _collapse_table(n_reference: int) -> pd.DataFrame:
    """Step 1 generates from the true distribution, step 2 from a collapsed one (half the variance)."""
    reference, train = FeatureSet(_gaussian(n_reference, 20), None), FeatureSet(_gaussian(50, 21), None)
    rows = []
    for step, scale in ((1, 1.0), (2, 0.5**0.5)):
        generated = FeatureSet(_gaussian(150, 21 + step, scale), None)
        row = score_checkpoint(generated, reference, train, _info(32), _settings(kid_subset_size=50, min_reference=50))
        rows.append({"tissue_class": "c", "step": step} | row)
    table = pd.DataFrame(rows)
    table["overlapping_steps"] = overlapping_steps(table, "kid")
    return table


def test_a_collapsed_generator_is_flagged_and_indistinguishable_against_a_tiny_reference():
    table = _collapse_table(n_reference=8)
    assert (table["flags"] == ";".join([SMALL_REFERENCE, FID_RANK_DEFICIENT, KID_SUBSET_ABOVE_N])).all()
    assert table["fid"].iloc[1] < table["fid"].iloc[0], "at this size FID prefers the collapsed generator"
    assert table["overlapping_steps"].tolist() == ["2", "1"]
    for metric in ("kid", "fid"):
        choice = best_checkpoints(table, metric, "lowest")["c"]
        assert choice.indistinguishable == [1, 2] and choice.decisive is False
    assert best_checkpoints(table, "kid", "earliest")["c"].step == 1
    notes = metrics_notes(table, best_checkpoints(table, "kid", "lowest"), "kid", "lowest")
    assert f"`{SMALL_REFERENCE}`" in notes and "cannot be told apart" in notes


def test_with_a_large_reference_kid_picks_the_true_distribution_decisively():
    table = _collapse_table(n_reference=400)
    assert (table["flags"] == "").all()
    choice = best_checkpoints(table, "kid", "lowest")["c"]
    assert (choice.step, choice.indistinguishable, choice.decisive) == (1, [1], True)
    assert table["overlapping_steps"].tolist() == ["", ""]
    assert best_checkpoints(table, "kid", "earliest")["c"].step == 1


def test_selection_keeps_other_metrics_and_reports_labels_in_dvc_metrics():
    table = _collapse_table(n_reference=8)
    recall = best_checkpoints(table, "recall", "lowest")["c"]
    assert recall.decisive is None and recall.indistinguishable == [recall.step]
    assert best_checkpoints(table, "kid_mean", "lowest") == best_checkpoints(table, "kid", "lowest")
    with pytest.raises(ValueError, match="best_checkpoint_metric"):
        best_checkpoints(table, "kid_std", "lowest")
    with pytest.raises(ValueError, match="best_checkpoint_tie"):
        best_checkpoints(table, "kid", "median")
    metrics = dvc_metrics(table, best_checkpoints(table, "kid", "lowest"), "kid", "lowest")
    assert (metrics["best_by"], metrics["tie_rule"], metrics["comparable_with"]) == ("kid", "lowest", "none")
    entry = metrics["classes"]["c"]
    assert entry["indistinguishable_steps"] == "1;2" and entry["decisive"] is False
    assert entry["flags"] == table["flags"].iloc[0] and entry["n_reference"] == 8
    assert entry["kid_ci_low"] < entry["kid_mean"] < entry["kid_ci_high"]


def test_metrics_table_adds_the_overlapping_steps_of_each_row():
    rows = _collapse_table(n_reference=8).drop(columns="overlapping_steps").to_dict("records")
    assert metrics_table(rows, "kid")["overlapping_steps"].tolist() == ["2", "1"]


def _write_pngs(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (16, 16), (10 * index, 100, 150)).save(folder / name)
    return [folder / name for name in names]


def test_real_and_generated_sets_are_read_from_the_layout(tmp_path):
    layout = Layout(tmp_path)
    _write_pngs(layout.square_crops("c") / IMAGES, ["a.png", "b.png", "z.png"])
    layout.augmented_crops("c").mkdir(parents=True)
    pd.DataFrame({"crop_file": ["z.png", "a.png"]}).to_parquet(layout.augmented_crops("c") / HOLDOUT)
    train = _write_pngs(layout.augmented_crops("c") / IMAGES, ["orig-2.png", "aug-1.png", "orig-1.png"])
    generated = _write_pngs(layout.synthetic_images("c", 3) / IMAGES, ["b.png", "a.png"])
    reference, training = real_sets(layout, "c")
    assert reference == [layout.square_crops("c") / IMAGES / "z.png", layout.square_crops("c") / IMAGES / "a.png"]
    assert training == sorted(train)
    assert generated_files(layout, "c", 3) == sorted(generated)


def test_feature_cache_lives_under_the_data_cache_and_reads_weights_next_to_params(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    section = load_params(DEFAULT_PARAMS_FILE)["metrics"] | {"inception_weights": None, "batch_size": 5}
    cache = feature_cache(section, Layout(tmp_path / "data"), tmp_path / "params", master_seed=7)
    assert cache.cache_dir == tmp_path / "data" / ".cache" / FEATURE_CACHE and cache.batch_size == 5
    assert cache.info.name == FALLBACK_NAME
    assert f"seed {derive_seed(7, 'feature_extractor')}" in cache.info.note
    relative = section | {"inception_weights": "weights/missing.pth"}
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "params" / "weights" / "missing.pth")):
        feature_cache(relative, Layout(tmp_path / "data"), tmp_path / "params", master_seed=7)


def test_scoring_settings_leave_out_what_only_the_summary_reads():
    section = load_params(DEFAULT_PARAMS_FILE)["metrics"]
    kept = scoring_settings(section)
    assert not set(kept) & set(SUMMARY_ONLY_SETTINGS)
    assert kept == {key: value for key, value in section.items() if key not in SUMMARY_ONLY_SETTINGS}


def test_the_summary_writes_dvc_metrics_plots_tables_figures_and_its_summary(tmp_path):
    layout = Layout(tmp_path)
    steps = [1, 2]
    _write_pngs(layout.augmented_crops("c") / IMAGES, ["orig-1.png", "orig-2.png", "aug-1.png"])
    for step in steps:
        _write_pngs(layout.synthetic_images("c", step) / IMAGES, ["0.png", "1.png"])
    table = _collapse_table(n_reference=8)
    pooled = table.assign(tissue_class=ALL_CLASSES)
    table = pd.concat([table, pooled], ignore_index=True)
    summary = write_metrics_summary(layout, table, ["c"], steps, "kid", "lowest")
    out, details = layout.metrics_summary, layout.metrics_details
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    assert written == sorted(["metrics.csv", "metrics.json", "plots/c.csv", f"plots/{ALL_CLASSES}.csv",
                              f"details/{CURVES_FILE}", f"details/{grid_file('c')}", "details/metrics.parquet",
                              f"details/{SUMMARY}"])
    assert json.loads((details / SUMMARY).read_text()) == json.loads(json.dumps(summary))
    choices = best_checkpoints(table[table["tissue_class"] != ALL_CLASSES], "kid", "lowest")
    assert summary["best"] == {"c": choices["c"].step} and summary["indistinguishable"] == {"c": [1, 2]}
    assert ALL_CLASSES not in summary["best"], "pooled rows are scored, never chosen"
    assert (summary["best_by"], summary["tie_rule"], summary["steps"]) == ("kid", "lowest", steps)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(
        dvc_metrics(table, choices, "kid", "lowest", {})))
    assert pd.read_csv(out / "metrics.csv").columns.tolist() == TABLE_COLUMNS
    assert pd.read_csv(out / "plots" / "c.csv")["step"].tolist() == steps
    assert Image.open(details / grid_file("c")).tobytes() == comparison_grid(layout, "c", steps).tobytes()


# ---- precision / recall -------------------------------------------------------------------


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


# ---- memorisation -------------------------------------------------------------------------


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


# ---- random-conv fallback -----------------------------------------------------------------


def test_random_conv_features_are_deterministic_per_seed():
    images = torch.from_numpy(_textures(60, n=4, cell=4, tint=(180, 110, 160))).permute(0, 3, 1, 2)
    first, second, other = RandomConvFeatures(seed=7), RandomConvFeatures(seed=7), RandomConvFeatures(seed=8)
    features = first(images)
    assert features.shape == (4, 256) and features.dtype == torch.float32
    assert torch.equal(features, second(images))
    assert not torch.allclose(features, other(images))
    assert first.features_and_logits(images)[1] is None


def test_random_conv_fid_separates_near_identical_from_different_sets():
    module = RandomConvFeatures(seed=0)
    base = _textures(61, n=64, cell=8, tint=(200, 120, 170))
    jitter = np.random.default_rng(62).integers(-2, 3, size=base.shape)
    near_copy = np.clip(base.astype(int) + jitter, 0, 255).astype(np.uint8)
    different = _textures(63, n=64, cell=2, tint=(150, 90, 200))
    base_features, logits = extract_features(module, list(base), batch_size=16)
    near_fid = frechet_distance(base_features, extract_features(module, list(near_copy), batch_size=16)[0])
    far_fid = frechet_distance(base_features, extract_features(module, list(different), batch_size=16)[0])
    assert logits is None
    assert 0 <= near_fid < far_fid / 100


def test_torchmetrics_fid_and_kid_accept_the_fallback_and_agree_with_ours():
    module = RandomConvFeatures(seed=1)
    real = _textures(70, n=24, cell=8, tint=(200, 120, 170))
    fake = _textures(71, n=24, cell=4, tint=(190, 110, 180))
    real_features, _ = extract_features(module, list(real), batch_size=8)
    fake_features, _ = extract_features(module, list(fake), batch_size=8)
    as_tensor = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2)  # noqa: E731
    fid = FrechetInceptionDistance(feature=module)
    fid.update(as_tensor(real), real=True)
    fid.update(as_tensor(fake), real=False)
    assert float(fid.compute()) == pytest.approx(frechet_distance(real_features, fake_features), rel=1e-4)
    # One subset of the whole set: torchmetrics' unseeded permutation cannot change the MMD.
    kid = KernelInceptionDistance(feature=module, subsets=1, subset_size=24)
    kid.update(as_tensor(real), real=True)
    kid.update(as_tensor(fake), real=False)
    ours, _ = kernel_distance(real_features, fake_features, subset_size=24, subsets=1, seed=0)
    assert float(kid.compute()[0]) == pytest.approx(ours, rel=1e-4)


def test_build_extractor_without_weights_is_the_labelled_fallback(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    module, info = build_extractor(None, seed=3)
    assert isinstance(module, RandomConvFeatures) and module.seed == 3
    assert info.name == FALLBACK_NAME
    assert info.feature_dim == 256
    assert info.weights_sha256 is None
    assert info.comparable_with == COMPARABLE_NONE == "none"
    assert info.inception_score_available is False
    assert "not comparable with published FID" in info.note
    assert "Inception Score is not available" in info.note


def test_extract_features_is_independent_of_batching_and_input_type():
    module = RandomConvFeatures(seed=2)
    large = _textures(80, n=5, cell=4, tint=(200, 120, 170))
    small = _textures(81, n=2, cell=4, tint=(60, 40, 90), size=32)
    images = list(large) + list(small)
    lines: list[str] = []
    one_by_one, _ = extract_features(module, images, batch_size=1)
    as_pil = (Image.fromarray(image) for image in images)
    batched, _ = extract_features(module, as_pil, batch_size=4, log=lines.append)
    assert batched.shape == (7, 256)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    assert lines and "7 images" in lines[-1]
    with pytest.raises(ValueError, match="uint8"):
        extract_features(module, [images[0].astype(np.float32)], batch_size=1)


# ---- FID Inception architecture -----------------------------------------------------------


@pytest.fixture(scope="module")
def inception_run():
    """One seeded model and its outputs on two images, shared because a CPU forward pass takes seconds."""
    model = _seeded_inception(0)
    images = list(_textures(90, n=2, cell=8, tint=(200, 120, 170)))
    with torch.inference_mode():
        features, logits = model.features_and_logits(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    return model, images, features, logits


def test_inception_outputs_2048_features_and_1008_logits_for_small_uint8_images(inception_run):
    model, images, features, logits = inception_run
    assert images[0].shape == (64, 64, 3)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and features.abs().max() > 0
    assert not torch.allclose(features[0], features[1])
    assert torch.allclose(logits, features @ model.fc.weight.T)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 64, 64))


def test_inception_state_dict_matches_the_pt_inception_layout():
    state = InceptionV3FID().state_dict()
    # 94 conv+bn units x (conv.weight + 5 batch-norm entries) + fc weight and bias
    assert len(state) == 566
    assert sum(key.endswith("conv.weight") for key in state) == 94
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(value.numel() for key, value in state.items() if not key.endswith(buffers)) == 23_850_960
    assert not any(key.startswith("AuxLogits") for key in state)
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.bias": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {key: tuple(state[key].shape) for key in expected_shapes} == expected_shapes


def test_inception_weights_round_trip_through_a_file_reproduce_features(inception_run, tmp_path, monkeypatch):
    source, images, source_features, source_logits = inception_run
    path = tmp_path / "inception.pth"
    with atomic_path(path) as tmp:
        torch.save(source.state_dict(), tmp)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    module, info = build_extractor(None, seed=0)
    loaded_features, loaded_logits = extract_features(module, images, batch_size=2)
    assert np.array_equal(loaded_features, source_features.numpy())
    assert np.array_equal(loaded_logits, source_logits.numpy())
    assert info.name == INCEPTION_NAME and info.feature_dim == 2048
    assert (info.input_size, info.resize_mode, info.antialias) == (299, "bilinear", False)
    assert info.weights_sha256 == sha256_file(path)
    assert info.inception_score_available is True
    assert info.comparable_with == COMPARABLE_NONE and "not comparable" in info.note
    assert info.preprocessing == "uint8 RGB /255, bilinear resize to 299x299 (align_corners=False, no antialias), 2x-1"


def test_only_the_published_weights_are_labelled_comparable_with_pytorch_fid(inception_run, tmp_path, monkeypatch):
    path = tmp_path / "inception.pth"
    with atomic_path(path) as tmp:
        torch.save(inception_run[0].state_dict(), tmp)
    monkeypatch.setattr(features_module, "PUBLISHED_WEIGHTS_SHA256", sha256_file(path))
    _, info = build_extractor(str(path), seed=0)
    assert info.comparable_with == features_module.COMPARABLE_PYTORCH_FID == "pytorch-fid"
    assert "pytorch-fid only" in info.note and "torch-fidelity" in info.note


def test_missing_inception_weights_raise_and_never_download(tmp_path, monkeypatch):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        build_extractor(str(missing), seed=0)
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_extractor(None, seed=0)
    assert not missing.exists()


def test_a_foreign_state_dict_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    with atomic_path(path) as tmp:
        torch.save(RandomConvFeatures(seed=0).state_dict(), tmp)
    with pytest.raises(ValueError, match="not an FID Inception state dict"):
        InceptionV3FID.from_weights(path)


def test_naming_a_cached_set_never_loads_the_extractor_and_the_weights_are_hashed_once(tmp_path, monkeypatch):
    from histo_assets.core import evaluation as evaluation_module

    loads = []
    real_build = evaluation_module.build_extractor
    monkeypatch.setattr(evaluation_module, "build_extractor", lambda *args: loads.append(args) or real_build(*args))
    images = _write_pngs(tmp_path / "images", ["a.png", "b.png"])
    section = load_params(DEFAULT_PARAMS_FILE)["metrics"] | {"inception_weights": None}
    cache = evaluation_module.feature_cache(section, Layout(tmp_path), tmp_path, master_seed=3)
    eager = evaluation_module.FeatureCache(tmp_path / "eager", *real_build(None, derive_seed(3, "feature_extractor")), batch_size=2)
    assert cache.path_for(images).name == eager.path_for(images).name and loads == []
    assert cache.features(images).features.shape == (2, cache.info.feature_dim) and len(loads) == 1

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not really weights")
    hashed = []
    monkeypatch.setattr(features_module, "sha256_file", lambda path: hashed.append(path) or "0" * 64)
    first, second = (features_module.extractor_info(str(weights), seed=0) for _ in range(2))
    assert first == second and first.weights_sha256 == "0" * 64 and len(hashed) == 1
