"""FID, KID, IS, precision/recall and memorisation for every checkpoint, the summary across classes, and whether
a release candidate's synthetic images help a classifier on real held-out crops."""

import dagster as dg
import pandas as pd

from histo_assets.core.candidates import image_sets_hash, utility_inputs
from histo_assets.core.evaluation import CURVES_FILE, METRICS_TABLE_FILE, FeatureCache, checkpoint_row, feature_cache
from histo_assets.core.evaluation import generated_files, grid_file, real_sets, scored_checkpoints, scoring_settings
from histo_assets.core.evaluation import row_description, summarise_rows
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import Layout
from histo_assets.core.schemas import METRICS_TABLE, PUBLISHED_METRICS, CheckpointMetricsSummary
from histo_assets.core.schemas import ClassifierUtilitySummary, MetricsDetails, MetricsSummarySummary, SyntheticImagesSummary
from histo_assets.core.stage import output_settings, read_summary
from histo_assets.params import Params
from histo_assets.partitions import by_tissue_class
from histo_assets.settings import metric_settings, utility_settings
from histo_assets.stage import Part, Stage, png_value, stage_asset, table_value

# Row values that are None where a metric could not be computed: numeric metadata shows them as NaN.
OPTIONAL_METRICS = ("fid", "kid_mean", "is_mean", "precision", "recall")
INTERVALS = ("fid_ci_low", "fid_ci_high", "kid_ci_low", "kid_ci_high", "confidence_level")
SHOWN_UTILITY_COLUMNS = ["candidate", "classifier", "variant", "value", "ci_low", "ci_high", "verdict"]


def _cache(p: Params) -> FeatureCache:
    return feature_cache(p["metrics"], Layout(p.data_dir), p.source.parent, p.seed)


def _checkpoint_metrics_inputs(p: Params, part: Part, _base_model) -> dict:
    layout, cache = Layout(p.data_dir), _cache(p)
    reference, train = real_sets(layout, part.tissue_class)
    generated = read_summary(layout.synthetic_images(part.tissue_class, part.step), SyntheticImagesSummary)
    return dict(generated=generated["data_version"], reference=cache.path_for(reference).name,
                train=cache.path_for(train).name, metrics=scoring_settings(p["metrics"]), seed=p.seed)


@stage_asset(reads=["synthetic_images", "augmented_crops", "square_crops"], inputs=_checkpoint_metrics_inputs,
             summary=CheckpointMetricsSummary, code_version="2", partitioned="class_and_step", resources=["base_model"],
             deps=["synthetic_images", dg.AssetDep("augmented_crops", partition_mapping=by_tissue_class),
                   dg.AssetDep("square_crops", partition_mapping=by_tissue_class)],
             kinds={"pytorch", "parquet"})
def checkpoint_metrics(stage: Stage):
    """One metric row for one class and checkpoint: FID and KID against the class's held-out real crops (and FID
    against the training images), IS where Inception logits exist, k-NN precision/recall and the memorisation
    rate against training images. Real-set features are cached by content hash."""
    p, layout, (tissue_class, step) = stage.params, stage.layout, (stage.part.tissue_class, stage.part.step)
    row = stage.build_or_reuse(lambda _staging: {"row": checkpoint_row(
        _cache(p), generated_files(layout, tissue_class, step), *real_sets(layout, tissue_class), metric_settings(p),
        tissue_class=tissue_class, step=step, log=stage.log)})["row"]
    stage.log(row_description(row))
    return stage.result(stable_hash(row), {
        **{name: float("nan") if row[name] is None else row[name] for name in OPTIONAL_METRICS},
        "memorisation_rate": row["memorisation_rate"],
        "n_generated / n_reference": f"{row['n_generated']} / {row['n_reference']}",
        "feature_dim": row["feature_dim"],
        "intervals": {name: row[name] for name in INTERVALS},
        "flags": row["flags"] or "none",
        **{name: row[name] for name in ("extractor", "comparable_with", "preprocessing", "is_note")},
        "note": row["extractor_note"],
    })


def _metrics_summary_inputs(p: Params, _part: Part, _base_model) -> dict:
    rows = [found["fingerprint"] for found in scored_checkpoints(Layout(p.data_dir), p.classes, p.steps).values()]
    return dict(rows=rows, metrics=output_settings(p["metrics"]), classes=p.classes)


@stage_asset(reads=["square_crops", "augmented_crops", "synthetic_images", "checkpoint_metrics"],
             inputs=_metrics_summary_inputs, summary=MetricsSummarySummary, code_version="2", resources=["base_model"],
             deps=["checkpoint_metrics"], kinds={"parquet", "matplotlib"})
def metrics_summary(stage: Stage):
    """All checkpoint metrics in one table, plus an 'all' row per step with every class pooled (the thesis's Table
    3.6); the best checkpoint per class by metrics.best_checkpoint_metric; FID/KID/IS-versus-step plots and
    originals-versus-generated grids. Written as DVC metrics (metrics.json) and plots (metrics.csv)."""
    p, details = stage.params, stage.layout.metrics_details
    scored = scored_checkpoints(stage.layout, p.classes, p.steps)
    metric, tie = p["metrics"]["best_checkpoint_metric"], p["metrics"]["best_checkpoint_tie"]
    data_version = stage.build_or_reuse(lambda _out: {"data_version": summarise_rows(
        _cache(p), stage.layout, [found["row"] for found in scored.values()], p.classes, p.steps,
        metric_settings(p), metric, tie)}, in_place=True)["data_version"]
    summary, table = read_summary(details, MetricsDetails), METRICS_TABLE.read(details / METRICS_TABLE_FILE)
    return stage.result(data_version, {
        "table": table_value(table[list(PUBLISHED_METRICS.columns)].round(4)),
        "best_checkpoint": {"metric": metric, "tie_rule": tie, "steps": summary["best"],
                            "indistinguishable_steps": summary["indistinguishable"]},
        "how_to_read": dg.MetadataValue.md(summary["metrics_notes"]),
        "against_base_model": summary["against_base_model"],
        "extractor_note": summary["extractor_note"],
        "curves": png_value(details / CURVES_FILE, "metric curves"),
        **{f"grid_{c}": png_value(details / grid_file(c), c) for c in p.classes},
    })


def _utility_sets(p: Params) -> tuple:
    layout = Layout(p.data_dir)
    return utility_inputs(layout, p.classes, p.steps, read_summary(layout.metrics_details, MetricsDetails)["best"])


def _classifier_utility_inputs(p: Params, _part: Part, _base_model) -> dict:
    return dict(sets=image_sets_hash(*_utility_sets(p)), utility=p["utility"], features=_cache(p).identity)


@stage_asset(reads=["metrics_summary", "square_crops", "augmented_crops", "synthetic_images"],
             inputs=_classifier_utility_inputs, summary=ClassifierUtilitySummary, code_version="1",
             resources=["base_model"], deps=["metrics_summary"], kinds={"pytorch", "csv"})
def classifier_utility(stage: Stage):
    """The question downstream teams ask: does adding these synthetic images to a training set make a classifier
    better on real slides? For every release candidate (step 0, every checkpoint, and each class's chosen
    checkpoint), the same classifier (utility.classifier) is trained with fixed seeds and budget on the real
    training crops, on real plus synthetic, and on synthetic only, and scored on the held-out, source-disjoint
    real crops: balanced accuracy, macro-F1 and the confusion matrix, each with a bootstrap interval."""
    from histo_assets.core.classifier_utility import BALANCED_ACCURACY, PLOT_FILE, RESULTS_FILE, write_candidates

    p, cache = stage.params, _cache(stage.params)
    summary = stage.build_or_reuse(lambda staging: write_candidates(
        staging, *_utility_sets(p), utility_settings(p), p.steps,
        featurize=lambda paths: cache.features(paths, log=stage.log).features, features_label=cache.info.name,
        log=stage.log))
    table = pd.read_csv(stage.out / RESULTS_FILE)
    return stage.result(summary["fingerprint"], {
        "summary": dg.MetadataValue.md(summary["notes"]),
        "plot": png_value(stage.out / PLOT_FILE, "classifier utility per release candidate"),
        "table": table_value(table[table["metric"].eq(BALANCED_ACCURACY)][SHOWN_UTILITY_COLUMNS].round(3)),
        "verdicts": summary["verdicts"],
        "best_step_by_utility": summary["best_step_by_utility"],
    })
