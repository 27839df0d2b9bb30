"""Scheduled refreshes and a sensor on new or changed raw slides.

Both only start the ingest job for the affected tissue classes; everything
downstream follows through declarative automation (eager conditions on the
assets). Unchanged inputs are skipped by each stage's fingerprint, so a
refresh with no changes retrains and regenerates nothing.
"""

import json

import dagster as dg

from histo_assets.core.io import stable_hash
from histo_assets.core.layout import Layout
from histo_assets.core.stage import file_stats
from histo_assets.params import Params
from histo_assets.resources import ObjectStoreResource, ParamsResource

WEEKLY_CRON = "0 3 * * 1"
SENSOR_INTERVAL_SECONDS = 60


def raw_folder_signatures(p: Params, object_store: ObjectStoreResource) -> dict[str, str]:
    """A cheap signature per class folder; content hashes come later, in slide_inventory.

    Locally: file names, sizes and modification times. With an object store
    (a cluster, where the lab uploads with `histo-assets store push raw/<class>`):
    the folder's manifest there.
    """
    layout = Layout(p.data_dir)
    signatures = {}
    for tissue_class in p.classes:
        folder = layout.raw(tissue_class)
        if object_store.enabled:
            entries = object_store.stored_files(p.data_dir, folder) or {}
        else:
            entries = file_stats(folder)
        signatures[tissue_class] = stable_hash(entries)
    return signatures


def build_automation(ingest_job):
    @dg.sensor(
        job=ingest_job,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Starts the ingest job for each tissue class whose raw folder gained, lost or changed files "
        "since the sensor's previous tick. Its first tick only records the folders as they are.",
    )
    def raw_slides_sensor(context: dg.SensorEvaluationContext, params: ParamsResource, object_store: ObjectStoreResource):
        p = params.load()
        previous_cursor = context.cursor
        current = raw_folder_signatures(p, object_store)
        context.update_cursor(json.dumps(current, sort_keys=True))
        if not previous_cursor:
            return dg.SkipReason(f"first tick: recorded the raw folders of {len(current)} classes; "
                                 "later changes start ingest runs")
        previous = json.loads(previous_cursor)
        changed = [c for c, signature in current.items() if previous.get(c) != signature]
        if not changed:
            return dg.SkipReason("no raw slide folder changed")
        return [dg.RunRequest(partition_key=c, run_key=f"{c}-{current[c][:16]}") for c in changed]

    @dg.schedule(
        job=ingest_job,
        cron_schedule=WEEKLY_CRON,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Weekly refresh: re-inventories every class; stages whose inputs did not change are reused.",
    )
    def weekly_refresh(context: dg.ScheduleEvaluationContext, params: ParamsResource):
        stamp = context.scheduled_execution_time.strftime("%Y-%m-%d")
        return [dg.RunRequest(partition_key=c, run_key=f"weekly-{stamp}-{c}") for c in params.load().classes]

    return raw_slides_sensor, weekly_refresh


# Dagster's own sensor for the assets' eager automation conditions ships stopped; this one ships
# running, so the graph follows new ingests in `dagster dev` out of the box.
automation_condition_sensor = dg.AutomationConditionSensorDefinition(
    "default_automation_condition_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Materialises every asset whose eager automation condition says its upstream changed.",
)
