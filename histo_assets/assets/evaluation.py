"""FID, KID, IS, precision/recall and memorisation for every checkpoint, and the summary across classes."""

import dagster as dg
import pandas as pd
from PIL import Image

from histo_assets.assets import FOLLOW_UPSTREAM
from histo_assets.assets.generation import synthetic_images
from histo_assets.assets.ingest import augmented_crops, square_crops
from histo_assets.core.evaluation import (
    SUMMARY_ONLY_SETTINGS,
    TABLE_COLUMNS,
    FeatureCache,
    MetricSettings,
    baseline_notes,
    baseline_verdicts,
    best_checkpoints,
    dvc_metrics,
    metric_series,
    metrics_notes,
    overlapping_steps,
    score_checkpoint,
)
from histo_assets.core.features import build_extractor
from histo_assets.core.io import atomic_save_png, atomic_write_json, atomic_write_parquet, atomic_write_text, stable_hash
from histo_assets.core.plots import metric_curves
from histo_assets.core.previews import contact_sheet, markdown_image, markdown_table
from histo_assets.core.seeding import derive_seed
from histo_assets.core.stage import current_summary, fingerprint, read_summary
from histo_assets.core.steps import BASELINE_STEP, evaluated_steps
from histo_assets.core.layout import HOLDOUT, IMAGES, SUMMARY, Layout
from histo_assets.params import Params
from histo_assets.partitions import by_tissue_class, class_and_step, class_and_step_partitions
from histo_assets.resources import STAGE_CONFIG_SCHEMA, BaseModelResource, ObjectStoreResource, ParamsResource

GROUP = "evaluation"
CHECKPOINT_METRICS_VERSION = "2"
METRICS_SUMMARY_VERSION = "2"
ALL_CLASSES = "all"
GRID_IMAGES = 8


def metric_settings(p: Params) -> MetricSettings:
    return MetricSettings.from_params(p["metrics"], derive_seed(p.seed, "metrics"))


def feature_cache(p: Params) -> FeatureCache:
    weights = p["metrics"]["inception_weights"]
    if weights is not None:
        weights = str((p.source.parent / weights).resolve())
    extractor, info = build_extractor(weights, derive_seed(p.seed, "feature_extractor"))
    return FeatureCache(Layout(p.data_dir).cache / "features", extractor, info, int(p["metrics"]["batch_size"]))


def real_sets(layout: Layout, tissue_class: str) -> tuple[list, list]:
    """(held-out crops: the reference set, training images: what the hypernetwork saw)."""
    holdout = pd.read_parquet(layout.augmented_crops(tissue_class) / HOLDOUT)
    reference = [layout.square_crops(tissue_class) / IMAGES / name for name in holdout["crop_file"]]
    train = sorted((layout.augmented_crops(tissue_class) / IMAGES).glob("*.png"))
    return reference, train


def generated_files(layout: Layout, tissue_class: str, step: int) -> list:
    return sorted((layout.synthetic_images(tissue_class, step) / IMAGES).glob("*.png"))


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=class_and_step_partitions,
    group_name=GROUP,
    code_version=CHECKPOINT_METRICS_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[
        synthetic_images,
        dg.AssetDep(augmented_crops, partition_mapping=by_tissue_class),
        dg.AssetDep(square_crops, partition_mapping=by_tissue_class),
    ],
    kinds={"pytorch", "parquet"},
    description="One metric row for one class and checkpoint: FID and KID against the class's held-out real "
    "crops (and FID against the training images), IS where Inception logits exist, k-NN precision/recall and "
    "the memorisation rate against training images. Real-set features are cached by content hash.",
)
def checkpoint_metrics(context: dg.AssetExecutionContext, params: ParamsResource,
                       object_store: ObjectStoreResource, base_model: BaseModelResource):
    base_model.apply_threads()
    p = params.load_for(context)
    tissue_class, step = class_and_step(context)
    layout = Layout(p.data_dir)
    out = layout.checkpoint_metrics(tissue_class, step)
    object_store.pull(
        p.data_dir, layout.synthetic_images(tissue_class, step), layout.augmented_crops(tissue_class),
        layout.square_crops(tissue_class), out, log=context.log.info,
    )
    reference, train = real_sets(layout, tissue_class)
    generated = generated_files(layout, tissue_class, step)
    cache = feature_cache(p)
    stage_fingerprint = fingerprint(
        generated=read_summary(layout.synthetic_images(tissue_class, step))["data_version"],
        reference=cache.path_for(reference).name, train=cache.path_for(train).name,
        metrics={k: v for k, v in p["metrics"].items() if k not in SUMMARY_ONLY_SETTINGS}, seed=p.seed,
        code=CHECKPOINT_METRICS_VERSION,
    )
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if not reused:
        row = score_checkpoint(
            cache.features(generated, log=context.log.info), cache.features(reference, log=context.log.info),
            cache.features(train, log=context.log.info), cache.info, metric_settings(p),
        )
        row = {"tissue_class": tissue_class, "step": step} | row
        summary = {"fingerprint": stage_fingerprint, "row": row}
        atomic_write_json(out / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    row = summary["row"]
    context.log.info(f"{tissue_class} step {step}: FID {row['fid']} [{row['fid_ci_low']}, {row['fid_ci_high']}], "
                     f"KID {row['kid_mean']} [{row['kid_ci_low']}, {row['kid_ci_high']}] ({row['extractor']}; "
                     f"flags: {row['flags'] or 'none'})")
    return dg.MaterializeResult(
        metadata={
            "fid": row["fid"] if row["fid"] is not None else float("nan"),
            "kid_mean": row["kid_mean"] if row["kid_mean"] is not None else float("nan"),
            "is_mean": row["is_mean"] if row["is_mean"] is not None else float("nan"),
            "precision": row["precision"] if row["precision"] is not None else float("nan"),
            "recall": row["recall"] if row["recall"] is not None else float("nan"),
            "memorisation_rate": row["memorisation_rate"],
            "n_generated / n_reference": f"{row['n_generated']} / {row['n_reference']}",
            "feature_dim": row["feature_dim"],
            "intervals": dg.MetadataValue.json(
                {k: row[k] for k in ("fid_ci_low", "fid_ci_high", "kid_ci_low", "kid_ci_high", "confidence_level")}
            ),
            "flags": row["flags"] or "none",
            "extractor": row["extractor"],
            "comparable_with": row["comparable_with"],
            "preprocessing": row["preprocessing"],
            "note": row["extractor_note"],
            "is_note": row["is_note"],
            "reused_unchanged_output": reused,
        },
        data_version=dg.DataVersion(stable_hash(row)),
    )


def combined_rows(p: Params, layout: Layout, cache: FeatureCache, steps: list[int]) -> list[dict]:
    """Table 3.6 of the thesis: all classes pooled, per step (from cached features)."""
    rows = []
    for step in steps:
        generated = reference = train = None
        for tissue_class in p.classes:
            ref_files, train_files = real_sets(layout, tissue_class)
            parts = [cache.features(generated_files(layout, tissue_class, step)), cache.features(ref_files), cache.features(train_files)]
            generated, reference, train = (
                parts if generated is None else [a.concat(b) for a, b in zip((generated, reference, train), parts)]
            )
        row = score_checkpoint(generated, reference, train, cache.info, metric_settings(p))
        rows.append({"tissue_class": ALL_CLASSES, "step": step} | row)
    return rows


def comparison_grid(layout: Layout, tissue_class: str, steps: list[int]) -> Image.Image:
    """Originals above generated images at every step, like the thesis's Figure 3.5."""
    originals = sorted((layout.augmented_crops(tissue_class) / IMAGES).glob("orig-*.png"))[:GRID_IMAGES]
    rows, labels = [originals + [None] * (GRID_IMAGES - len(originals))], ["original"]
    for step in steps:
        files = generated_files(layout, tissue_class, step)[:GRID_IMAGES]
        rows.append(files + [None] * (GRID_IMAGES - len(files)))
        labels.append("base model" if step == BASELINE_STEP else f"step {step}")
    blank = Image.new("RGB", (8, 8), (255, 255, 255))
    cells = [Image.open(f) if f is not None else blank for row in rows for f in row]
    return contact_sheet(cells, columns=GRID_IMAGES, thumb=96, row_labels=labels)


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    group_name=GROUP,
    code_version=METRICS_SUMMARY_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[checkpoint_metrics],
    kinds={"parquet", "matplotlib"},
    description="All checkpoint metrics in one table, plus an 'all' row per step with every class pooled (the "
    "thesis's Table 3.6); the best checkpoint per class by metrics.best_checkpoint_metric; FID/KID/IS-versus-step "
    "plots and originals-versus-generated grids. Written as DVC metrics (metrics.json) and plots (metrics.csv).",
)
def metrics_summary(context: dg.AssetExecutionContext, params: ParamsResource,
                    object_store: ObjectStoreResource, base_model: BaseModelResource):
    base_model.apply_threads()
    p = params.load_for(context)
    layout = Layout(p.data_dir)
    steps = evaluated_steps(p["training"]["checkpoint_steps"])
    for tissue_class in p.classes:
        object_store.pull(
            p.data_dir, layout.square_crops(tissue_class), layout.augmented_crops(tissue_class),
            *(folder for step in steps for folder in (layout.synthetic_images(tissue_class, step), layout.checkpoint_metrics(tissue_class, step))),
            log=context.log.info,
        )
    rows = []
    for tissue_class in p.classes:
        for step in steps:
            summary = read_summary(layout.checkpoint_metrics(tissue_class, step))
            if summary is None:
                raise dg.Failure(f"checkpoint_metrics missing for {tissue_class} step {step}; materialise it first")
            rows.append(summary["row"])
    cache = feature_cache(p)
    rows += combined_rows(p, layout, cache, steps)
    table = pd.DataFrame(rows)
    metric, tie = p["metrics"]["best_checkpoint_metric"], p["metrics"]["best_checkpoint_tie"]
    table["overlapping_steps"] = overlapping_steps(table, metric)
    # Step 0 is scored, never chosen: its images carry no class-specific training.
    choices = best_checkpoints(table[(table["tissue_class"] != ALL_CLASSES) & (table["step"] != BASELINE_STEP)], metric, tie)
    verdicts = baseline_verdicts(table, choices, metric)
    best = {c: choice.step for c, choice in choices.items()}
    indistinguishable = {c: choice.indistinguishable for c, choice in choices.items()}
    notes = metrics_notes(table, choices, metric, tie) + "\n\n" + baseline_notes(verdicts, metric)
    out, details = layout.metrics_summary, layout.metrics_details
    extractor_note = table["extractor_note"].iloc[0]
    curves = metric_curves(
        metric_series(table, ("fid", "kid_mean", "is_mean")), details / "curves.png",
        title=f"metrics vs training step ({table['extractor'].iloc[0]}, comparable with {table['comparable_with'].iloc[0]})",
    )
    grids = {}
    for tissue_class in p.classes:
        grid = comparison_grid(layout, tissue_class, steps)
        atomic_save_png(details / f"grid_{tissue_class}.png", grid)
        grids[tissue_class] = grid
    atomic_write_parquet(details / "metrics.parquet", table)
    atomic_write_text(out / "metrics.csv", table[TABLE_COLUMNS].to_csv(index=False))
    for tissue_class, group in table.groupby("tissue_class"):
        atomic_write_text(out / "plots" / f"{tissue_class}.csv", group[TABLE_COLUMNS[1:]].sort_values("step").to_csv(index=False))
    atomic_write_json(out / "metrics.json", dvc_metrics(table, choices, metric, tie, verdicts))
    atomic_write_json(details / SUMMARY, {"best": best, "best_by": metric, "tie_rule": tie, "indistinguishable": indistinguishable,
                                          "steps": steps, "extractor_note": extractor_note, "metrics_notes": notes,
                                          "against_base_model": verdicts})
    object_store.push(p.data_dir, out, log=context.log.info)
    shown = table[TABLE_COLUMNS].round(4)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "table": dg.MetadataValue.md(markdown_table(shown)),
            "best_checkpoint": dg.MetadataValue.json({"metric": metric, "tie_rule": tie, "steps": best,
                                                      "indistinguishable_steps": indistinguishable}),
            "how_to_read": dg.MetadataValue.md(notes),
            "against_base_model": dg.MetadataValue.json(verdicts),
            "extractor_note": extractor_note,
            "curves": dg.MetadataValue.md(markdown_image(curves, "metric curves")),
            **{f"grid_{c}": dg.MetadataValue.md(markdown_image(g, c)) for c, g in grids.items()},
        },
        data_version=dg.DataVersion(stable_hash(rows)),
    )
