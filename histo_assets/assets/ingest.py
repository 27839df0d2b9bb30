"""Raw slides -> square crops -> augmented crops, one partition per tissue class."""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.assets import FOLLOW_UPSTREAM
from histo_assets.assets.checks import image_check_results, image_check_specs
from histo_assets.core.augment import AugmentationRecipe, augment_class
from histo_assets.core.crops import CropSettings, TileSettings, crop_class
from histo_assets.core.holdout import BY_SOURCE_COLUMNS, RULE_NONE, SplitSettings, read_groups, source_groups, split_holdout
from histo_assets.core.io import atomic_directory, atomic_write_json, atomic_write_parquet, atomic_write_text, stable_hash
from histo_assets.core.previews import markdown_png_file, markdown_table, write_preview
from histo_assets.core.seeding import derive_seed
from histo_assets.core.slides import Problem, inventory_class
from histo_assets.core.stage import current_summary, fingerprint, output_settings
from histo_assets.core.layout import HOLDOUT, IMAGES, INDEX, INVENTORY, PREVIEW, SUMMARY, Layout
from histo_assets.partitions import tissue_class_partitions
from histo_assets.resources import STAGE_CONFIG_SCHEMA, ObjectStoreResource, ParamsResource

GROUP = "ingest"
RAW_SLIDES_VERSION = "1"
SQUARE_CROPS_VERSION = "2"
AUGMENTED_CROPS_VERSION = "3"


def _problems_markdown(problems: list[Problem]) -> str:
    if not problems:
        return "No file was skipped."
    return markdown_table(pd.DataFrame([vars(p) for p in problems]))


def _report_problems(context: dg.AssetExecutionContext, problems: list[Problem]) -> None:
    for problem in problems:
        context.log.warning(f"skipped {problem.path}: {problem.reason}")


def _stage_result(summary: dict, folder: Path, reused: bool, extra: dict | None = None) -> dict:
    """Metadata shown in the UI, the same whether the stage ran or was reused."""
    metadata = {
        "path": dg.MetadataValue.path(str(folder)),
        "images": summary["count"],
        "skipped": dg.MetadataValue.md(_problems_markdown([Problem(**p) for p in summary.get("problems", [])])),
        "fingerprint": summary["fingerprint"][:16],
        "reused_unchanged_output": reused,
    }
    preview = folder / PREVIEW
    if preview.is_file():
        metadata["preview"] = dg.MetadataValue.md(markdown_png_file(preview, folder.name))
    metadata.update(extra or {})
    return metadata


def _unknown_class_folders(layout: Layout, classes: list[str]) -> list[str]:
    if not layout.raw_root.is_dir():
        return []
    return sorted(p.name for p in layout.raw_root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in classes)


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=tissue_class_partitions,
    group_name=GROUP,
    code_version=RAW_SLIDES_VERSION,
    kinds={"python", "parquet"},
    description="Inventory of the raw slide files of one tissue class (data/raw/<class>/): sha256, bytes, "
    "dimensions, pyramid levels and microns-per-pixel. Unusable files are skipped with a reason; the data "
    "version is the hash of the content hashes, so unchanged classes are not recomputed downstream.",
)
def raw_slides(
    context: dg.AssetExecutionContext, params: ParamsResource, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    p = params.load_for(context)
    tissue_class = context.partition_key
    layout = Layout(p.data_dir)
    unknown = _unknown_class_folders(layout, p.classes)
    if unknown:
        context.log.warning(f"class folder(s) under {layout.raw_root} not in params 'classes', ignored: {', '.join(unknown)}")
    class_dir = layout.raw(tissue_class)
    object_store.pull(p.data_dir, class_dir, log=context.log.info)
    if not class_dir.is_dir():
        raise dg.Failure(f"class {tissue_class!r}: no folder {class_dir}")
    ingest = p["ingest"]
    records, problems = inventory_class(
        class_dir, p.data_dir, ingest["extensions"], int(ingest["max_image_pixels"]), int(ingest["max_file_bytes"])
    )
    _report_problems(context, problems)
    if not records:
        raise dg.Failure(
            f"class {tissue_class!r} has no usable slide in {class_dir}",
            metadata={"skipped": dg.MetadataValue.md(_problems_markdown(problems))},
        )
    version = stable_hash(sorted((r.path, r.sha256) for r in records))
    out = layout.raw_slides(tissue_class)
    with atomic_directory(out) as staging:
        frame = pd.DataFrame([r.as_row() for r in records])
        atomic_write_parquet(staging / INVENTORY, frame)
        atomic_write_json(
            staging / SUMMARY,
            {"fingerprint": version, "count": len(records), "problems": [vars(x) for x in problems]},
        )
    object_store.push(p.data_dir, out, log=context.log.info)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out / INVENTORY)),
            "slides": len(records),
            "total_bytes": int(frame["bytes"].sum()),
            "inventory": dg.MetadataValue.md(markdown_table(frame[["path", "width", "height", "levels", "mpp", "reader"]])),
            "skipped": dg.MetadataValue.md(_problems_markdown(problems)),
            "unknown_class_folders": ", ".join(unknown) or "none",
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=tissue_class_partitions,
    group_name=GROUP,
    code_version=SQUARE_CROPS_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[raw_slides],
    kinds={"python", "png", "parquet"},
    check_specs=image_check_specs("square_crops"),
    description="Square crops of one class at the training resolution: one centred crop per image (mode "
    "'center', the thesis way) or a tissue-masked grid of tiles at a chosen level or mpp (mode 'tiles'). "
    "Names encode the source hash, level and level-0 coordinates; index.parquet records provenance.",
)
def square_crops(context: dg.AssetExecutionContext, params: ParamsResource, object_store: ObjectStoreResource):
    p = params.load_for(context)
    tissue_class = context.partition_key
    layout = Layout(p.data_dir)
    out = layout.square_crops(tissue_class)
    object_store.pull(p.data_dir, layout.raw(tissue_class), layout.raw_slides(tissue_class), out, log=context.log.info)
    inventory = pd.read_parquet(layout.raw_slides(tissue_class) / INVENTORY)
    sources = sorted(zip(inventory["path"], inventory["sha256"]))
    crops, ingest = p["crops"], p["ingest"]
    stage_fingerprint = fingerprint(sources=sources, crops=output_settings(crops), ingest=ingest, resolution=p.resolution,
                                    code=SQUARE_CROPS_VERSION)
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"{tissue_class}: inputs and params unchanged, reusing {out}")
    else:
        settings = CropSettings(
            mode=crops["mode"],
            resolution=p.resolution,
            small_image_policy=crops["small_image_policy"],
            max_image_pixels=int(ingest["max_image_pixels"]),
            max_file_bytes=int(ingest["max_file_bytes"]),
            tiles=TileSettings(**crops["tiles"]),
            png_compress_level=int(crops["png_compress_level"]),
        )
        with atomic_directory(out) as staging:
            records, problems = crop_class(
                sources, p.data_dir, staging / IMAGES, settings, log=context.log.info, workers=int(crops["workers"])
            )
            _report_problems(context, problems)
            if not records:
                raise dg.Failure(
                    f"class {tissue_class!r}: no crop could be cut from its {len(sources)} slide(s)",
                    metadata={"skipped": dg.MetadataValue.md(_problems_markdown(problems))},
                )
            atomic_write_parquet(staging / INDEX, pd.DataFrame([r.as_row() for r in records]))
            write_preview(staging / IMAGES, staging / PREVIEW)
            summary = {
                "fingerprint": stage_fingerprint,
                "count": len(records),
                "problems": [vars(x) for x in problems],
                "data_version": stable_hash(sorted((r.crop_file, r.crop_sha256) for r in records)),
            }
            atomic_write_json(staging / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    yield dg.MaterializeResult(metadata=_stage_result(summary, out, reused, {"mode": crops["mode"]}), data_version=dg.DataVersion(summary["data_version"]))
    yield from image_check_results("square_crops", out / IMAGES, p.resolution, int(p["checks"]["min_square_crops"]))


def write_captions(folder: Path, files: list[str], tissue_class: str, mode: str) -> None:
    """Caption sidecars for training: the class name, instead of A1111's file-name captions.

    A1111 takes [filewords] from the file name when no ``.txt`` sits beside
    the image; our stable names encode coordinates, which would make the
    captions noise (as they probably were in the thesis). ``filename`` keeps
    that A1111 behaviour.
    """
    if mode == "filename":
        return
    if mode != "class":
        raise dg.Failure(f"augmentation.captions must be 'class' or 'filename', not {mode!r}")
    caption = tissue_class.replace("_", " ")
    for name in files:
        atomic_write_text(folder / f"{Path(name).stem}.txt", caption + "\n")


@dg.asset(
    config_schema=STAGE_CONFIG_SCHEMA,
    partitions_def=tissue_class_partitions,
    group_name=GROUP,
    code_version=AUGMENTED_CROPS_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[square_crops],
    kinds={"python", "png", "parquet"},
    check_specs=image_check_specs("augmented_crops"),
    description="The thesis's rudi/Augmentor recipe (rotate +-15, distortion grid 8 magnitude 5, skew 0.7, "
    "zoom 1-1.2, flip; p 0.7) applied to the training share of the square crops, with the originals kept "
    "alongside. Held-out crops (holdout.parquet) are never augmented or trained on: they are the metric "
    "reference set, chosen by source slide (or the lab's groups), or where a class has too few, from a band of "
    "a slide with a guard band of tiles dropped from training; the rule is recorded. Deterministic for a seed, "
    "stable names, index.parquet maps outputs to sources and operations.",
)
def augmented_crops(context: dg.AssetExecutionContext, params: ParamsResource, object_store: ObjectStoreResource):
    p = params.load_for(context)
    tissue_class = context.partition_key
    layout = Layout(p.data_dir)
    crops_dir = layout.square_crops(tissue_class)
    out = layout.augmented_crops(tissue_class)
    object_store.pull(p.data_dir, crops_dir, out, log=context.log.info)
    index = pd.read_parquet(crops_dir / INDEX)
    hashes = dict(zip(index["crop_file"], index["crop_sha256"]))
    section = p["augmentation"]
    split_settings = SplitSettings.from_params(p["split"])
    groups_csv = p["split"]["groups_csv"]
    groups = source_groups(index["source_path"], read_groups(p.source.parent / groups_csv) if groups_csv else None)
    seed = derive_seed(p.seed, "augmented_crops", tissue_class)
    stage_fingerprint = fingerprint(crops=sorted(hashes.items()), augmentation=output_settings(section), split=p["split"],
                                    groups=sorted(groups.items()), seed=seed, code=AUGMENTED_CROPS_VERSION)
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"{tissue_class}: inputs and params unchanged, reusing {out}")
    else:
        split = split_holdout(index, split_settings, derive_seed(seed, "holdout"), groups)
        train, held_out = split.train, split.held_out
        if split.rule == RULE_NONE:
            context.log.warning(f"{tissue_class}: {split.reason}; metrics will have no reference set")
        else:
            context.log.info(f"{tissue_class}: {split.rule} split, {split.reason}")
        with atomic_directory(out) as staging:
            records = augment_class(
                [(crops_dir / IMAGES / name, hashes[name]) for name in train],
                staging / IMAGES,
                recipe=AugmentationRecipe.from_params(section),
                total=int(section["total"]),
                keep_originals=bool(section["keep_originals"]),
                seed=seed,
                workers=int(section["workers"]),
                log=context.log.info,
            )
            write_captions(staging / IMAGES, [r.file for r in records], tissue_class, section["captions"])
            index_frame = pd.DataFrame([r.as_row() for r in records])
            index_frame["seed"] = pd.array([r.seed for r in records], dtype="Int64")
            atomic_write_parquet(staging / INDEX, index_frame)
            atomic_write_parquet(staging / HOLDOUT, split.holdout_frame())
            write_preview(staging / IMAGES, staging / PREVIEW)
            summary = {
                "fingerprint": stage_fingerprint,
                "count": len(records),
                "train_crops": len(train),
                "held_out_crops": len(held_out),
                "holdout_rule": split.rule,
                "holdout_reason": split.reason,
                "guard_crops": split.guard,
                "holdout_by_source": split.by_source(),
                "data_version": stable_hash(sorted((r.file, r.sha256) for r in records)),
            }
            atomic_write_json(staging / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    extra = {
        "train_crops": summary["train_crops"],
        "held_out_crops": summary["held_out_crops"],
        "holdout_rule": summary["holdout_rule"],
        "holdout_reason": summary["holdout_reason"],
        "guard_crops": len(summary["guard_crops"]),
        "holdout_by_source": dg.MetadataValue.md(
            markdown_table(pd.DataFrame(summary["holdout_by_source"], columns=list(BY_SOURCE_COLUMNS)))
        ),
    }
    yield dg.MaterializeResult(metadata=_stage_result(summary, out, reused, extra), data_version=dg.DataVersion(summary["data_version"]))
    yield from image_check_results("augmented_crops", out / IMAGES, p.resolution, int(p["checks"]["min_augmented_crops"]))
