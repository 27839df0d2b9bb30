"""core/evaluation.py: metric rows with sizes, flags and labels, best-checkpoint selection, the metric table, the
feature cache and the summary folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histo_assets.core.features import (
    COMPARABLE_NONE,
    FALLBACK_NAME,
    WEIGHTS_ENV,
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
    UnscoredCheckpointError,
    real_sets,
    score_checkpoint,
    scored_checkpoints,
    scoring_settings,
    write_metrics_summary,
)
from histo_assets.core.layout import HOLDOUT, IMAGES, SUMMARY, Layout
from histo_assets.core.seeding import derive_seed
from histo_assets.core.metrics import (
    inception_score,
    kernel_distance,
)
from histo_assets.params import DEFAULT_PARAMS_FILE, load_params
from histo_assets.settings import from_section


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


def test_the_scored_checkpoints_are_refused_naming_every_one_not_yet_scored(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(UnscoredCheckpointError, match="missing for a step 0, a step 100, b step 0, b step 100; materialise"):
        scored_checkpoints(layout, ["a", "b"], [0, 100])
