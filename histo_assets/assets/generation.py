"""Synthetic images from every hypernetwork checkpoint, one partition per tissue class x step."""

from pathlib import Path

import dagster as dg

from histo_assets.assets.checks import image_check_results, image_check_specs
from histo_assets.assets.stage import Part, Stage, StageSpec, stage_asset
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, INDEX, PREVIEW, Layout
from histo_assets.core.previews import markdown_png_file
from histo_assets.core.schemas import (
    GENERATION_INDEX,
    IMPORTED_HYPERNETWORK_INDEX,
    HypernetworkCheckpointsSummary,
    ImportedSyntheticImagesSummary,
    SyntheticImagesSummary,
)
from histo_assets.core.stage import read_summary
from histo_assets.core.steps import BASELINE_STEP
from histo_assets.params import Params
from histo_assets.partitions import Partitions, by_tissue_class
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets.settings import generation_settings

# core.sampling imports diffusers, so asset bodies import it when a run needs it: loading and unloading
# diffusers takes seconds that every CLI start and UI reload would otherwise pay.
GROUP = "generation"
SYNTHETIC_IMAGES_VERSION = "2"
IMPORTED_SYNTHETIC_IMAGES_VERSION = "2"


# Step 0 is generated from the base model alone: no checkpoint file, and no training set behind it.
BASELINE_CHECKPOINT = {"file": None, "sha256": None, "training_set": None}


def checkpoint_entry(p: Params, tissue_class: str, step: int) -> dict:
    summary = read_summary(Layout(p.data_dir).hypernetwork_checkpoints(tissue_class), HypernetworkCheckpointsSummary)
    if summary is None:
        raise dg.Failure(f"class {tissue_class!r}: hypernetwork_checkpoints has not been materialised")
    for entry in summary["checkpoints"]:
        if int(entry["step"]) == step:
            return entry | {"name": summary["name"], "training_set": summary["training_set"]}
    raise dg.Failure(f"class {tissue_class!r}: no checkpoint for step {step}; materialise hypernetwork_checkpoints with these params")


def _checkpoint(p: Params, part: Part) -> dict:
    return BASELINE_CHECKPOINT if part.step == BASELINE_STEP else checkpoint_entry(p, part.tissue_class, part.step)


def _synthetic_images_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    return dict(checkpoint=_checkpoint(p, part)["sha256"], generation=p["generation"], resolution=p.resolution,
                base_model=base_model.identity(p), seed=p.seed, code=SYNTHETIC_IMAGES_VERSION)


def _imported_synthetic_images_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    imported = IMPORTED_HYPERNETWORK_INDEX.read(Layout(p.data_dir).imported_hypernetwork_index(part.tissue_class) / INDEX)
    return dict(files=sorted(imported["sha256"]), generation=p["generation"], resolution=p.resolution,
                base_model=base_model.identity(p), seed=p.seed, code=IMPORTED_SYNTHETIC_IMAGES_VERSION)


STAGES = {
    "synthetic_images": StageSpec(lambda at, part: at.synthetic_images(part.tissue_class, part.step),
                                  lambda at, part: [at.hypernetwork_checkpoints(part.tissue_class)],
                                  _synthetic_images_inputs, SyntheticImagesSummary),
    "imported_synthetic_images": StageSpec(
        lambda at, part: at.imported_synthetic_images(part.tissue_class),
        lambda at, part: [at.imported_hypernetwork_index(part.tissue_class), at.imported_hypernetworks_inbox(part.tissue_class)],
        _imported_synthetic_images_inputs,
        ImportedSyntheticImagesSummary,
    ),
}


def _synthetic_images(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
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
        from histo_assets.core.sampling import write_checkpoint_images

        stage = Stage.start(context, params, object_store, STAGES["synthetic_images"], base_model)
        p, (tissue_class, step) = stage.params, (stage.part.tissue_class, stage.part.step)
        checkpoint = _checkpoint(p, stage.part)
        settings = generation_settings(p)
        count = int(p["generation"]["images_per_checkpoint"])
        checkpoint_path = None if step == BASELINE_STEP else stage.layout.hypernetwork_checkpoints(tissue_class) / checkpoint["file"]

        def build(staging: Path) -> dict:
            images = write_checkpoint_images(staging, base_model.load(p), checkpoint_path, tissue_class=tissue_class,
                                             step=step, count=count, settings=settings, master_seed=p.seed, log=stage.log)
            return images | {"checkpoint_file": checkpoint["file"], "checkpoint_sha256": checkpoint["sha256"],
                             "training_set": checkpoint["training_set"], "run_id": context.run_id}

        summary = stage.build_or_reuse(build)
        index = GENERATION_INDEX.read(stage.out / INDEX)
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

    return synthetic_images


def _imported_synthetic_images(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
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
        from histo_assets.core.sampling import write_imported_images

        stage = Stage.start(context, params, object_store, STAGES["imported_synthetic_images"], base_model)
        p = stage.params
        imported = IMPORTED_HYPERNETWORK_INDEX.read(stage.layout.imported_hypernetwork_index(context.partition_key) / INDEX)

        def build(staging: Path) -> dict:
            counts = write_imported_images(
                staging, base_model.load(p) if len(imported) else None, imported, tissue_class=context.partition_key,
                count=int(p["generation"]["images_per_checkpoint"]),
                settings=generation_settings(p), master_seed=p.seed, log=stage.log,
            )
            return {"images": counts, "run_id": context.run_id}

        summary = stage.build_or_reuse(build)
        return stage.result(summary["fingerprint"], {
            "hypernetworks": len(summary["images"]),
            "images": dg.MetadataValue.json(summary["images"]),
        })

    return imported_synthetic_images


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    return [_synthetic_images(p, partitions), _imported_synthetic_images(p, partitions)]
