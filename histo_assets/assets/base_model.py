"""The Stable Diffusion model under every hypernetwork, as an asset, so lineage shows what the checkpoints stand on."""

import dagster as dg
import pandas as pd

from histo_assets.assets import FOLLOW_UPSTREAM, GPU_TAGS
from histo_assets.assets.ingest import augmented_crops
from histo_assets.core.base_model import describe_architecture
from histo_assets.core.base_model_training import LOSS_PLOT, SAMPLES_PLOT, BaseModelTrainingSettings, train_base_model
from histo_assets.core.io import atomic_write_json
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.sampling import GenerationSettings
from histo_assets.core.seeding import derive_seed
from histo_assets.core.stage import current_summary, fingerprint, read_summary
from histo_assets.core.training import list_images
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, SUMMARY, Layout
from histo_assets.partitions import DEFINITION_PARAMS
from histo_assets.resources import (
    STAGE_CONFIG_SCHEMA,
    TRAINED_MODEL_FOLDER,
    TRAINED_SOURCE,
    BaseModelResource,
    ObjectStoreResource,
    ParamsResource,
    trained_model_dir,
)

GROUP = "base_model"
BASE_MODEL_VERSION = "1"

# Only a model trained here has inputs in this graph; a file or folder from elsewhere has none to show.
_TRAINS_ON_CROPS = DEFINITION_PARAMS["base_model"]["source"] == TRAINED_SOURCE


@dg.asset(
    name=BASE_MODEL_ASSET,
    config_schema=STAGE_CONFIG_SCHEMA,
    group_name=GROUP,
    code_version=BASE_MODEL_VERSION,
    automation_condition=FOLLOW_UPSTREAM,
    deps=[augmented_crops] if _TRAINS_ON_CROPS else [],
    pool="gpu",
    op_tags=GPU_TAGS,
    kinds={"diffusers", "safetensors"},
    description="The Stable Diffusion model every hypernetwork is trained on and every image generated from. "
    "single_file and diffusers: the configured weights, verified against base_model.sha256 and described "
    "(name, hash, architecture, attention widths). trained: a small Stable-Diffusion-architecture model trained "
    "here on the training share of every class's crops (never the held-out ones), with one class-agnostic prompt.",
)
def base_model_asset(
    context: dg.AssetExecutionContext,
    params: ParamsResource,
    base_model: BaseModelResource,
    object_store: ObjectStoreResource,
):
    p = params.load_for(context)
    layout = Layout(p.data_dir)
    out = layout.base_model
    trains = p["base_model"]["source"] == TRAINED_SOURCE
    crops = [layout.augmented_crops(c) for c in p.classes] if trains else []
    object_store.pull(p.data_dir, out, *crops, log=context.log.info)
    training_set = {c: read_summary(layout.augmented_crops(c))["data_version"] for c in p.classes} if trains else None
    stage_fingerprint = fingerprint(base_model=p["base_model"], training_set=training_set, resolution=p.resolution,
                                    seed=p.seed, code=BASE_MODEL_VERSION)
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"base model settings and training set unchanged, reusing {out / SUMMARY}")
    else:
        made = _train(context, p, base_model, training_set) if trains else _describe(base_model.load(p))
        summary = made | {"fingerprint": stage_fingerprint}
        atomic_write_json(out / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    architecture = summary["architecture"]
    trained = {
        "training_set": dg.MetadataValue.json(summary["training_set"]),
        "loss_curve": dg.MetadataValue.md(markdown_png_file(out / LOSS_PLOT, "base model training loss")),
        "samples": dg.MetadataValue.md(markdown_png_file(out / SAMPLES_PLOT, "real crops above generated ones")),
    } if summary["source"] == TRAINED_SOURCE else {}
    yield dg.MaterializeResult(
        metadata={
            **trained,
            "name": summary["name"],
            "source": summary["source"],
            "sha256": summary["sha256"],
            "model_hash": dg.MetadataValue.text(summary["short_hash"]),
            "attention_context_widths": str(architecture["attention_context_widths"]),
            "architecture": dg.MetadataValue.md(markdown_table(pd.DataFrame(
                [{"fact": key, "value": str(value)} for key, value in architecture.items()]))),
            "reused_unchanged_output": reused,
        },
        data_version=dg.DataVersion(summary["sha256"]),
    )


def _describe(model) -> dict:
    return {"source": model.source, "name": model.name, "sha256": model.sha256, "short_hash": model.short_hash,
            "path": str(model.path), "architecture": describe_architecture(model)}


def _train(context: dg.AssetExecutionContext, p, base_model: BaseModelResource, training_set: dict) -> dict:
    """Train on every class's augmented crops (the training share: held-out crops are never augmented)."""
    layout = Layout(p.data_dir)
    out = layout.base_model
    # The old summary would name weights that are about to be replaced.
    (out / SUMMARY).unlink(missing_ok=True)
    base_model.apply_threads()
    section = p["base_model"]
    images = [path for c in p.classes for path in list_images(layout.augmented_crops(c) / IMAGES)]
    result = train_base_model(
        images, out, BaseModelTrainingSettings.from_params(section["training"]), model_folder=TRAINED_MODEL_FOLDER,
        resolution=p.resolution, seed=derive_seed(p.seed, "base_model"),
        preview=GenerationSettings.from_params(p["generation"], p.resolution), log=context.log.info,
    )
    if result.resumed_from:
        context.log.info(f"resumed from {result.resumed_from}")
    model = base_model.load_folder(trained_model_dir(p), result.sha256, section["name"])
    return _describe(model) | {
        "source": TRAINED_SOURCE,
        "training_set": {"classes": list(p.classes), "images": result.images, "prompt": section["training"]["prompt"],
                         "augmented_crops_data_versions": training_set,
                         "held_out_crops": "never seen: only augmented_crops, the training share, are read"},
        "seconds": result.seconds,
    }
