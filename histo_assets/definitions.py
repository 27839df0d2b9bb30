"""The whole pipeline at a glance: assets, jobs and resources.

Per tissue class:
    raw_slides -> square_crops -> augmented_crops -> hypernetwork_checkpoints
    imported_hypernetworks
Per tissue class x checkpoint step:
    synthetic_images -> checkpoint_metrics
Across everything:
    metrics_summary

Pool `gpu` (training, generation) runs one step at a time, so concurrent runs never share a GPU.
"""

import dagster as dg

from histo_assets.assets import evaluation, generation, ingest, training
from histo_assets.resources import BaseModelResource, ParamsResource

per_class_assets = [
    ingest.raw_slides,
    ingest.square_crops,
    ingest.augmented_crops,
    training.hypernetwork_checkpoints,
    training.imported_hypernetworks,
]
per_checkpoint_assets = [generation.synthetic_images, evaluation.checkpoint_metrics]
summary_assets = [evaluation.metrics_summary]

per_class_job = dg.define_asset_job(
    "per_class_pipeline",
    selection=dg.AssetSelection.assets(*per_class_assets),
    description="Ingest, augmentation and hypernetwork training for one tissue class.",
)
per_checkpoint_job = dg.define_asset_job(
    "per_checkpoint_pipeline",
    selection=dg.AssetSelection.assets(*per_checkpoint_assets),
    description="Synthetic images and their metrics for one tissue class x checkpoint step.",
)
summary_job = dg.define_asset_job(
    "summary_pipeline",
    selection=dg.AssetSelection.assets(*summary_assets),
    description="Metric summary across classes and checkpoints.",
)

# The order in which `histo-assets materialize` runs the jobs over their partitions.
pipeline_jobs = [per_class_job, per_checkpoint_job, summary_job]

defs = dg.Definitions(
    assets=[*per_class_assets, *per_checkpoint_assets, *summary_assets],
    jobs=pipeline_jobs,
    resources={"params": ParamsResource(), "base_model": BaseModelResource()},
)
