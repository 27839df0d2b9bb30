"""The Stable Diffusion model under every hypernetwork, as an asset, so lineage shows what the checkpoints stand on."""

from pathlib import Path

import dagster as dg
import pandas as pd

from histo_assets.core.layout import BASE_MODEL_ASSET, IMAGES, Layout
from histo_assets.core.schemas import AugmentedCropsSummary, BaseModelSummary
from histo_assets.core.stage import read_summary
from histo_assets.params import Params
from histo_assets.resources import TRAINED_MODEL_FOLDER, TRAINED_SOURCE, trained_model_dir
from histo_assets.settings import base_model_training_settings, generation_settings
from histo_assets.stage import Part, Stage, png_value, stage_asset, table_value


def _trains_on_crops(p: Params) -> bool:
    return p["base_model"]["source"] == TRAINED_SOURCE


def _base_model_inputs(p: Params, _part: Part, _base_model) -> dict:
    at = Layout(p.data_dir)
    training_set = ({c: read_summary(at.augmented_crops(c), AugmentedCropsSummary)["data_version"] for c in p.classes}
                    if _trains_on_crops(p) else None)
    return dict(base_model=p["base_model"], training_set=training_set, resolution=p.resolution, seed=p.seed)


# Only a model trained here has inputs in this graph (it pulls them itself); a file or folder from elsewhere has none.
@stage_asset(inputs=_base_model_inputs, summary=BaseModelSummary, code_version="1", name=BASE_MODEL_ASSET,
             deps=lambda p: ["augmented_crops"] if _trains_on_crops(p) else [], resources=["base_model"], on_gpu=True,
             kinds={"diffusers", "safetensors"})
def base_model(stage: Stage):
    """The Stable Diffusion model every hypernetwork is trained on and every image generated from. single_file
    and diffusers: the configured weights, verified against base_model.sha256 and described (name, hash,
    architecture, attention widths). trained: a small Stable-Diffusion-architecture model trained here on the
    training share of every class's crops (never the held-out ones), with one class-agnostic prompt."""
    from histo_assets.core.base_model import describe_base_model
    from histo_assets.core.base_model_training import train_from_crops, training_summary

    p, section, resource = stage.params, stage.params["base_model"], stage.base_model
    crops = [stage.layout.augmented_crops(c) for c in p.classes] if _trains_on_crops(p) else []
    stage.object_store.pull(p.data_dir, *crops, log=stage.log)

    def build(out: Path) -> dict:
        if not crops:
            return describe_base_model(resource.load(p))
        result = train_from_crops(out, [folder / IMAGES for folder in crops], base_model_training_settings(p),
                                  model_folder=TRAINED_MODEL_FOLDER, resolution=p.resolution, master_seed=p.seed,
                                  log=stage.log, preview=generation_settings(p))
        model = resource.load_folder(trained_model_dir(p), result.sha256, section["name"])
        made = training_summary(result, p.classes, section["training"]["prompt"], stage.inputs["training_set"])
        return describe_base_model(model) | {"source": TRAINED_SOURCE, **made}

    summary = stage.build_or_reuse(build, in_place=True)
    return stage.result(summary["sha256"], _metadata(summary, stage.out))


def _metadata(summary: dict, out: Path) -> dict:
    """The model's identity and architecture, and for a model trained here its data, loss curve and samples."""
    from histo_assets.core.base_model_training import LOSS_PLOT, SAMPLES_PLOT

    trained = {
        "training_set": summary["training_set"],
        "loss_curve": png_value(out / LOSS_PLOT, "base model training loss"),
        "samples": png_value(out / SAMPLES_PLOT, "real crops above generated ones"),
    } if summary["source"] == TRAINED_SOURCE else {}
    return {
        **trained,
        **{key: summary[key] for key in ("name", "source", "sha256")},
        "model_hash": dg.MetadataValue.text(summary["short_hash"]),
        "attention_context_widths": str(summary["architecture"]["attention_context_widths"]),
        "architecture": table_value(pd.DataFrame(
            [{"fact": key, "value": str(value)} for key, value in summary["architecture"].items()])),
    }
