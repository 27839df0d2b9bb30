"""Raw slides -> square crops -> augmented crops, one partition per tissue class."""

from pathlib import Path

import pandas as pd

from histo_assets.core.augment import write_augmented_crops
from histo_assets.core.crops import write_square_crops
from histo_assets.core.holdout import BY_SOURCE_COLUMNS
from histo_assets.core.layout import IMAGES, INDEX, INVENTORY, PREVIEW, Layout
from histo_assets.core.schemas import CROP_INDEX, SLIDE_INVENTORY
from histo_assets.core.schemas import AugmentedCropsSummary, SlideInventorySummary, SquareCropsSummary
from histo_assets.core.seeding import derive_seed
from histo_assets.core.slides import unknown_class_folders, write_inventory
from histo_assets.core.stage import file_stats, output_settings
from histo_assets.params import Params
from histo_assets.settings import augmentation_settings, crop_settings, holdout_groups, ingest_settings, split_settings
from histo_assets.stage import Part, Stage, png_value, skipped_files, stage_asset, table_value


def _crops_metadata(folder: Path, summary: dict) -> dict:
    """What the UI shows of a crop folder, the same whether the stage ran or was reused."""
    metadata = {"images": summary["count"], "skipped": skipped_files(summary.get("problems", [])),
                "fingerprint": summary["fingerprint"][:16]}
    if (folder / PREVIEW).is_file():
        metadata["preview"] = png_value(folder / PREVIEW, folder.name)
    return metadata


def _slide_inventory_inputs(p: Params, part: Part, _base_model) -> dict:
    return dict(files=file_stats(Layout(p.data_dir).raw(part.tissue_class)), ingest=p["ingest"])


@stage_asset(reads=["raw"], inputs=_slide_inventory_inputs, summary=SlideInventorySummary, code_version="1",
             partitioned="tissue_class", follows_upstream=False, kinds={"python", "parquet"})
def slide_inventory(stage: Stage):
    """Inventory of the raw slide files of one tissue class (data/raw/<class>/): sha256, bytes, dimensions, pyramid
    levels and microns-per-pixel. Unusable files are skipped with a reason; the data version is the hash of the
    content hashes, so unchanged classes are not recomputed downstream."""
    warn, raw_root = stage.context.log.warning, stage.layout.raw_root
    unknown = unknown_class_folders(raw_root, stage.params.classes)
    if unknown:
        warn(f"class folder(s) under {raw_root} not in params 'classes', ignored: {', '.join(unknown)}")
    summary = stage.build_or_reuse(lambda staging: write_inventory(
        staging, stage.layout.raw(stage.part.tissue_class), stage.params.data_dir, ingest_settings(stage.params),
        tissue_class=stage.part.tissue_class, warn=warn))
    inventory = SLIDE_INVENTORY.read(stage.out / INVENTORY)
    return stage.result(summary["data_version"], {
        "path": stage.out / INVENTORY,
        "slides": summary["count"],
        "total_bytes": int(inventory["bytes"].sum()),
        "inventory": table_value(inventory[["path", "width", "height", "levels", "mpp", "reader"]]),
        "skipped": skipped_files(summary["problems"]),
        "unknown_class_folders": ", ".join(unknown) or "none",
    })


def _square_crops_inputs(p: Params, part: Part, _base_model) -> dict:
    inventory = SLIDE_INVENTORY.read(Layout(p.data_dir).slide_inventory(part.tissue_class) / INVENTORY)
    return dict(sources=sorted(zip(inventory["path"], inventory["sha256"])), crops=output_settings(p["crops"]),
                ingest=p["ingest"], resolution=p.resolution)


@stage_asset(reads=["raw", "slide_inventory"], inputs=_square_crops_inputs, summary=SquareCropsSummary,
             code_version="2", partitioned="tissue_class", deps=["slide_inventory"],
             kinds={"python", "png", "parquet"}, min_images=lambda p: int(p["checks"]["min_square_crops"]))
def square_crops(stage: Stage):
    """Square crops of one class at the training resolution: one centred crop per image (mode 'center', the thesis
    way) or a tissue-masked grid of tiles at a chosen level or mpp (mode 'tiles'). Names encode the source hash,
    level and level-0 coordinates; index.parquet records provenance."""
    p = stage.params
    summary = stage.build_or_reuse(lambda staging: write_square_crops(
        staging, stage.inputs["sources"], p.data_dir, crop_settings(p), tissue_class=stage.part.tissue_class,
        workers=int(p["crops"]["workers"]), log=stage.log, warn=stage.context.log.warning))
    return stage.result(summary["data_version"], _crops_metadata(stage.out, summary) | {"mode": p["crops"]["mode"]})


def _augmented_crops_inputs(p: Params, part: Part, _base_model) -> dict:
    index = CROP_INDEX.read(Layout(p.data_dir).square_crops(part.tissue_class) / INDEX)
    return dict(crops=sorted(dict(zip(index["crop_file"], index["crop_sha256"])).items()),
                augmentation=output_settings(p["augmentation"]), split=p["split"],
                groups=sorted(holdout_groups(p, index["source_path"]).items()),
                seed=derive_seed(p.seed, "augmented_crops", part.tissue_class))


@stage_asset(reads=["square_crops"], inputs=_augmented_crops_inputs, summary=AugmentedCropsSummary, code_version="3",
             partitioned="tissue_class", deps=["square_crops"], kinds={"python", "png", "parquet"},
             min_images=lambda p: int(p["checks"]["min_augmented_crops"]))
def augmented_crops(stage: Stage):
    """The thesis's rudi/Augmentor recipe (rotate +-15, distortion grid 8 magnitude 5, skew 0.7, zoom 1-1.2, flip;
    p 0.7) applied to the training share of the square crops, with the originals kept alongside. Held-out crops
    (holdout.parquet) are never augmented or trained on: they are the metric reference set, chosen by source slide
    (or the lab's groups), or where a class has too few, from a band of a slide with a guard band of tiles dropped
    from training; the rule is recorded. Deterministic for a seed, stable names, index.parquet maps outputs to
    sources and operations."""
    p, crops = stage.params, stage.layout.square_crops(stage.part.tissue_class)

    def build(staging: Path) -> dict:
        index = CROP_INDEX.read(crops / INDEX)
        return write_augmented_crops(
            staging, crops / IMAGES, index, split_settings=split_settings(p), augmentation=augmentation_settings(p),
            groups=holdout_groups(p, index["source_path"]), tissue_class=stage.part.tissue_class,
            seed=stage.inputs["seed"], log=stage.log, warn=stage.context.log.warning)

    summary = stage.build_or_reuse(build)
    return stage.result(summary["data_version"], _crops_metadata(stage.out, summary) | {
        **{key: summary[key] for key in ("train_crops", "held_out_crops", "holdout_rule", "holdout_reason")},
        "guard_crops": len(summary["guard_crops"]),
        "holdout_by_source": table_value(pd.DataFrame(summary["holdout_by_source"], columns=list(BY_SOURCE_COLUMNS))),
    })
