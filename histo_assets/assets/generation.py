"""Synthetic images from every hypernetwork checkpoint, one partition per tissue class x step."""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.assets.checks import image_check_results, image_check_specs
from histo_assets.assets.stage import Stage, stage_asset
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, INDEX, PREVIEW, Layout
from histo_assets.core.previews import markdown_png_file
from histo_assets.core.sampling import GenerationSettings, write_checkpoint_images, write_imported_images
from histo_assets.core.stage import read_summary
from histo_assets.core.steps import BASELINE_STEP
from histo_assets.params import Params
from histo_assets.partitions import Partitions, by_tissue_class, class_and_step
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource

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


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    @stage_asset(
        p, on_gpu=True,
        partitions_def=partitions.class_and_step,
        group_name=GROUP,
        code_version=SYNTHETIC_IMAGES_VERSION,
        deps=[dg.AssetDep("hypernetwork_checkpoints", partition_mapping=by_tissue_class), BASE_MODEL_ASSET],
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
        tissue_class, step = class_and_step(context)
        stage = Stage.start(context, params, object_store, lambda at: at.synthetic_images(tissue_class, step),
                            lambda at: at.hypernetwork_checkpoints(tissue_class))
        p = stage.params
        baseline = step == BASELINE_STEP
        checkpoint = BASELINE_CHECKPOINT if baseline else checkpoint_entry(p, tissue_class, step)
        settings = GenerationSettings.from_params(p["generation"], p.resolution)
        count = int(p["generation"]["images_per_checkpoint"])
        checkpoint_path = None if baseline else stage.layout.hypernetwork_checkpoints(tissue_class) / checkpoint["file"]

        def build(staging: Path) -> dict:
            images = write_checkpoint_images(staging, base_model.load(p), checkpoint_path, tissue_class=tissue_class,
                                             step=step, count=count, settings=settings, master_seed=p.seed, log=stage.log)
            return images | {"checkpoint_file": checkpoint["file"], "checkpoint_sha256": checkpoint["sha256"],
                             "training_set": checkpoint["training_set"], "run_id": context.run_id}

        summary = stage.build_or_reuse(
            build, checkpoint=checkpoint["sha256"], generation=p["generation"], resolution=p.resolution,
            base_model=base_model.identity(p), seed=p.seed, code=SYNTHETIC_IMAGES_VERSION,
        )
        index = pd.read_parquet(stage.out / INDEX)
        yield stage.result(summary["data_version"], {
            "images": summary["count"],
            "checkpoint": summary["checkpoint_file"],
            "checkpoint_sha256": summary["checkpoint_sha256"],
            "prompt": index["prompt"].iloc[0] if len(index) else "",
            "negative_prompt": settings.negative_prompt,
            "sampler": f"{settings.sampler}, {settings.steps} steps, CFG {settings.cfg_scale}",
            "preview": dg.MetadataValue.md(markdown_png_file(stage.out / PREVIEW, f"{tissue_class} step {step}")),
        })
        yield from image_check_results("synthetic_images", stage.out / IMAGES, p.resolution, count)

    @stage_asset(
        p, on_gpu=True,
        partitions_def=partitions.tissue_class,
        group_name=GROUP,
        code_version=IMPORTED_SYNTHETIC_IMAGES_VERSION,
        deps=["imported_hypernetwork_index", BASE_MODEL_ASSET],
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
        tissue_class = context.partition_key
        stage = Stage.start(context, params, object_store, lambda at: at.imported_synthetic_images(tissue_class),
                            lambda at: at.imported_hypernetwork_index(tissue_class),
                            lambda at: at.imported_hypernetworks_inbox(tissue_class))
        p = stage.params
        imported = pd.read_parquet(stage.layout.imported_hypernetwork_index(tissue_class) / INDEX)

        def build(staging: Path) -> dict:
            counts = write_imported_images(
                staging, base_model.load(p) if len(imported) else None, imported, tissue_class=tissue_class,
                count=int(p["generation"]["images_per_checkpoint"]),
                settings=GenerationSettings.from_params(p["generation"], p.resolution), master_seed=p.seed, log=stage.log,
            )
            return {"images": counts, "run_id": context.run_id}

        summary = stage.build_or_reuse(
            build, files=sorted(imported["sha256"]), generation=p["generation"], resolution=p.resolution,
            base_model=base_model.identity(p), seed=p.seed, code=IMPORTED_SYNTHETIC_IMAGES_VERSION,
        )
        return stage.result(summary["fingerprint"], {
            "hypernetworks": len(summary["images"]),
            "images": dg.MetadataValue.json(summary["images"]),
        })

    return [synthetic_images, imported_synthetic_images]
