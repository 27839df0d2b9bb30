"""Synthetic images from every hypernetwork checkpoint, one partition per tissue class x step."""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.assets import FOLLOW_UPSTREAM, GPU_TAGS
from histo_assets.assets.base_model import base_model_asset
from histo_assets.assets.checks import image_check_results, image_check_specs
from histo_assets.assets.training import hypernetwork_checkpoints, imported_hypernetworks
from histo_assets.core.io import atomic_directory, atomic_write_json, stable_hash
from histo_assets.core.previews import markdown_png_file, write_preview
from histo_assets.core.sampling import GenerationSettings, generate_images, write_generation_index
from histo_assets.core.steps import BASELINE_STEP
from histo_assets.core.stage import current_summary, fingerprint, read_summary
from histo_assets.layout import IMAGES, INDEX, PREVIEW, SUMMARY, Layout
from histo_assets.params import Params
from histo_assets.partitions import by_tissue_class, class_and_step, class_and_step_partitions, tissue_class_partitions
from histo_assets.resources import STAGE_CONFIG_SCHEMA, BaseModelResource, ObjectStoreResource, ParamsResource

GROUP = "generation"
SYNTHETIC_IMAGES_VERSION = "2"
IMPORTED_SYNTHETIC_IMAGES_VERSION = "2"


# Step 0 is generated from the base model alone: no checkpoint file, and no training set behind it.
BASELINE_CHECKPOINT = {"file": None, "sha256": None, "training_set": None}


def checkpoint_entry(p: Params, tissue_class: str, step: int) -> dict:
    summary = read_summary(Layout(p.data_dir).hypernetwork_checkpoints(tissue_class))
    if summary is None:
        raise dg.Failure(f"class {tissue_class!r}: hypernetwork_checkpoints has not been materialised")
    for entry in summary["checkpoints"]:
        if int(entry["step"]) == step:
            return entry | {"name": summary["name"], "training_set": summary["training_set"]}
    raise dg.Failure(f"class {tissue_class!r}: no checkpoint for step {step}; materialise hypernetwork_checkpoints with these params")


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=class_and_step_partitions,
    group_name=GROUP,
    code_version=SYNTHETIC_IMAGES_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[dg.AssetDep(hypernetwork_checkpoints, partition_mapping=by_tissue_class), base_model_asset],
    pool="gpu",
    op_tags=GPU_TAGS,
    kinds={"diffusers", "png"},
    check_specs=image_check_specs("synthetic_images"),
    description="generation.images_per_checkpoint images from one checkpoint (thesis defaults: Euler, 20 steps, "
    "CFG 7, the training resolution, a negative prompt). Each image's seed derives from class, step and index; "
    "each PNG carries AUTOMATIC1111's `parameters` text chunk, so the WebUI's PNG Info reads it.",
)
def synthetic_images(
    context: dg.AssetExecutionContext,
    params: ParamsResource,
    base_model: BaseModelResource,
    object_store: ObjectStoreResource,
):
    p = params.load_for(context)
    tissue_class, step = class_and_step(context)
    layout = Layout(p.data_dir)
    out = layout.synthetic_images(tissue_class, step)
    object_store.pull(p.data_dir, layout.hypernetwork_checkpoints(tissue_class), out, log=context.log.info)
    baseline = step == BASELINE_STEP
    checkpoint = BASELINE_CHECKPOINT if baseline else checkpoint_entry(p, tissue_class, step)
    settings = GenerationSettings.from_params(p["generation"], p.resolution)
    count = int(p["generation"]["images_per_checkpoint"])
    stage_fingerprint = fingerprint(
        checkpoint=checkpoint["sha256"], generation=p["generation"], resolution=p.resolution,
        base_model=base_model.identity(p), seed=p.seed, code=SYNTHETIC_IMAGES_VERSION,
    )
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"{tissue_class} step {step}: checkpoint and params unchanged, reusing {out}")
    else:
        base = base_model.load(p)
        with atomic_directory(out) as staging:
            records = generate_images(
                base, None if baseline else layout.hypernetwork_checkpoints(tissue_class) / checkpoint["file"], staging / IMAGES,
                tissue_class=tissue_class, step=step, count=count, settings=settings, master_seed=p.seed,
                log=context.log.info,
            )
            write_generation_index(records, staging / INDEX)
            write_preview(staging / IMAGES, staging / PREVIEW)
            summary = {
                "fingerprint": stage_fingerprint,
                "count": len(records),
                "checkpoint_file": checkpoint["file"],
                "checkpoint_sha256": checkpoint["sha256"],
                "training_set": checkpoint["training_set"],
                "run_id": context.run_id,
                "data_version": stable_hash(sorted((r.file, r.sha256) for r in records)),
            }
            atomic_write_json(staging / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    index = pd.read_parquet(out / INDEX)
    preview_md = markdown_png_file(out / PREVIEW, f"{tissue_class} step {step}")
    yield dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "images": summary["count"],
            "checkpoint": summary["checkpoint_file"],
            "checkpoint_sha256": summary["checkpoint_sha256"],
            "prompt": index["prompt"].iloc[0] if len(index) else "",
            "negative_prompt": settings.negative_prompt,
            "sampler": f"{settings.sampler}, {settings.steps} steps, CFG {settings.cfg_scale}",
            "preview": dg.MetadataValue.md(preview_md),
            "reused_unchanged_output": reused,
        },
        data_version=dg.DataVersion(summary["data_version"]),
    )
    yield from image_check_results("synthetic_images", out / IMAGES, p.resolution, count)


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=tissue_class_partitions,
    group_name=GROUP,
    code_version=IMPORTED_SYNTHETIC_IMAGES_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[imported_hypernetworks, base_model_asset],
    pool="gpu",
    op_tags=GPU_TAGS,
    kinds={"diffusers", "png"},
    description="The same generation as synthetic_images, from each AUTOMATIC1111 hypernetwork a lab imported for "
    "this class (one folder per file, named by its stem; the step in file names is the step the file records).",
)
def imported_synthetic_images(
    context: dg.AssetExecutionContext,
    params: ParamsResource,
    base_model: BaseModelResource,
    object_store: ObjectStoreResource,
):
    p = params.load_for(context)
    tissue_class = context.partition_key
    layout = Layout(p.data_dir)
    out = layout.imported_synthetic_images(tissue_class)
    object_store.pull(
        p.data_dir, layout.imported_hypernetworks(tissue_class), layout.imported_hypernetworks_inbox(tissue_class), out,
        log=context.log.info,
    )
    imported = pd.read_parquet(layout.imported_hypernetworks(tissue_class) / INDEX)
    settings = GenerationSettings.from_params(p["generation"], p.resolution)
    count = int(p["generation"]["images_per_checkpoint"])
    stage_fingerprint = fingerprint(
        files=sorted(imported["sha256"]), generation=p["generation"], resolution=p.resolution,
        base_model=base_model.identity(p), seed=p.seed, code=IMPORTED_SYNTHETIC_IMAGES_VERSION,
    )
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if not reused:
        base = base_model.load(p) if len(imported) else None
        with atomic_directory(out) as staging:
            counts = {}
            for row in imported.itertuples():
                folder = staging / Path(row.file).stem
                records = generate_images(
                    base, Path(row.path), folder / IMAGES, tissue_class=tissue_class, step=int(row.step),
                    count=count, settings=settings, master_seed=p.seed, log=context.log.info,
                )
                write_generation_index(records, folder / INDEX)
                counts[row.file] = len(records)
            summary = {"fingerprint": stage_fingerprint, "images": counts, "run_id": context.run_id}
            atomic_write_json(staging / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "hypernetworks": len(summary["images"]),
            "images": dg.MetadataValue.json(summary["images"]),
            "reused_unchanged_output": reused,
        },
        data_version=dg.DataVersion(summary["fingerprint"]),
    )
