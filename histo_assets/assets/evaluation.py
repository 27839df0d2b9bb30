"""FID, KID, IS, precision/recall and memorisation for every checkpoint, and the summary across classes."""

from pathlib import Path

import dagster as dg
from PIL import Image

from histo_assets.assets.stage import Part, Stage, StageSpec, stage_asset
from histo_assets.core.evaluation import (
    CURVES_FILE,
    METRICS_TABLE_FILE,
    checkpoint_row,
    combined_rows,
    feature_cache,
    generated_files,
    grid_file,
    metrics_table,
    real_sets,
    scoring_settings,
    write_metrics_summary,
)
from histo_assets.core.io import stable_hash
from histo_assets.core.layout import Layout
from histo_assets.core.previews import markdown_image, markdown_table
from histo_assets.core.schemas import (
    METRICS_TABLE,
    PUBLISHED_METRICS,
    CheckpointMetricsSummary,
    MetricsDetails,
    MetricsSummarySummary,
    SyntheticImagesSummary,
)
from histo_assets.core.stage import output_settings, read_summary
from histo_assets.core.steps import evaluated_steps
from histo_assets.params import Params
from histo_assets.partitions import Partitions, by_tissue_class
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets.settings import metric_settings

GROUP = "evaluation"
CHECKPOINT_METRICS_VERSION = "2"
METRICS_SUMMARY_VERSION = "2"
# Row values that are None where a metric could not be computed: numeric metadata shows them as NaN.
OPTIONAL_METRICS = ("fid", "kid_mean", "is_mean", "precision", "recall")
INTERVALS = ("fid_ci_low", "fid_ci_high", "kid_ci_low", "kid_ci_high", "confidence_level")


def _checkpoint_metrics_inputs(p: Params, part: Part, _base_model) -> dict:
    layout = Layout(p.data_dir)
    reference, train = real_sets(layout, part.tissue_class)
    cache = feature_cache(p["metrics"], layout, p.source.parent, p.seed)
    generated = read_summary(layout.synthetic_images(part.tissue_class, part.step), SyntheticImagesSummary)
    return dict(generated=generated["data_version"],
                reference=cache.path_for(reference).name, train=cache.path_for(train).name,
                metrics=scoring_settings(p["metrics"]), seed=p.seed, code=CHECKPOINT_METRICS_VERSION)


def _scored(p: Params) -> dict[tuple[str, int], dict | None]:
    layout = Layout(p.data_dir)
    return {(c, step): read_summary(layout.checkpoint_metrics(c, step), CheckpointMetricsSummary)
            for c in p.classes for step in evaluated_steps(p["training"]["checkpoint_steps"])}


def _metrics_summary_inputs(p: Params, _part: Part, _base_model) -> dict:
    return dict(rows=[found["fingerprint"] for found in _scored(p).values()], metrics=output_settings(p["metrics"]),
                classes=p.classes, code=METRICS_SUMMARY_VERSION)


STAGES = {
    "metrics_summary": StageSpec(lambda at, _part: at.metrics_summary, lambda _at, _part: [], _metrics_summary_inputs,
                                 MetricsSummarySummary),
    "checkpoint_metrics": StageSpec(
        lambda at, part: at.checkpoint_metrics(part.tissue_class, part.step),
        lambda at, part: [at.synthetic_images(part.tissue_class, part.step), at.augmented_crops(part.tissue_class),
                          at.square_crops(part.tissue_class)],
        _checkpoint_metrics_inputs,
        CheckpointMetricsSummary,
    ),
}


def _checkpoint_metrics(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
    @stage_asset(
        p,
        partitions_def=partitions.class_and_step,
        group_name=GROUP,
        code_version=CHECKPOINT_METRICS_VERSION,
        deps=[
            "synthetic_images",
            dg.AssetDep("augmented_crops", partition_mapping=by_tissue_class),
            dg.AssetDep("square_crops", partition_mapping=by_tissue_class),
        ],
        kinds={"pytorch", "parquet"},
        description="One metric row for one class and checkpoint: FID and KID against the class's held-out real "
        "crops (and FID against the training images), IS where Inception logits exist, k-NN precision/recall and "
        "the memorisation rate against training images. Real-set features are cached by content hash.",
    )
    def checkpoint_metrics(context: dg.AssetExecutionContext, params: ParamsResource,
                           object_store: ObjectStoreResource, base_model: BaseModelResource):
        base_model.apply_threads()
        stage = Stage.start(context, params, object_store, STAGES["checkpoint_metrics"])
        p, layout, (tissue_class, step) = stage.params, stage.layout, (stage.part.tissue_class, stage.part.step)

        def build(staging: Path) -> dict:
            reference, train = real_sets(layout, tissue_class)
            cache = feature_cache(p["metrics"], layout, p.source.parent, p.seed)
            return {"row": checkpoint_row(cache, generated_files(layout, tissue_class, step), reference, train,
                                          metric_settings(p), tissue_class=tissue_class, step=step,
                                          log=stage.log)}

        row = stage.build_or_reuse(build)["row"]
        stage.log(f"{tissue_class} step {step}: FID {row['fid']} [{row['fid_ci_low']}, {row['fid_ci_high']}], "
                  f"KID {row['kid_mean']} [{row['kid_ci_low']}, {row['kid_ci_high']}] ({row['extractor']}; "
                  f"flags: {row['flags'] or 'none'})")
        return dg.MaterializeResult(
            metadata={
                **{name: float("nan") if row[name] is None else row[name] for name in OPTIONAL_METRICS},
                "memorisation_rate": row["memorisation_rate"],
                "n_generated / n_reference": f"{row['n_generated']} / {row['n_reference']}",
                "feature_dim": row["feature_dim"],
                "intervals": dg.MetadataValue.json({name: row[name] for name in INTERVALS}),
                "flags": row["flags"] or "none",
                **{name: row[name] for name in ("extractor", "comparable_with", "preprocessing", "is_note")},
                "note": row["extractor_note"],
                "reused_unchanged_output": stage.reused,
            },
            data_version=dg.DataVersion(stable_hash(row)),
        )

    return checkpoint_metrics


def _metrics_summary(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
    @stage_asset(
        p,
        group_name=GROUP,
        code_version=METRICS_SUMMARY_VERSION,
        deps=["checkpoint_metrics"],
        kinds={"parquet", "matplotlib"},
        description="All checkpoint metrics in one table, plus an 'all' row per step with every class pooled (the "
        "thesis's Table 3.6); the best checkpoint per class by metrics.best_checkpoint_metric; FID/KID/IS-versus-step "
        "plots and originals-versus-generated grids. Written as DVC metrics (metrics.json) and plots (metrics.csv).",
    )
    def metrics_summary(context: dg.AssetExecutionContext, params: ParamsResource,
                        object_store: ObjectStoreResource, base_model: BaseModelResource):
        base_model.apply_threads()
        stage = Stage.start(context, params, object_store, STAGES["metrics_summary"])
        p, layout = stage.params, stage.layout
        steps = evaluated_steps(p["training"]["checkpoint_steps"])
        object_store.pull(p.data_dir, *(folder for c in p.classes for folder in (
            layout.square_crops(c), layout.augmented_crops(c),
            *(f for step in steps for f in (layout.synthetic_images(c, step), layout.checkpoint_metrics(c, step))),
        )), log=stage.log)
        scored = _scored(p)
        for (tissue_class, step), found in scored.items():
            if found is None:
                raise dg.Failure(f"checkpoint_metrics missing for {tissue_class} step {step}; materialise it first")
        metric, tie = p["metrics"]["best_checkpoint_metric"], p["metrics"]["best_checkpoint_tie"]

        def build(_out: Path) -> dict:
            cache = feature_cache(p["metrics"], layout, p.source.parent, p.seed)
            rows = [found["row"] for found in scored.values()]
            rows += combined_rows(cache, layout, p.classes, steps, metric_settings(p))
            write_metrics_summary(layout, metrics_table(rows, metric), p.classes, steps, metric, tie)
            return {"data_version": stable_hash(rows)}

        data_version = stage.build_or_reuse(build, in_place=True)["data_version"]
        details = layout.metrics_details
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


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    return [_checkpoint_metrics(p, partitions), _metrics_summary(p, partitions)]
