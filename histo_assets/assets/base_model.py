"""The Stable Diffusion model under every hypernetwork, as an asset, so lineage shows what the checkpoints stand on."""

import dagster as dg
import pandas as pd

from histo_assets.assets import FOLLOW_UPSTREAM, GPU_TAGS
from histo_assets.assets.ingest import augmented_crops
from histo_assets.core.base_model import describe_architecture
from histo_assets.core.io import atomic_write_json
from histo_assets.core.previews import markdown_table
from histo_assets.core.stage import current_summary, fingerprint
from histo_assets.layout import BASE_MODEL_ASSET, SUMMARY, Layout
from histo_assets.params import load_params
from histo_assets.resources import (
    STAGE_CONFIG_SCHEMA,
    TRAINED_SOURCE,
    BaseModelResource,
    ObjectStoreResource,
    ParamsResource,
)

GROUP = "base_model"
BASE_MODEL_VERSION = "1"

# Only a model trained here has inputs in this graph; a file or folder from elsewhere has none to show.
_TRAINS_ON_CROPS = load_params()["base_model"]["source"] == TRAINED_SOURCE


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
    out = Layout(p.data_dir).base_model
    object_store.pull(p.data_dir, out, log=context.log.info)
    stage_fingerprint = fingerprint(base_model=p["base_model"], code=BASE_MODEL_VERSION)
    summary = current_summary(out, stage_fingerprint)
    reused = summary is not None
    if reused:
        context.log.info(f"base model settings unchanged, reusing {out / SUMMARY}")
    else:
        model = base_model.load(p)
        summary = {
            "fingerprint": stage_fingerprint,
            "source": model.source,
            "name": model.name,
            "sha256": model.sha256,
            "short_hash": model.short_hash,
            "path": str(model.path),
            "architecture": describe_architecture(model),
        }
        atomic_write_json(out / SUMMARY, summary)
    object_store.push(p.data_dir, out, log=context.log.info)
    architecture = summary["architecture"]
    yield dg.MaterializeResult(
        metadata={
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
