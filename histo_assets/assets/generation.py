"""Synthetic images from every hypernetwork checkpoint, one partition per tissue class x step."""

import dagster as dg

from histo_assets.core.layout import BASE_MODEL_ASSET, INDEX, PREVIEW, Layout
from histo_assets.core.schemas import GENERATION_INDEX, IMPORTED_HYPERNETWORK_INDEX
from histo_assets.core.schemas import ImportedSyntheticImagesSummary, SyntheticImagesSummary
from histo_assets.core.steps import checkpoint_at
from histo_assets.params import Params
from histo_assets.partitions import by_tissue_class
from histo_assets.resources import BaseModelResource
from histo_assets.settings import generation_settings
from histo_assets.stage import Part, Stage, png_value, stage_asset


def _synthetic_images_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    return dict(checkpoint=checkpoint_at(Layout(p.data_dir), part.tissue_class, part.step)["sha256"],
                generation=p["generation"], resolution=p.resolution, base_model=base_model.identity(p), seed=p.seed)


@stage_asset(reads=["hypernetwork_checkpoints"], inputs=_synthetic_images_inputs, summary=SyntheticImagesSummary,
             code_version="2", partitioned="class_and_step", resources=["base_model"], on_gpu=True,
             deps=[dg.AssetDep("hypernetwork_checkpoints", partition_mapping=by_tissue_class), BASE_MODEL_ASSET],
             kinds={"diffusers", "png"}, min_images=lambda p: int(p["generation"]["images_per_checkpoint"]))
def synthetic_images(stage: Stage):
    """generation.images_per_checkpoint images from one checkpoint (thesis defaults: Euler, 20 steps, CFG 7, the
    training resolution, a negative prompt). Each image's seed derives from class, step and index; each PNG
    carries AUTOMATIC1111's `parameters` text chunk, so the WebUI's PNG Info reads it."""
    from histo_assets.core.sampling import write_checkpoint_images

    p, (tissue_class, step) = stage.params, (stage.part.tissue_class, stage.part.step)
    checkpoint, settings = checkpoint_at(stage.layout, tissue_class, step), generation_settings(p)
    file = None if checkpoint["file"] is None else stage.layout.hypernetwork_checkpoints(tissue_class) / checkpoint["file"]
    summary = stage.build_or_reuse(lambda staging: write_checkpoint_images(
        staging, stage.base_model.load(p), file, tissue_class=tissue_class, step=step, settings=settings,
        count=int(p["generation"]["images_per_checkpoint"]), master_seed=p.seed, log=stage.log,
    ) | {"checkpoint_file": checkpoint["file"], "checkpoint_sha256": checkpoint["sha256"],
         "training_set": checkpoint["training_set"], "run_id": stage.context.run_id})
    index = GENERATION_INDEX.read(stage.out / INDEX)
    return stage.result(summary["data_version"], {
        "images": summary["count"],
        "checkpoint": summary["checkpoint_file"],
        "checkpoint_sha256": summary["checkpoint_sha256"],
        "prompt": index["prompt"].iloc[0] if len(index) else "",
        "negative_prompt": settings.negative_prompt,
        "sampler": f"{settings.sampler}, {settings.steps} steps, CFG {settings.cfg_scale}",
        "preview": png_value(stage.out / PREVIEW, f"{tissue_class} step {step}"),
    })


def _imported_synthetic_images_inputs(p: Params, part: Part, base_model: BaseModelResource) -> dict:
    imported = IMPORTED_HYPERNETWORK_INDEX.read(Layout(p.data_dir).imported_hypernetwork_index(part.tissue_class) / INDEX)
    return dict(files=sorted(imported["sha256"]), generation=p["generation"], resolution=p.resolution,
                base_model=base_model.identity(p), seed=p.seed)


@stage_asset(reads=["imported_hypernetwork_index", "imported_hypernetworks_inbox"],
             inputs=_imported_synthetic_images_inputs, summary=ImportedSyntheticImagesSummary, code_version="2",
             partitioned="tissue_class", deps=["imported_hypernetwork_index", BASE_MODEL_ASSET], resources=["base_model"],
             on_gpu=True, kinds={"diffusers", "png"})
def imported_synthetic_images(stage: Stage):
    """The same generation as synthetic_images, from each AUTOMATIC1111 hypernetwork a lab imported for this class
    (one folder per file, named by its stem; the step in file names is the step the file records)."""
    from histo_assets.core.sampling import write_imported_images

    p = stage.params
    imported = IMPORTED_HYPERNETWORK_INDEX.read(stage.layout.imported_hypernetwork_index(stage.part.tissue_class) / INDEX)
    summary = stage.build_or_reuse(lambda staging: {"images": write_imported_images(
        staging, stage.base_model.load(p) if len(imported) else None, imported, tissue_class=stage.part.tissue_class,
        count=int(p["generation"]["images_per_checkpoint"]), settings=generation_settings(p), master_seed=p.seed,
        log=stage.log), "run_id": stage.context.run_id})
    return stage.result(summary["fingerprint"], {"hypernetworks": len(summary["images"]),
                                                 "images": summary["images"]})
