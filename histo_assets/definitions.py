"""The whole pipeline at a glance: assets, jobs and resources.

Per tissue class:
    slide_inventory -> square_crops -> augmented_crops -> hypernetwork_checkpoints
    imported_hypernetwork_index -> imported_synthetic_images (hypernetworks a lab brings)
Across classes, under every checkpoint and image:
    base_model (trained on every class's augmented_crops when base_model.source is trained)
Per tissue class x checkpoint step (step 0: the base model without a hypernetwork):
    synthetic_images -> checkpoint_metrics
Across everything:
    metrics_summary -> classifier_utility -> dataset_release (dvc add + push + git tag)

The classes, the checkpoint steps, every asset's run-config schema and the base
model's inputs come from params, so `build_definitions(params)` builds the
assets from a Params object, and one process can hold the pipeline for several
params files. `defs` is the pipeline for the file HISTO_ASSETS_PARAMS names
(default params.yaml), the one `dagster dev` and `histo-assets materialize`
load. Jobs, sensors and schedules name assets by key, so they are the same for
any params.

Pool `gpu` (training, generation) runs one step at a time, so concurrent runs never share a GPU;
`dead_run_reaper` gives the slots of runs whose process died back to the pool.
"""

import os

import dagster as dg

from histo_assets.assets import base_model, evaluation, generation, ingest, release, training
from histo_assets.automation import automation_condition_sensor, build_automation
from histo_assets.core.layout import BASE_MODEL_ASSET
from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.params import Params, load_params
from histo_assets.partitions import Partitions
from histo_assets.resources import BaseModelResource, DvcResource, ObjectStoreResource, ParamsResource
from histo_assets.run_health import dead_run_sensor


def _job(name: str, assets: list[str], description: str):
    return dg.define_asset_job(name, selection=dg.AssetSelection.assets(*assets), description=description)


ingest_job = _job("ingest_pipeline", ["slide_inventory", "square_crops", "augmented_crops"],
                  "Inventory, square crops and augmentation for one tissue class.")
base_model_job = _job("base_model_pipeline", [BASE_MODEL_ASSET],
                      "The base model: verified and described, or trained on every class's training crops.")
training_job = _job("training_pipeline", ["hypernetwork_checkpoints", "imported_hypernetwork_index", "imported_synthetic_images"],
                    "Hypernetwork training (and imported hypernetworks) for one tissue class.")
per_checkpoint_job = _job("checkpoint_pipeline", ["synthetic_images", "checkpoint_metrics"],
                          "Synthetic images and their metrics for one class x checkpoint step.")
summary_job = _job("summary_pipeline", ["metrics_summary", "classifier_utility"],
                   "Metric summary across classes and checkpoints, and the classifier utility of every release candidate.")
release_job = _job("release_pipeline", ["dataset_release"], "Assemble, DVC-version, push and tag the synthetic dataset release.")

# The order in which `histo-assets materialize` runs the jobs over their partitions (and dvc.yaml's stages).
pipeline_jobs = [ingest_job, base_model_job, training_job, per_checkpoint_job, summary_job, release_job]

raw_slides_sensor, weekly_refresh = build_automation(ingest_job)


# Every asset, declared once in its module (histo_assets/stage.py builds it for a params object).
ASSETS = [
    ingest.slide_inventory, ingest.square_crops, ingest.augmented_crops,
    base_model.base_model,
    training.hypernetwork_checkpoints, training.imported_hypernetwork_index,
    generation.synthetic_images, generation.imported_synthetic_images,
    evaluation.checkpoint_metrics, evaluation.metrics_summary, evaluation.classifier_utility,
    release.dataset_release,
]
# Every stage whose reuse can be confirmed before a run is launched.
STAGES = {asset.name: asset.spec for asset in ASSETS if asset.spec is not None}


def build_assets(p: Params) -> list[dg.AssetsDefinition]:
    partitions = Partitions.from_params(p)
    return [asset.build(p, partitions) for asset in ASSETS]


def build_definitions(params: Params, object_store: ObjectStoreResource | None = None, executor=None,
                      base_model: BaseModelResource | None = None) -> dg.Definitions:
    """The pipeline for these params, with deployment choices filled in: where stage folders live, and how steps run.

    Runs read the params file these definitions were built from, so their
    classes and steps are the partitions'. Without an explicit store,
    $HISTO_ASSETS_STORE_URL names one, so `histo-assets materialize` and
    `dagster dev` can use it too; unset, everything stays in the local data_dir.
    """
    return dg.Definitions(
        assets=build_assets(params),
        jobs=pipeline_jobs,
        sensors=[raw_slides_sensor, automation_condition_sensor, dead_run_sensor],
        schedules=[weekly_refresh],
        resources={
            "params": ParamsResource(params_file=str(params.source)),
            "base_model": base_model or BaseModelResource(),
            "dvc": DvcResource(),
            "object_store": object_store or ObjectStoreResource(url=os.environ.get(STORE_URL_ENV) or None),
        },
        executor=executor,
    )


defs = build_definitions(load_params())
