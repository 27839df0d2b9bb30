"""The Stable Diffusion model under every hypernetwork, as an asset, so lineage shows what the checkpoints stand on."""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.assets.stage import Stage, stage_asset
from histo_assets.core.base_model import describe_base_model
from histo_assets.core.base_model_training import LOSS_PLOT, SAMPLES_PLOT, train_from_crops, training_summary
from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES
from histo_assets.core.previews import markdown_png_file, markdown_table
from histo_assets.core.sampling import GenerationSettings
from histo_assets.core.stage import read_summary
from histo_assets.params import Params
from histo_assets.resources import (
    TRAINED_MODEL_FOLDER,
    TRAINED_SOURCE,
    BaseModelResource,
    ObjectStoreResource,
    ParamsResource,
    trained_model_dir,
)

GROUP = "base_model"
BASE_MODEL_VERSION = "1"


def build_assets(p: Params) -> list[dg.AssetsDefinition]:
    # Only a model trained here has inputs in this graph; a file or folder from elsewhere has none to show.
    trains_on_crops = p["base_model"]["source"] == TRAINED_SOURCE

    @stage_asset(
        p, on_gpu=True,
        name=BASE_MODEL_ASSET,
        group_name=GROUP,
        code_version=BASE_MODEL_VERSION,
        deps=["augmented_crops"] if trains_on_crops else [],
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
        stage = Stage.start(context, params, object_store, lambda at: at.base_model)
        p, section = stage.params, stage.params["base_model"]
        trains = section["source"] == TRAINED_SOURCE
        crops = [stage.layout.augmented_crops(c) for c in p.classes] if trains else []
        object_store.pull(p.data_dir, *crops, log=stage.log)
        training_set = {c: read_summary(folder)["data_version"] for c, folder in zip(p.classes, crops)} if trains else None

        def build(out: Path) -> dict:
            if not trains:
                return describe_base_model(base_model.load(p))
            base_model.apply_threads()
            result = train_from_crops(
                out, [folder / IMAGES for folder in crops], section["training"], model_folder=TRAINED_MODEL_FOLDER,
                resolution=p.resolution, master_seed=p.seed, log=stage.log,
                preview=GenerationSettings.from_params(p["generation"], p.resolution),
            )
            model = base_model.load_folder(trained_model_dir(p), result.sha256, section["name"])
            made = training_summary(result, p.classes, section["training"]["prompt"], training_set)
            return describe_base_model(model) | {"source": TRAINED_SOURCE, **made}

        summary = stage.build_or_reuse(build, in_place=True, base_model=section, training_set=training_set,
                                       resolution=p.resolution, seed=p.seed, code=BASE_MODEL_VERSION)
        yield dg.MaterializeResult(metadata=_metadata(summary, stage.out) | {"reused_unchanged_output": stage.reused},
                                   data_version=dg.DataVersion(summary["sha256"]))

    return [base_model_asset]


def _metadata(summary: dict, out: Path) -> dict:
    """The model's identity and architecture, and for a model trained here its data, loss curve and samples."""
    architecture = summary["architecture"]
    trained = {
        "training_set": dg.MetadataValue.json(summary["training_set"]),
        "loss_curve": dg.MetadataValue.md(markdown_png_file(out / LOSS_PLOT, "base model training loss")),
        "samples": dg.MetadataValue.md(markdown_png_file(out / SAMPLES_PLOT, "real crops above generated ones")),
    } if summary["source"] == TRAINED_SOURCE else {}
    return {
        **trained,
        "name": summary["name"],
        "source": summary["source"],
        "sha256": summary["sha256"],
        "model_hash": dg.MetadataValue.text(summary["short_hash"]),
        "attention_context_widths": str(architecture["attention_context_widths"]),
        "architecture": dg.MetadataValue.md(markdown_table(pd.DataFrame(
            [{"fact": key, "value": str(value)} for key, value in architecture.items()]))),
    }
