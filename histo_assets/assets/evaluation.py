"""FID, KID, IS, precision/recall and memorisation for every checkpoint, the summary across classes, and whether
a release candidate's synthetic images help a classifier on real held-out crops."""

import dagster as dg
import pandas as pd
from PIL import Image

from histo_assets.core.classifier_utility import BALANCED_ACCURACY, PLOT_FILE, RESULTS_FILE
from histo_assets.core.classifier_utility import image_sets_hash, utility_inputs, write_candidates
from histo_assets.core.evaluation import CURVES_FILE, METRICS_TABLE_FILE, FeatureCache, checkpoint_row, feature_cache
from histo_assets.core.evaluation import generated_files, grid_file, real_sets, scored_checkpoints, scoring_settings
from histo_assets.core.evaluation import summarise_rows
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import Layout
from histo_assets.core.previews import markdown_image, markdown_png_file, markdown_table
from histo_assets.core.schemas import METRICS_TABLE, PUBLISHED_METRICS, CheckpointMetricsSummary
from histo_assets.core.schemas import ClassifierUtilitySummary, MetricsDetails, MetricsSummarySummary, SyntheticImagesSummary
from histo_assets.core.stage import output_settings, read_summary
from histo_assets.core.steps import evaluated_steps
from histo_assets.params import Params
from histo_assets.partitions import Partitions, by_tissue_class
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets.settings import metric_settings, utility_settings
from histo_assets.stage import Part, Stage, StageSpec, stage_asset

GROUP = "evaluation"
# Row values that are None where a metric could not be computed: numeric metadata shows them as NaN.
OPTIONAL_METRICS = ("fid", "kid_mean", "is_mean", "precision", "recall")
INTERVALS = ("fid_ci_low", "fid_ci_high", "kid_ci_low", "kid_ci_high", "confidence_level")
SHOWN_UTILITY_COLUMNS = ["candidate", "classifier", "variant", "value", "ci_low", "ci_high", "verdict"]


def _cache(p: Params) -> FeatureCache:
    return feature_cache(p["metrics"], Layout(p.data_dir), p.source.parent, p.seed)


def _steps(p: Params) -> list[int]:
    return evaluated_steps(p["training"]["checkpoint_steps"])


def _checkpoint_metrics_inputs(p: Params, part: Part, _base_model) -> dict:
    layout, cache = Layout(p.data_dir), _cache(p)
    reference, train = real_sets(layout, part.tissue_class)
    generated = read_summary(layout.synthetic_images(part.tissue_class, part.step), SyntheticImagesSummary)
    return dict(generated=generated["data_version"], reference=cache.path_for(reference).name,
                train=cache.path_for(train).name, metrics=scoring_settings(p["metrics"]), seed=p.seed)


def _metrics_summary_inputs(p: Params, _part: Part, _base_model) -> dict:
    rows = [found["fingerprint"] for found in scored_checkpoints(Layout(p.data_dir), p.classes, _steps(p)).values()]
    return dict(rows=rows, metrics=output_settings(p["metrics"]), classes=p.classes)


def _utility_sets(p: Params) -> tuple:
    layout = Layout(p.data_dir)
    return utility_inputs(layout, p.classes, _steps(p), read_summary(layout.metrics_details, MetricsDetails)["best"])


def _classifier_utility_inputs(p: Params, _part: Part, _base_model) -> dict:
    return dict(sets=image_sets_hash(*_utility_sets(p)), utility=p["utility"], features=_cache(p).identity)


STAGES = {
    "checkpoint_metrics": StageSpec(
        lambda at, part: at.checkpoint_metrics(part.tissue_class, part.step),
        lambda at, part: [at.synthetic_images(part.tissue_class, part.step), at.augmented_crops(part.tissue_class),
                          at.square_crops(part.tissue_class)],
        _checkpoint_metrics_inputs, CheckpointMetricsSummary, code_version="2"),
    # The two stages across classes read folders that depend on params' classes and steps: their assets pull them.
    "metrics_summary": StageSpec(lambda at, _part: at.metrics_summary, lambda _at, _part: [], _metrics_summary_inputs,
                                 MetricsSummarySummary, code_version="2"),
    "classifier_utility": StageSpec(lambda at, _part: at.classifier_utility, lambda at, _part: [at.metrics_summary],
                                    _classifier_utility_inputs, ClassifierUtilitySummary, code_version="1"),
}


def _pull_images(stage: Stage, object_store: ObjectStoreResource, *, with_metrics: bool) -> None:
    """Every class's crops and every step's images (and their scores), which the stages across classes read."""
    at = stage.layout
    object_store.pull(stage.params.data_dir, *(folder for c in stage.params.classes for folder in (
        at.square_crops(c), at.augmented_crops(c), *(at.synthetic_images(c, step) for step in _steps(stage.params)),
        *(at.checkpoint_metrics(c, step) for step in _steps(stage.params) if with_metrics))), log=stage.log)


def _checkpoint_metrics(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
    @stage_asset(p, STAGES["checkpoint_metrics"], partitions_def=partitions.class_and_step, group_name=GROUP,
                 deps=["synthetic_images", dg.AssetDep("augmented_crops", partition_mapping=by_tissue_class),
                       dg.AssetDep("square_crops", partition_mapping=by_tissue_class)], kinds={"pytorch", "parquet"})
    def checkpoint_metrics(context: dg.AssetExecutionContext, params: ParamsResource,
                           object_store: ObjectStoreResource, base_model: BaseModelResource):
        """One metric row for one class and checkpoint: FID and KID against the class's held-out real crops (and FID
        against the training images), IS where Inception logits exist, k-NN precision/recall and the memorisation
        rate against training images. Real-set features are cached by content hash."""
        base_model.apply_threads()
        stage = Stage.start(context, params, object_store, STAGES["checkpoint_metrics"])
        p, layout, (tissue_class, step) = stage.params, stage.layout, (stage.part.tissue_class, stage.part.step)
        row = stage.build_or_reuse(lambda _staging: {"row": checkpoint_row(
            _cache(p), generated_files(layout, tissue_class, step), *real_sets(layout, tissue_class), metric_settings(p),
            tissue_class=tissue_class, step=step, log=stage.log)})["row"]
        stage.log(f"{tissue_class} step {step}: FID {row['fid']} [{row['fid_ci_low']}, {row['fid_ci_high']}], "
                  f"KID {row['kid_mean']} [{row['kid_ci_low']}, {row['kid_ci_high']}] ({row['extractor']}; "
                  f"flags: {row['flags'] or 'none'})")
        return stage.result(stable_hash(row), {
            **{name: float("nan") if row[name] is None else row[name] for name in OPTIONAL_METRICS},
            "memorisation_rate": row["memorisation_rate"],
            "n_generated / n_reference": f"{row['n_generated']} / {row['n_reference']}",
            "feature_dim": row["feature_dim"],
            "intervals": dg.MetadataValue.json({name: row[name] for name in INTERVALS}),
            "flags": row["flags"] or "none",
            **{name: row[name] for name in ("extractor", "comparable_with", "preprocessing", "is_note")},
            "note": row["extractor_note"],
        })

    return checkpoint_metrics


def _metrics_summary(p: Params) -> dg.AssetsDefinition:
    @stage_asset(p, STAGES["metrics_summary"], group_name=GROUP, deps=["checkpoint_metrics"], kinds={"parquet", "matplotlib"})
    def metrics_summary(context: dg.AssetExecutionContext, params: ParamsResource,
                        object_store: ObjectStoreResource, base_model: BaseModelResource):
        """All checkpoint metrics in one table, plus an 'all' row per step with every class pooled (the thesis's Table
        3.6); the best checkpoint per class by metrics.best_checkpoint_metric; FID/KID/IS-versus-step plots and
        originals-versus-generated grids. Written as DVC metrics (metrics.json) and plots (metrics.csv)."""
        base_model.apply_threads()
        stage = Stage.start(context, params, object_store, STAGES["metrics_summary"])
        _pull_images(stage, object_store, with_metrics=True)
        p, details = stage.params, stage.layout.metrics_details
        scored = scored_checkpoints(stage.layout, p.classes, _steps(p))
        missing = [f"{c} step {step}" for (c, step), found in scored.items() if found is None]
        if missing:
            raise dg.Failure(f"checkpoint_metrics missing for {', '.join(missing)}; materialise it first")
        metric, tie = p["metrics"]["best_checkpoint_metric"], p["metrics"]["best_checkpoint_tie"]
        data_version = stage.build_or_reuse(lambda _out: {"data_version": summarise_rows(
            _cache(p), stage.layout, [found["row"] for found in scored.values()], p.classes, _steps(p),
            metric_settings(p), metric, tie)}, in_place=True)["data_version"]
        summary, table = read_summary(details, MetricsDetails), METRICS_TABLE.read(details / METRICS_TABLE_FILE)
        return stage.result(data_version, {
            "table": dg.MetadataValue.md(markdown_table(table[list(PUBLISHED_METRICS.columns)].round(4))),
            "best_checkpoint": dg.MetadataValue.json({"metric": metric, "tie_rule": tie, "steps": summary["best"],
                                                      "indistinguishable_steps": summary["indistinguishable"]}),
            "how_to_read": dg.MetadataValue.md(summary["metrics_notes"]),
            "against_base_model": dg.MetadataValue.json(summary["against_base_model"]),
            "extractor_note": summary["extractor_note"],
            "curves": dg.MetadataValue.md(markdown_image(Image.open(details / CURVES_FILE), "metric curves")),
            **{f"grid_{c}": dg.MetadataValue.md(markdown_image(Image.open(details / grid_file(c)), c)) for c in p.classes},
        })

    return metrics_summary


def _classifier_utility(p: Params) -> dg.AssetsDefinition:
    @stage_asset(p, STAGES["classifier_utility"], name="classifier_utility", group_name=GROUP,
                 deps=["metrics_summary"], kinds={"pytorch", "csv"})
    def classifier_utility_asset(context: dg.AssetExecutionContext, params: ParamsResource,
                                 base_model: BaseModelResource, object_store: ObjectStoreResource):
        """The question downstream teams ask: does adding these synthetic images to a training set make a classifier
        better on real slides? For every release candidate (step 0, every checkpoint, and each class's chosen
        checkpoint), the same classifier (utility.classifier) is trained with fixed seeds and budget on the real
        training crops, on real plus synthetic, and on synthetic only, and scored on the held-out, source-disjoint
        real crops: balanced accuracy, macro-F1 and the confusion matrix, each with a bootstrap interval."""
        base_model.apply_threads()
        stage = Stage.start(context, params, object_store, STAGES["classifier_utility"])
        _pull_images(stage, object_store, with_metrics=False)
        p, cache = stage.params, _cache(stage.params)
        summary = stage.build_or_reuse(lambda staging: write_candidates(
            staging, *_utility_sets(p), utility_settings(p), _steps(p),
            featurize=lambda paths: cache.features(paths, log=stage.log).features, features_label=cache.info.name,
            log=stage.log))
        table = pd.read_csv(stage.out / RESULTS_FILE)
        return stage.result(summary["fingerprint"], {
            "summary": dg.MetadataValue.md(summary["notes"]),
            "plot": dg.MetadataValue.md(markdown_png_file(stage.out / PLOT_FILE, "classifier utility per release candidate")),
            "table": dg.MetadataValue.md(markdown_table(
                table[table["metric"].eq(BALANCED_ACCURACY)][SHOWN_UTILITY_COLUMNS].round(3))),
            "verdicts": dg.MetadataValue.json(summary["verdicts"]),
            "best_step_by_utility": summary["best_step_by_utility"],
        })

    return classifier_utility_asset


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    return [_checkpoint_metrics(p, partitions), _metrics_summary(p), _classifier_utility(p)]
