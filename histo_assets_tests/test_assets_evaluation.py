"""assets/evaluation.py: checkpoint metrics, the summary across classes and the classifier utility of the tiny pipeline."""

from __future__ import annotations

import json
import math

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from histo_assets.core.evaluation import FID_RANK_DEFICIENT, SMALL_REFERENCE, TABLE_COLUMNS
from histo_assets.core.features import FALLBACK_NAME
from histo_assets.core.layout import Layout
from histo_assets_tests.tiny_pipeline import CLASSES, EVALUATED_STEPS, IMAGES_PER_CHECKPOINT, STEPS, latest, metadata


def test_checkpoint_metrics_are_finite_and_labelled_as_fallback_features(pipeline):
    with pipeline.instance() as instance:
        for tissue_class in CLASSES:
            for step in EVALUATED_STEPS:
                row = json.loads((pipeline.data / "checkpoint_metrics" / tissue_class / str(step) / "summary.json").read_text())["row"]
                assert (row["tissue_class"], row["step"]) == (tissue_class, step)
                assert math.isfinite(row["fid"]) and math.isfinite(row["kid_mean"]) and math.isfinite(row["fid_vs_train"])
                assert row["extractor"] == FALLBACK_NAME == "random-conv-fallback"
                assert row["comparable_with"] == "none" and "antialias" in row["preprocessing"]
                assert "not comparable" in row["extractor_note"]
                assert row["is_mean"] is None and row["is_std"] is None and "logits" in row["is_note"]
                assert row["n_generated"] == IMAGES_PER_CHECKPOINT and row["n_reference"] >= 2
                assert row["feature_dim"] == 256
                assert row["fid_ci_low"] <= row["fid"] <= row["fid_ci_high"]
                assert row["kid_ci_low"] <= row["kid_mean"] <= row["kid_ci_high"]
                # A tiny reference set against 256-d features: every row says so.
                assert {SMALL_REFERENCE, FID_RANK_DEFICIENT} <= set(row["flags"].split(";"))
                shown = metadata(latest(instance, "checkpoint_metrics", dg.MultiPartitionKey({"tissue_class": tissue_class, "step": str(step)})))
                assert shown["fid"] == row["fid"] and shown["extractor"] == FALLBACK_NAME
                assert shown["flags"] == row["flags"] and shown["comparable_with"] == "none"


def test_metrics_summary_has_every_class_and_step_plus_pooled_rows_and_its_files(pipeline):
    layout = Layout(pipeline.data)
    table = pd.read_parquet(layout.metrics_details / "metrics.parquet")
    expected = {(c, s) for c in [*CLASSES, "all"] for s in EVALUATED_STEPS}
    assert set(zip(table["tissue_class"], table["step"])) == expected and len(table) == len(expected)
    pooled = table[table["tissue_class"] == "all"]
    assert (pooled["n_generated"] == IMAGES_PER_CHECKPOINT * len(CLASSES)).all()
    assert pooled["fid"].map(math.isfinite).all()
    csv = pd.read_csv(layout.metrics_summary / "metrics.csv", keep_default_na=False)
    assert list(csv.columns) == TABLE_COLUMNS and len(csv) == len(expected)
    assert (csv["flags"] != "").all() and (csv["comparable_with"] == "none").all()
    assert (csv["fid_ci_low"].astype(float) <= csv["fid"].astype(float)).all()
    for name in [*CLASSES, "all"]:
        plot = pd.read_csv(layout.metrics_summary / "plots" / f"{name}.csv")
        assert list(plot.columns) == TABLE_COLUMNS[1:] and (plot["extractor"] == FALLBACK_NAME).all()
    dvc_metrics = json.loads((layout.metrics_summary / "metrics.json").read_text())
    assert dvc_metrics["best_by"] == "kid" and dvc_metrics["extractor"] == FALLBACK_NAME
    assert (dvc_metrics["comparable_with"], dvc_metrics["confidence_level"]) == ("none", 0.95)
    assert set(dvc_metrics["classes"]) == set(CLASSES)
    for tissue_class in CLASSES:
        rows = table[table["tissue_class"] == tissue_class]
        best = int(rows.sort_values(["kid_mean", "step"]).iloc[0]["step"])
        entry = dvc_metrics["classes"][tissue_class]
        assert entry["best_step"] == best and str(best) in entry["indistinguishable_steps"].split(";")
        assert entry["kid_mean"] == pytest.approx(float(rows[rows["step"] == best]["kid_mean"].iloc[0]))
        assert entry["kid_ci_low"] <= entry["kid_mean"] <= entry["kid_ci_high"] and entry["flags"]
    for name in ["curves.png", *(f"grid_{c}.png" for c in CLASSES)]:
        with Image.open(layout.metrics_details / name) as image:
            image.verify()


def test_classifier_utility_scores_every_release_candidate_with_intervals(pipeline):
    folder = pipeline.data / "classifier_utility"
    table = pd.read_csv(folder / "utility.csv")
    candidates = {f"step-{s}" for s in EVALUATED_STEPS} | {"best"}
    assert set(table["candidate"]) == candidates
    for (candidate, variant), rows in table[table["metric"] == "balanced_accuracy"].groupby(["candidate", "variant"]):
        row = rows.iloc[0]
        assert row["ci_low"] <= row["value"] <= row["ci_high"], (candidate, variant)
    assert {"real", "real+synthetic", "synthetic"} <= set(table["variant"])
    overview = json.loads((folder / "utility.json").read_text())
    assert set(overview["verdicts"]) == candidates and overview["best_step_by_utility"] in STEPS
    assert all(set(v.values()) <= {"helps", "hurts", "no_detectable_effect"} for v in overview["verdicts"].values())
    for candidate in candidates:
        assert (folder / "candidates" / candidate / "confusion.csv").is_file()
    card = next((pipeline.data / "releases").glob("*/README.md")).read_text()
    assert "Classifier utility (logistic" in card and "| step-0 |" in card
    with pipeline.instance() as instance:
        shown = metadata(latest(instance, "classifier_utility", None))
        assert "real+synthetic" in shown["table"] and shown["best_step_by_utility"] in STEPS
