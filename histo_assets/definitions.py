"""The whole pipeline at a glance: assets, jobs and resources.

raw_slides -> square_crops -> augmented_crops  (group "ingest", partitioned by tissue class)
"""

import dagster as dg

from histo_assets.assets import ingest
from histo_assets.resources import ParamsResource

class_assets = dg.AssetSelection.assets(ingest.raw_slides, ingest.square_crops, ingest.augmented_crops)

per_class_job = dg.define_asset_job(
    "per_class_pipeline",
    selection=class_assets,
    description="Every per-class asset, for one tissue-class partition.",
)

defs = dg.Definitions(
    assets=[ingest.raw_slides, ingest.square_crops, ingest.augmented_crops],
    jobs=[per_class_job],
    resources={"params": ParamsResource()},
)
