"""The whole pipeline at a glance: assets, jobs and resources.

Per tissue class:
    raw_slides -> square_crops -> augmented_crops -> hypernetwork_checkpoints
Across classes, under every checkpoint and image:
    base_model (trained on every class's augmented_crops when base_model.source is trained)
    imported_hypernetworks -> imported_synthetic_images
Per tissue class x checkpoint step (step 0: the base model without a hypernetwork):
    synthetic_images -> checkpoint_metrics
Across everything:
    metrics_summary -> classifier_utility -> dataset_release (dvc add + push + git tag)

Pool `gpu` (training, generation) runs one step at a time, so concurrent runs never share a GPU;
`dead_run_reaper` gives the slots of runs whose process died back to the pool.
"""

import os

import dagster as dg

from histo_assets.assets import base_model, evaluation, generation, ingest, release, training, utility
from histo_assets.automation import automation_condition_sensor, build_automation
from histo_assets.core.object_store import STORE_URL_ENV
from histo_assets.resources import BaseModelResource, DvcResource, ObjectStoreResource, ParamsResource
from histo_assets.run_health import dead_run_sensor

ingest_assets = [ingest.raw_slides, ingest.square_crops, ingest.augmented_crops]
base_model_assets = [base_model.base_model_asset]
training_assets = [training.hypernetwork_checkpoints, training.imported_hypernetworks, generation.imported_synthetic_images]
per_checkpoint_assets = [generation.synthetic_images, evaluation.checkpoint_metrics]
summary_assets = [evaluation.metrics_summary, utility.classifier_utility_asset]
release_assets = [release.dataset_release]


def _job(name: str, assets: list, description: str):
    return dg.define_asset_job(name, selection=dg.AssetSelection.assets(*assets), description=description)


ingest_job = _job("ingest_pipeline", ingest_assets, "Inventory, square crops and augmentation for one tissue class.")
base_model_job = _job("base_model_pipeline", base_model_assets, "The base model: verified and described, or trained on every class's training crops.")
training_job = _job("training_pipeline", training_assets, "Hypernetwork training (and imported hypernetworks) for one tissue class.")
per_checkpoint_job = _job("checkpoint_pipeline", per_checkpoint_assets, "Synthetic images and their metrics for one class x checkpoint step.")
summary_job = _job("summary_pipeline", summary_assets, "Metric summary across classes and checkpoints, and the classifier utility of every release candidate.")
release_job = _job("release_pipeline", release_assets, "Assemble, DVC-version, push and tag the synthetic dataset release.")

# The order in which `histo-assets materialize` runs the jobs over their partitions (and dvc.yaml's stages).
pipeline_jobs = [ingest_job, base_model_job, training_job, per_checkpoint_job, summary_job, release_job]

raw_slides_sensor, weekly_refresh = build_automation(ingest_job)


def pipeline_definitions(object_store: ObjectStoreResource | None = None, executor=None,
                         base_model: BaseModelResource | None = None) -> dg.Definitions:
    """The pipeline with deployment choices filled in: where stage folders live, and how steps run.

    Without an explicit store, $HISTO_ASSETS_STORE_URL names one, so `histo-assets materialize`
    and `dagster dev` can use it too; unset, everything stays in the local data_dir.
    """
    return dg.Definitions(
        assets=[*ingest_assets, *base_model_assets, *training_assets, *per_checkpoint_assets, *summary_assets, *release_assets],
        jobs=pipeline_jobs,
        sensors=[raw_slides_sensor, automation_condition_sensor, dead_run_sensor],
        schedules=[weekly_refresh],
        resources={
            "params": ParamsResource(),
            "base_model": base_model or BaseModelResource(),
            "dvc": DvcResource(),
            "object_store": object_store or ObjectStoreResource(url=os.environ.get(STORE_URL_ENV) or None),
        },
        executor=executor,
    )


defs = pipeline_definitions()
