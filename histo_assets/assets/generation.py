"""Synthetic images from every hypernetwork checkpoint, one partition per tissue class x step."""

import dagster as dg

from histo_assets.checks import image_check_results, image_check_specs
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, INDEX, PREVIEW, Layout
from histo_assets.core.previews import markdown_png_file
from histo_assets.core.schemas import GENERATION_INDEX, IMPORTED_HYPERNETWORK_INDEX
from histo_assets.core.schemas import ImportedSyntheticImagesSummary, SyntheticImagesSummary
from histo_assets.core.steps import MissingCheckpointError, checkpoint_at
from histo_assets.params import Params
from histo_assets.partitions import Partitions, by_tissue_class
from histo_assets.resources import BaseModelResource, ObjectStoreResource, ParamsResource
from histo_assets.settings import generation_settings
from histo_assets.stage import Part, Stage, StageSpec, refusals_as_failures, stage_asset

# core.sampling imports diffusers, so asset bodies import it when a run needs it: loading and unloading
# diffusers takes seconds that every CLI start and UI reload would otherwise pay.
GROUP = "generation"


def _checkpoint(p: Params, part: Part) -> dict:
    with refusals_as_failures(MissingCheckpointError):
        return checkpoint_at(Layout(p.data_dir), part.tissue_class, part.step)


def _synthetic_images_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    return dict(checkpoint=_checkpoint(p, part)["sha256"], generation=p["generation"], resolution=p.resolution,
                base_model=base_model.identity(p), seed=p.seed)


def _imported_synthetic_images_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    imported = IMPORTED_HYPERNETWORK_INDEX.read(Layout(p.data_dir).imported_hypernetwork_index(part.tissue_class) / INDEX)
    return dict(files=sorted(imported["sha256"]), generation=p["generation"], resolution=p.resolution,
                base_model=base_model.identity(p), seed=p.seed)


STAGES = {
    "synthetic_images": StageSpec(lambda at, part: at.synthetic_images(part.tissue_class, part.step),
                                  lambda at, part: [at.hypernetwork_checkpoints(part.tissue_class)],
                                  _synthetic_images_inputs, SyntheticImagesSummary, code_version="2"),
    "imported_synthetic_images": StageSpec(
        lambda at, part: at.imported_synthetic_images(part.tissue_class),
        lambda at, part: [at.imported_hypernetwork_index(part.tissue_class), at.imported_hypernetworks_inbox(part.tissue_class)],
        _imported_synthetic_images_inputs, ImportedSyntheticImagesSummary, code_version="2"),
}


def _synthetic_images(p: Params, partitions: Partitions) -> dg.AssetsDefinition:
    @stage_asset(p, STAGES["synthetic_images"], on_gpu=True, partitions_def=partitions.class_and_step, group_name=GROUP,
                 deps=[dg.AssetDep("hypernetwork_checkpoints", partition_mapping=by_tissue_class), BASE_MODEL_ASSET],
                 kinds={"diffusers", "png"}, check_specs=image_check_specs("synthetic_images"))
    def synthetic_images(context: dg.AssetExecutionContext, params: ParamsResource, base_model: BaseModelResource,
                         object_store: ObjectStoreResource):
        """generation.images_per_checkpoint images from one checkpoint (thesis defaults: Euler, 20 steps, CFG 7, the
        training resolution, a negative prompt). Each image's seed derives from class, step and index; each PNG
        carries AUTOMATIC1111's `parameters` text chunk, so the WebUI's PNG Info reads it."""
        from histo_assets.core.sampling import write_checkpoint_images

        stage = Stage.start(context, params, object_store, STAGES["synthetic_images"], base_model)
        p, (tissue_class, step) = stage.params, (stage.part.tissue_class, stage.part.step)
        checkpoint, settings = _checkpoint(p, stage.part), generation_settings(p)
        count = int(p["generation"]["images_per_checkpoint"])
        file = None if checkpoint["file"] is None else stage.layout.hypernetwork_checkpoints(tissue_class) / checkpoint["file"]
        summary = stage.build_or_reuse(lambda staging: write_checkpoint_images(
            staging, base_model.load(p), file, tissue_class=tissue_class, step=step, count=count, settings=settings,
            master_seed=p.seed, log=stage.log,
        ) | {"checkpoint_file": checkpoint["file"], "checkpoint_sha256": checkpoint["sha256"],
             "training_set": checkpoint["training_set"], "run_id": context.run_id})
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
    @stage_asset(p, STAGES["imported_synthetic_images"], on_gpu=True, partitions_def=partitions.tissue_class,
                 group_name=GROUP, deps=["imported_hypernetwork_index", BASE_MODEL_ASSET], kinds={"diffusers", "png"})
    def imported_synthetic_images(context: dg.AssetExecutionContext, params: ParamsResource,
                                  base_model: BaseModelResource, object_store: ObjectStoreResource):
        """The same generation as synthetic_images, from each AUTOMATIC1111 hypernetwork a lab imported for this class
        (one folder per file, named by its stem; the step in file names is the step the file records)."""
        from histo_assets.core.sampling import write_imported_images

        stage = Stage.start(context, params, object_store, STAGES["imported_synthetic_images"], base_model)
        p = stage.params
        imported = IMPORTED_HYPERNETWORK_INDEX.read(stage.layout.imported_hypernetwork_index(stage.part.tissue_class) / INDEX)
        summary = stage.build_or_reuse(lambda staging: {"images": write_imported_images(
            staging, base_model.load(p) if len(imported) else None, imported, tissue_class=stage.part.tissue_class,
            count=int(p["generation"]["images_per_checkpoint"]), settings=generation_settings(p), master_seed=p.seed,
            log=stage.log), "run_id": context.run_id})
        return stage.result(summary["fingerprint"], {"hypernetworks": len(summary["images"]),
                                                     "images": dg.MetadataValue.json(summary["images"])})

    return imported_synthetic_images


def build_assets(p: Params, partitions: Partitions) -> list[dg.AssetsDefinition]:
    return [_synthetic_images(p, partitions), _imported_synthetic_images(p, partitions)]
